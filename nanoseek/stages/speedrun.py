"""nanoseek speedrun: the whole DeepSeek recipe on the embedded default, ending in DIR/report.md.

corpus (with the task's worked training problems) → tokenizer → pretrain the `small` MoE (MLA + DeepSeekMoE +
MTP) → cold-start SFT on verified worked solutions (R1 §2.3.1) → GRPO → rejection sampling → distil a dense
student → the R1 comparison (the same student trained by GRPO for the same wall time) → evaluate every model on
the same held-out problems → results.json, heldout.jsonl, report.md. Each stage is the real CLI command in a
process of its own (forked from a server that imported torch once: stages/forkserver.py); a stage whose output
exists is skipped, so an interrupted speedrun resumes where it stopped. --budget scales every stage.

    nanoseek speedrun --out runs/speedrun      # 13-22 minutes on 2 CPU cores, by host (docs/results/speedrun.md)
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoint as ckpt
from ..config import PRESETS
from ..errors import Interrupted, StageError
from ..report import TRAINED_BY
from ..options import check, check_out_dir, option, own_run
from ..corpus import SOLVED
from .common import write_run_json
from .forkserver import StageRunner


# The task the speedrun reinforces and distils: sums of three one-digit terms. Its problem space (4,000
# questions, 409 of them held out by content; docs/rl.md) is larger than what training reaches, and a 3M-
# parameter model learns it in minutes from worked, step-by-step solutions ("4 - 1 = 3, so it becomes 3 - 7").
TASK_ARGS = {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}

# (name, checkpoint directory, label): the models the speedrun evaluates, in the order of the report.
STAGES = [
    ("teacher_base", "coldstart", "teacher base (pretrained + cold start)"),
    ("teacher_rl", "rl", "teacher + GRPO"),
    ("student_base", "student-base", "student base"),
    ("student_distilled", "distilled", "student distilled"),
    ("student_rl", "student-rl", "student + GRPO"),
]


@dataclass(kw_only=True)
class SpeedrunConfig:
    """pretrain → GRPO → rejection sampling → distillation → evaluation → report, each stage the real command in a
    process of its own. Finished stages are skipped, so running it again into the same OUT resumes an interrupted
    run. Writes OUT/report.md, OUT/results.json (pass@1, cons@4, format and wall time per model) and
    OUT/heldout.jsonl (the held-out problems every evaluation scored)."""

    out: str = option(help="run directory (report.md, results.json and heldout.jsonl are written here)")
    budget: float = option(1.0, help="scale every stage's steps and examples (2 = twice as long)", above=0)
    preset: str = option("small", help="teacher preset", choices=tuple(PRESETS))
    student: str = option("small-dense", help="student preset for distillation", choices=tuple(PRESETS))
    task: str = option("chain_sum", help="RL / distillation task family (one with worked solutions for the "
                       "cold start)", choices=tuple(SOLVED))
    task_args: dict = option(default_factory=lambda: dict(TASK_ARGS), help="task generator options")
    data: list[str] = option(default_factory=list, help="pretraining data (default: embedded corpus)")
    task_docs: int = option(40000, help="worked training-split problems of the task (chain_sum) added to the "
                            "embedded corpus", min=0)
    vocab_size: int = option(0, help="tokenizer vocabulary (0: the teacher preset's)", min=0)
    model_overrides: dict = option(default_factory=dict, help="ModelConfig overrides for both models")
    gpu: bool = option(False, help="the GPU preset: larger batches and more steps")
    eval_n: int = option(200, help="held-out problems per evaluation", min=1)
    seed: int = option(0, help="seed of every stage", min=0)

    def __post_init__(self):
        check(self)


def plan(cfg: SpeedrunConfig) -> dict:
    """Steps and examples per stage at budget 1: planned for 20 minutes on 2 CPU cores with bf16 (13 to 22 measured,
    by host: docs/results/speedrun.md; the GPU preset multiplies). Most of the budget goes to the teacher's pretraining:
    every later stage is only as good as the base model (a base that solves nothing gives RL nothing to
    reward)."""
    scale = cfg.budget * (8 if cfg.gpu else 1)
    return {"pretrain": max(2, round(PLAN["pretrain"] * scale)),
            "student_pretrain": max(2, round(PLAN["student_pretrain"] * scale)),
            "rl_steps": max(2, round(PLAN["rl_steps"] * scale)),
            "sample_n": max(8, round(PLAN["sample_n"] * scale)), "sft_epochs": PLAN["sft_epochs"],
            "cold_n": max(16, round(PLAN["cold_n"] * scale)),  # one epoch (packed rows: ~180 steps at batch 8)
            "batch": 16 * (4 if cfg.gpu else 1)}


# Work, not seconds: the cold start and GRPO used to stop at a wall time (150 s, 90 s), so a slower machine
# trained less; now one epoch of the cold-start set and 40 GRPO steps. 300 pretraining steps, not 200: with the
# fp32 residual stream of bf16 training, 200 steps then the cold start reached only 10% held-out pass@1, and
# greedy decoding showed why (bench/chain_sum_errors.py): the sums were right, but 160 of 200 held-out answers
# wrote the wrong third term after "so it becomes" (159 of 200 training questions: the copy had not been
# learned, the split was not memorised). The same base taken to 300 steps, then the same cold start: 67.6%
# (docs/results/r1-zero.md).
PLAN = {"pretrain": 300, "student_pretrain": 30, "cold_n": 10000, "rl_steps": 40, "sample_n": 1200,
        "sft_epochs": 20}


def _run(runner: StageRunner, label: str, args: list[str], log: Path) -> float:
    """Run `nanoseek ARGS` in a process of its own, appending its output to the log; returns seconds."""
    print(f"[speedrun] {label} …", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ nanoseek {' '.join(args)}\n")
        f.flush()
        start = f.tell()
    code = runner.run(args, log)
    seconds = time.perf_counter() - t0
    _check_stage(label, code, log, start)
    print(f"[speedrun] {label}: done in {seconds:.0f}s", file=sys.stderr, flush=True)
    return seconds


def _check_stage(label: str, code: int, log: Path, start: int) -> None:
    """A failed stage ends the speedrun with the stage's own one-line reason (the full output stays in the log)."""
    if code == 0:
        return
    if code == 130:
        raise Interrupted(f"interrupted during {label}; run the same command again to resume")
    with open(log, errors="replace") as f:
        f.seek(start)
        lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if line.startswith("nanoseek ")), lines[-1] if lines else "")
    raise StageError(f"stage {label} failed (exit {code}): {reason} (full output: {log})")


