"""The whole pipeline end to end on the tiny preset: every stage runs, the report and results.json are made from
their outputs, and a second call resumes (skips what is done)."""

import json
import random

from nanoseek.cli import main
from nanoseek.tasks import get_task
from nanoseek.template import r1_completion

TASK_ARGS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def _args(tmp_path):
    r = random.Random(0)
    words = "the cat sat on a mat and the dog ran to the red house near a tree".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(r.choice(words) for _ in range(60)) for _ in range(200)))
    return ["speedrun", "--out", str(tmp_path / "run"), "--preset", "tiny", "--student", "tiny", "--budget", "0.03",
            "--data", str(corpus), "--vocab-size", "320", "--eval-n", "4", "--task-args", json.dumps(TASK_ARGS)]


def test_speedrun_smoke(tmp_path):
    args, out = _args(tmp_path), tmp_path / "run"
    assert main(args) == 0
    report = (out / "report.md").read_text()
    for label in ("teacher base", "teacher + GRPO", "student base", "student distilled", "student + GRPO"):
        assert label in report
    assert len(list((out / "figures").glob("*.png"))) == 6
    # every stage recorded the precision it resolved (and the report says which): pretraining in runtime.json,
    # SFT and GRPO in run.json, evaluations in their JSON
    for stage in ("coldstart", "rl", "student-rl"):
        assert json.loads((out / stage / "run.json").read_text())["runtime"]["precision"] in ("fp32", "bf16")
    assert json.loads((out / "rl" / "run.json").read_text())["rollout_runtime"]["precision"] in ("fp32", "bf16")
    assert all(json.loads(p.read_text())["runtime"]["precision"] in ("fp32", "bf16") for p in (out / "eval").glob("*"))
    precision = next(line for line in report.splitlines() if line.startswith("Compute precision"))
    for stage in ("pretrain", "student-pretrain", "coldstart", "grpo", "student-grpo", "evaluations"):
        assert f"{stage} " in precision, (stage, precision)
    timings = json.loads((out / "timings.json").read_text())
    assert {"pretrain", "student-pretrain", "grpo", "sample", "student-grpo"} <= set(timings)
    results = json.loads((out / "results.json").read_text())
    heldout = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    assert results["task"] == "chain_sum" and results["heldout_n"] == len(heldout) == 4
    task = get_task("chain_sum", **TASK_ARGS)
    assert [p.question for p in task.problems(0, 4, split="heldout")] == [h["question"] for h in heldout]
    for name, r in results["stages"].items():
        assert set(r) >= {"pass1", "cons", "format", "wall_s"} and 0 <= r["pass1"] <= 1, (name, r)
    # a tiny model trained for seconds gets nothing right: distillation is skipped, and the report says so
    if not (out / "traces.jsonl").read_text():
        assert "student_distilled" not in results["stages"] and "skipped" in report
    # a second call finds every stage done and only rewrites the report
    assert main(args) == 0 and json.loads((out / "timings.json").read_text()) == timings

    # The distillation path: with verified traces present (here written for training-split problems, as
    # rejection sampling would keep them), a rerun trains and evaluates the distilled student.
    traces = [{"prompt": task.prompt(p), "completion": r1_completion(f"{p.question} {p.answer}.", p.answer)}
              for p in task.problems(1, 12, split="train")]
    (out / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    (out / "student-rl").rename(tmp_path / "old-student-rl")  # its time budget depends on distillation's
    (out / "eval" / "student-rl.json").unlink()
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert {"student_distilled", "student_rl"} <= set(results["stages"])
    assert results["stages"]["student_distilled"]["wall_s"] > 0
    assert "The R1 comparison" in (out / "report.md").read_text()
    run = json.loads((out / "distilled" / "run.json").read_text())
    assert run["examples"] == 12 and run["dropped_heldout"] == 0
