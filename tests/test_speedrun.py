"""The whole pipeline end to end on the tiny preset: every stage runs, results.json holds every model with its
clustered standard error and OOD score, the comparisons are paired intervals, an arm that learned nothing is
named as such, and a second call resumes (skips what is done)."""

import json
import random

from nanoseek.cli import main
from nanoseek.metrics import read_metrics
from nanoseek.stages.speedrun_plan import COMPARISONS, MODELS, RUNGS
from nanoseek.tasks import get_task, is_heldout, problem_key
from nanoseek.tasks.base import signed_terms
from nanoseek.template import r1_completion


def _args(tmp_path):
    r = random.Random(0)
    words = "the cat sat on a mat and the dog ran to the red house near a tree".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(r.choice(words) for _ in range(60)) for _ in range(200)))
    return ["speedrun", "--out", str(tmp_path / "run"), "--preset", "tiny", "--student", "tiny", "--budget", "0.02",
            "--data", str(corpus), "--vocab-size", "320", "--eval-n", "4"]


def _terms(question: str) -> int:
    return len(signed_terms(question.rsplit(":", 1)[1].rstrip("=")))


def test_speedrun_end_to_end(tmp_path):
    args, out = _args(tmp_path), tmp_path / "run"
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    trained = {"pretrained", "teacher_base", "teacher_rl", "r1_zero", "student_base", "student_rl",
               "student_onpolicy"}  # (b) and (c) need verified traces; a tiny model trained for seconds has none
    assert trained <= set(results["stages"]) and {m.key for m in MODELS} >= set(results["stages"])
    for key, r in results["stages"].items():
        assert 0 <= r["pass1"] <= 1 and r["pass1_se"] >= 0 and 0 <= r["ood_pass1"] <= 1, (key, r)
        assert r["flops_lineage"] >= r["flops"] > 0 and r["wall_s_lineage"] >= r["wall_s"] > 0, (key, r)
    # SFT and on-policy distillation always have a gradient: their weights moved. GRPO with no reward in any group
    # has none: its weights stay bit-identical, and the report names the arm as untrained (the defect of a
    # "student + GRPO" row that compared distillation with an untouched model)
    stages = results["stages"]
    for key in ("teacher_base", "student_base", "student_onpolicy"):
        assert stages[key]["weights_moved"] > 0, key
    for key in ("teacher_rl", "r1_zero", "student_rl"):
        rl = read_metrics(out / next(m.dir for m in MODELS if m.key == key) / "metrics.jsonl")
        if all(r["accuracy"] == 0 for r in rl if "accuracy" in r):
            assert stages[key]["weights_moved"] == 0 and f"**Arm {stages[key]['label']} did not change" in report
    loss = [r["loss"] for r in read_metrics(out / "base" / "metrics.jsonl") if "loss" in r]
    assert loss[-1] < loss[0]  # pretraining learned something
    # every comparison is a paired difference with its interval, on both sets
    assert {(c["a"], c["b"], c["set"]) for c in results["comparisons"]} == {
        (a, b, s) for a, b, _ in COMPARISONS for s in ("heldout", "ood") if a in stages and b in stages}
    for c in results["comparisons"]:
        assert c["ci_low"] <= c["diff"] <= c["ci_high"] and abs(c["diff"] - (c["a_pass1"] - c["b_pass1"])) < 1e-9
    # the held-out set is the RL rung's held-out split; the OOD set has more terms than any training problem
    held = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    ood = [json.loads(line) for line in (out / "ood.jsonl").read_text().splitlines()]
    assert len(held) == 4 and len(ood) == 2 and all(is_heldout(p["question"]) for p in held)
    trained_terms = max(RUNGS[r]["task_args"]["max_terms"] for r in ("pretrain", "rl"))
    assert min(_terms(p["question"]) for p in ood) > trained_terms
    # no held-out problem, by content key, in any training source the speedrun wrote
    held_keys = {problem_key(p["question"]) for p in held}
    for source in ("coldstart.jsonl", "traces.jsonl", "control.jsonl"):
        rows = [json.loads(line) for line in (out / source).read_text().splitlines()]
        assert not held_keys & {problem_key(r["question"]) for r in rows}, source
    assert "±" in report and "95%" in report and len(list((out / "figures").glob("*.png"))) >= 4
    precision = results["precision"]
    for stage in ("pretrain", "student-pretrain", "coldstart", "grpo", "student-grpo", "evaluations"):
        assert f"{stage} " in precision, (stage, precision)
    # a second call finds every stage done and only rewrites the report
    timings = json.loads((out / "timings.json").read_text())
    assert main(args) == 0 and json.loads((out / "timings.json").read_text()) == timings

    # The distillation arms: with verified traces present (here written for training-split problems of the RL
    # rung, as rejection sampling would keep them), a rerun trains (b) and (c) on the same questions.
    task = get_task("chain_sum", **RUNGS["rl"]["task_args"])
    traces = []
    for p in task.problems(1, 12, split="train"):
        traces.append({"prompt": task.prompt(p), "question": p.question, "answer": p.answer,
                       "completion": r1_completion(f"The answer is {p.answer}.", p.answer)})
    (out / "traces.jsonl").write_text("".join(json.dumps(t) + "\n" for t in traces))
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("student_distilled", "student_control"):
        assert results["stages"][key]["weights_moved"] > 0
    control = [json.loads(line) for line in (out / "control.jsonl").read_text().splitlines()]
    assert [c["question"] for c in control] == [t["question"] for t in traces]
    assert [c["completion"] for c in control] != [t["completion"] for t in traces]
    flops = {k: results["stages"][k]["flops"] for k in ("student_distilled", "student_control", "student_onpolicy")}
    budget = results["student_budget_flops"]
    assert all(budget <= f < 2 * budget for f in flops.values()), (flops, budget)  # equal compute, ± one step