def run(cfg: SpeedrunConfig) -> Path:
    out = Path(cfg.out)
    check_out_dir(out, "--out", own=own_run(out, "speedrun"), resumable=True)
    out.mkdir(parents=True, exist_ok=True)
    write_run_json(out, "speedrun", dataclasses.asdict(cfg))
    log, timings_file = out / "speedrun.log", out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    steps = plan(cfg)

    with StageRunner() as runner:  # every stage's process, forked from one server that imported torch once

        def stage(name: str, args: list[str], done: bool):
            if done:
                print(f"[speedrun] {name}: already done, skipped", file=sys.stderr)
                return
            timings[name] = _run(runner, name, args, log)
            timings_file.write_text(json.dumps(timings, indent=2) + "\n")

        _train(cfg, out, steps, stage, timings)
        t_eval = time.perf_counter()
        todo = [name for _, name, _ in STAGES
                if not (out / "eval" / f"{name}.json").exists() and ckpt.step_dirs(out / name)]
        if todo:  # one process scores them all (imports and problems once); evaluation is part of the wall time
            (out / "eval").mkdir(exist_ok=True)
            _evaluate(runner, out, todo, cfg, log)
            timings["eval"] = timings.get("eval", 0) + time.perf_counter() - t_eval
            timings_file.write_text(json.dumps(timings, indent=2) + "\n")
    write_results(out, cfg, timings)
    from ..report import write_speedrun_report

    path = write_speedrun_report(out, dataclasses.asdict(cfg), STAGES, timings)
    print(f"[speedrun] report: {path}", file=sys.stderr)
    return path


