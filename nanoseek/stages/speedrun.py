"""nanoseek speedrun: the whole DeepSeek recipe on the embedded default, ending in DIR/report.md.

corpus → tokenizer → pretrain the `small` MoE (MLA + DeepSeekMoE + MTP) → GRPO (R1-Zero) → rejection sampling →
distil a dense student → the R1 comparison (the same student trained by GRPO for the same wall time) →
evaluate every checkpoint → report. Each stage is the real CLI command, run as a subprocess; a stage whose
output exists is skipped, so an interrupted speedrun resumes where it stopped. --budget scales every stage.

    nanoseek speedrun --out runs/speedrun              # ~14 minutes on 2 CPU cores (measured 13:49 from a fresh clone)
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import checkpoint as ckpt
from ..config import PRESETS
from ..errors import Interrupted, StageError
from ..options import check, check_out_dir, option, own_run
from ..tasks import TASKS
from .common import write_run_json


@dataclass(kw_only=True)
class SpeedrunConfig:
    """pretrain → GRPO → rejection sampling → distillation → evaluation → report, each stage the real command in a
    subprocess. Finished stages are skipped, so running it again into the same OUT resumes an interrupted run."""

    out: str = option(help="run directory (report.md is written here)")
    budget: float = option(1.0, help="scale every stage's steps (2 = twice as long)", above=0)
    preset: str = option("small", help="teacher preset", choices=tuple(PRESETS))
    student: str = option("small-dense", help="student preset for distillation", choices=tuple(PRESETS))
    task: str = option("chain_sum", help="RL / distillation task family", choices=tuple(TASKS))
    task_args: dict = option(default_factory=lambda: {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                      "max_digits": 1}, help="task generator options")
    data: list[str] = option(default_factory=list, help="pretraining data (default: embedded corpus)")
    easy_problems: int = option(24000, help="one-digit chain_sum problems added to the corpus", min=0)
    vocab_size: int = option(0, help="tokenizer vocabulary (0: the teacher preset's)", min=0)
    model_overrides: dict = option(default_factory=dict, help="ModelConfig overrides for both models")
    gpu: bool = option(False, help="the GPU preset: larger batches and more steps")
    eval_n: int = option(100, help="held-out problems per evaluation", min=1)
    seed: int = option(0, help="seed of every stage", min=0)

    def __post_init__(self):
        check(self)


def plan(cfg: SpeedrunConfig) -> dict[str, int]:
    """Steps per stage: sized for under 20 minutes on 2 CPU cores at budget 1 (the GPU preset multiplies).

    Most of the budget goes to the teacher's pretraining, on a corpus rich in easy problems: every later stage
    is only as good as the base model (with 3,000 easy problems the base solved 0.5% and RL had nothing to reward)."""
    scale = cfg.budget * (8 if cfg.gpu else 1)
    return {"pretrain": max(2, round(170 * scale)), "student_pretrain": max(2, round(100 * scale)),
            "rl": max(2, round(30 * scale)), "sample_n": max(8, round(512 * scale)),
            "sft_epochs": 16, "batch": 16 * (4 if cfg.gpu else 1)}


def _run(label: str, args: list[str], log: Path) -> float:
    """Run `nanoseek ARGS` in a subprocess, appending its output to the log; returns seconds."""
    print(f"[speedrun] {label} …", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ nanoseek {' '.join(args)}\n")
        f.flush()
        start = f.tell()
        done = subprocess.run([sys.executable, "-m", "nanoseek", *args], stdout=f, stderr=f)
    seconds = time.perf_counter() - t0
    _check_stage(label, done.returncode, log, start)
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
    steps, task = plan(cfg), ["--task", cfg.task, "--task-args", json.dumps(cfg.task_args)]
    data = ["--data", *cfg.data] if cfg.data else ["--easy-problems", str(cfg.easy_problems)]
    seed = ["--seed", str(cfg.seed)]
    model = (["--vocab-size", str(cfg.vocab_size)] if cfg.vocab_size else []) + (
        ["--model-overrides", json.dumps(cfg.model_overrides)] if cfg.model_overrides else [])

    def stage(name: str, args: list[str], done: bool):
        if done:
            print(f"[speedrun] {name}: already done, skipped", file=sys.stderr)
            return
        timings[name] = _run(name, args, log)
        timings_file.write_text(json.dumps(timings, indent=2) + "\n")

    b = str(steps["batch"])
    stage("pretrain", ["pretrain", "--preset", cfg.preset, "--out", str(out / "base"), "--steps",
                       str(steps["pretrain"]), "--batch-size", b, "--eval-every", "20", "--save-every",
                       str(steps["pretrain"]), *data, *model, *seed], _finished(out / "base", steps["pretrain"]))
    tokenizer = str(out / "base" / "data" / "tokenizer.json")
    stage("student-pretrain", ["pretrain", "--preset", cfg.student, "--out", str(out / "student-base"), "--steps",
                               str(steps["student_pretrain"]), "--batch-size", b, "--tokenizer", tokenizer,
                               "--eval-every", "20", "--save-every", str(steps["student_pretrain"]), *data,
                               *(["--model-overrides", json.dumps(cfg.model_overrides)] if cfg.model_overrides else []),
                               *seed],
          _finished(out / "student-base", steps["student_pretrain"]))
    stage("grpo", ["grpo", "--init", str(out / "base"), "--out", str(out / "rl"), "--steps", str(steps["rl"]),
                   "--eval-n", str(cfg.eval_n // 2), *task, *seed], bool(ckpt.step_dirs(out / "rl")))
    stage("sample", ["sample", "--ckpt", str(out / "rl"), "--out", str(out / "traces.jsonl"), "--n",
                     str(steps["sample_n"]), "--k", "4", "--keep", "correct", *task, *seed],
          (out / "traces.jsonl").exists())
    n_traces = len((out / "traces.jsonl").read_text().splitlines())
    if n_traces == 0:  # nothing verified-correct to distil: say so in the report rather than train on nothing
        print("[speedrun] distill: skipped, rejection sampling kept no correct traces", file=sys.stderr)
    stage("distill", ["sft", "--init", str(out / "student-base"), "--data", str(out / "traces.jsonl"), "--out",
                      str(out / "distilled"), "--epochs", str(steps["sft_epochs"]),
                      "--batch-size", "2", "--lr", "1e-3", *seed],  # a few hundred traces: many small steps
          bool(ckpt.step_dirs(out / "distilled")) or n_traces == 0)
    budget_s = timings.get("sample", 0) + timings.get("distill", 0)  # what distillation cost, in wall time
    stage("student-grpo", ["grpo", "--init", str(out / "student-base"), "--out", str(out / "student-rl"),
                           "--steps", "100000", "--max-seconds", f"{max(budget_s, 10):.0f}", "--eval-every", "0",
                           *task, *seed], bool(ckpt.step_dirs(out / "student-rl")))
    t_eval, evaluated = time.perf_counter(), False
    for name in ("base", "rl", "student-base", "distilled", "student-rl"):
        result = out / "eval" / f"{name}.json"
        if not result.exists() and ckpt.step_dirs(out / name):
            result.parent.mkdir(exist_ok=True)
            _evaluate(out / name, result, cfg, log)
            evaluated = True
    if evaluated:  # evaluation is part of the speedrun's wall time too
        timings["eval"] = timings.get("eval", 0) + time.perf_counter() - t_eval
        timings_file.write_text(json.dumps(timings, indent=2) + "\n")
    from ..report import write_speedrun_report

    path = write_speedrun_report(out, dataclasses.asdict(cfg), steps, timings)
    print(f"[speedrun] report: {path}", file=sys.stderr)
    return path


def _finished(run_dir: Path, steps: int) -> bool:
    dirs = ckpt.step_dirs(run_dir)
    return bool(dirs) and dirs[-1].name == f"step_{steps:06d}"


def _evaluate(run_dir: Path, result: Path, cfg: SpeedrunConfig, log: Path) -> None:
    args = ["eval", "--ckpt", str(run_dir), "--task", cfg.task, "--task-args", json.dumps(cfg.task_args),
            "--n", str(cfg.eval_n), "--k", "4", "--json", "--seed", str(cfg.seed)]
    print(f"[speedrun] eval {run_dir.name} …", file=sys.stderr, flush=True)
    with open(log, "a") as f:
        f.write(f"\n$ nanoseek {' '.join(args)}\n")
        f.flush()
        start = f.tell()
        done = subprocess.run([sys.executable, "-m", "nanoseek", *args], stdout=subprocess.PIPE, stderr=f, text=True)
    _check_stage(f"eval {run_dir.name}", done.returncode, log, start)
    result.write_text(done.stdout)