def _train(cfg: SpeedrunConfig, out: Path, steps: dict, stage, timings: dict) -> None:
    """Every training stage, in order; `stage(name, args, done)` runs one unless it is done."""
    task, seed = ["--task", cfg.task, "--task-args", json.dumps(cfg.task_args)], ["--seed", str(cfg.seed)]
    if cfg.data:
        data = ["--data", *cfg.data]
    elif cfg.task == "chain_sum":  # the task's own worked problems (training split only), in its settings
        data = ["--easy-problems", str(cfg.task_docs), "--easy-args", json.dumps(cfg.task_args)]
    else:
        data = []
    overrides = ["--model-overrides", json.dumps(cfg.model_overrides)] if cfg.model_overrides else []
    b = str(steps["batch"])
    # a 6-step warm-up (2% of 300) then a constant rate (no cosine decay): the cold start is the decay phase. An
    # annealed base re-warmed to the cold start's 1e-3 diverged (loss 0.6 -> 1.6, 4.9% held-out vs 29.4%).
    # The skill appears late and abruptly (docs/results/r1-zero.md, docs/results/speedrun.md): PLAN says why 300.
    # Held-out loss every 100 steps: each evaluation costs ~3 training steps and changes nothing in the training.
    stage("pretrain", ["pretrain", "--preset", cfg.preset, "--out", str(out / "base"), "--steps",
                       str(steps["pretrain"]), "--batch-size", b, "--warmup", "0.02", "--decay-start", "1",
                       "--decay-end", "1",
                       "--bias-update-stop", "1", "--mtp-switch", "1", "--eval-every", "100", "--save-every",
                       str(steps["pretrain"]), *data, *overrides, *seed,
                       *(["--vocab-size", str(cfg.vocab_size)] if cfg.vocab_size else [])],
          _finished(out / "base", steps["pretrain"]))
    tokenizer = str(out / "base" / "data" / "tokenizer.json")  # the student shares it (same vocabulary)
    stage("student-pretrain", ["pretrain", "--preset", cfg.student, "--out", str(out / "student-base"), "--steps",
                               str(steps["student_pretrain"]), "--batch-size", b, "--warmup", "0.1",
                               "--tokenizer", tokenizer,
                               "--eval-every", "50", "--save-every", str(steps["student_pretrain"]), *data,
                               *overrides, *seed],
          _finished(out / "student-base", steps["student_pretrain"]))
    # R1's cold start (R1 paper §2.3.1): a short SFT on verified worked solutions of training-split problems
    # (other draws than the corpus's), so that RL starts from a model that solves a real fraction of them.
    cold = out / "coldstart.jsonl"
    if not cold.exists():
        from ..corpus import worked_solutions

        rows = worked_solutions(cfg.task, steps["cold_n"], seed=cfg.seed, **cfg.task_args)
        cold.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stage("coldstart", ["sft", "--init", str(out / "base"), "--data", str(cold), "--out", str(out / "coldstart"),
                        "--epochs", "1", "--batch-size", "8", "--lr", "1e-3", *seed],
          bool(ckpt.step_dirs(out / "coldstart")))
    rl = ["--eval-every", "0", *RL_ARGS, *task, *seed]  # evaluated below
    stage("grpo", ["grpo", "--init", str(out / "coldstart"), "--out", str(out / "rl"), "--steps",
                   str(steps["rl_steps"]), *rl], bool(ckpt.step_dirs(out / "rl")))
    # rejection sampling at the evaluation temperature; k = 2, since a problem's correct traces are mostly the
    # same text (one worked solution) and duplicates are dropped
    stage("sample", ["sample", "--ckpt", str(out / "rl"), "--out", str(out / "traces.jsonl"), "--n",
                     str(steps["sample_n"]), "--k", "2", "--temperature", "0.6", "--max-new-tokens", "64",
                     "--keep", "correct", *task, *seed],
          (out / "traces.jsonl").exists())
    n_traces = len((out / "traces.jsonl").read_text().splitlines())
    if n_traces == 0:  # nothing verified-correct to distil: say so in the report rather than train on nothing
        print("[speedrun] distill: skipped, rejection sampling kept no correct traces", file=sys.stderr)
    # distillation at 3e-3: on 1,190 traces and the 30-step student, 1e-3 gave 1.5% (18% well-formed), 3e-3 4.8%
    # (100% well-formed); logit distillation from the RL teacher on the same traces (--teacher) gave 1.0%. 20
    # epochs: on the 1,010 traces of a 70% teacher, 5 epochs (95 steps) gave 6.4%, 10 gave 10.6% (the first sum
    # still wrong in 164 of 200 greedy answers: bench/chain_sum_errors.py), 20 gave 44.9%
    stage("distill", ["sft", "--init", str(out / "student-base"), "--data", str(out / "traces.jsonl"), "--out",
                      str(out / "distilled"), "--epochs", str(steps["sft_epochs"]), "--batch-size", "8",
                      "--lr", "3e-3", *seed], bool(ckpt.step_dirs(out / "distilled")) or n_traces == 0)
    # The R1 comparison: the same student trained by GRPO for the wall time distillation cost (sampling the
    # teacher's traces + SFT), with the teacher's RL settings; --steps only bounds it, --max-seconds ends it.
    budget_s = timings.get("sample", 0) + timings.get("distill", 0)
    stage("student-grpo", ["grpo", "--init", str(out / "student-base"), "--out", str(out / "student-rl"),
                           "--steps", "100000", "--max-seconds", f"{max(budget_s, 5):.0f}", *rl],
          bool(ckpt.step_dirs(out / "student-rl")))


# GRPO settings of both RL stages (docs/rl.md): fresh problems every step, 5 warm-up steps then a constant rate,
# rollouts at the evaluation temperature 0.6 (scored at 0.6), accuracy-only reward. The rate is measured: on the
# cold-started `small` teacher, 1e-4 (T = 1) lost 6 points of held-out pass@1 in 150 s, 2e-4 lost 16 and 5e-4
# collapsed to 7% (KL to the initial policy 0.3-0.7), 2e-5 gained 3 (docs/results/r1-zero.md); from the 68% teacher,
# 5e-5 and 1e-4 lost 5 and 22 points in 40 steps, and rollouts at T = 1 gained no more than T = 0.6.
RL_ARGS = ["--algo", "grpo", "--lr", "2e-5", "--temperature", "0.6", "--warmup-steps", "5", "--prompts-per-step", "8",
           "--group-size", "8", "--max-new-tokens", "64"]


def write_results(out: Path, cfg: SpeedrunConfig, timings: dict) -> Path:
    """OUT/results.json ({"task", "heldout_n", "stages": {name: {"pass1", "cons", "format", "wall_s"}}}) and
    OUT/heldout.jsonl, from the evaluations' own outputs; every evaluation must have scored the same problems."""
    stages, heldout = {}, None
    for key, name, _ in STAGES:
        path = out / "eval" / f"{name}.json"
        if not path.exists():
            continue
        ev = json.loads(path.read_text())
        problems = [{"question": p["question"], "answer": p["answer"]} for p in ev["problems"]]
        if heldout is not None and problems != heldout:
            raise StageError(f"{path}: scored other held-out problems than the other evaluations")
        heldout = problems
        stages[key] = {"pass1": ev["accuracy"], "cons": ev["cons_at_k"], "format": ev["format"],
                       "wall_s": round(timings.get(TRAINED_BY[name], 0.0), 1), "n": ev["n"], "k": ev["k"]}
    (out / "heldout.jsonl").write_text("".join(json.dumps(p) + "\n" for p in heldout or []))
    path = out / "results.json"
    path.write_text(json.dumps({"task": cfg.task, "task_args": cfg.task_args, "heldout_n": len(heldout or []),
                                "stages": stages}, indent=2) + "\n")
    return path


def _finished(run_dir: Path, steps: int) -> bool:
    dirs = ckpt.step_dirs(run_dir)
    return bool(dirs) and dirs[-1].name == f"step_{steps:06d}"


def _evaluate(runner: StageRunner, out: Path, names: list[str], cfg: SpeedrunConfig, log: Path) -> None:
    """`nanoseek eval` of the run directories OUT/NAME, in one process; each JSON line it printed becomes
    OUT/eval/NAME.json, so an interrupted evaluation keeps the models it finished."""
    args = ["eval", "--ckpt", *(str(out / name) for name in names), "--task", cfg.task, "--task-args",
            json.dumps(cfg.task_args), "--n", str(cfg.eval_n), "--k", "4", "--temperature", "0.6", "--top-p", "0.95",
            "--max-new-tokens", "64", "--json", "--seed", str(cfg.seed)]
    print(f"[speedrun] eval {' '.join(names)} …", file=sys.stderr, flush=True)
    with open(log, "a") as f:
        f.write(f"\n$ nanoseek {' '.join(args)}\n")
        start = f.tell()
    lines = out / "eval" / "stdout.jsonl"
    lines.unlink(missing_ok=True)
    code = runner.run(args, log, stdout=lines)
    for name, line in zip(names, lines.read_text().splitlines(keepends=True) if lines.exists() else []):
        if line.endswith("\n"):  # a whole line: that model's evaluation finished
            (out / "eval" / f"{name}.json").write_text(line)
    lines.unlink(missing_ok=True)
    _check_stage(f"eval {' '.join(names)}", code, log, start)
