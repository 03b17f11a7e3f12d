"""nanoseek speedrun: the R1 recipe end to end as an experiment with error bars, ending in DIR/report.md.

corpus (with the task's worked training problems) → tokenizer → pretrain the `small` MoE teacher and a dense
student on the same data (the student for a budget in proportion to its size) → the cold start (R1 §2.3.1) of
both → GRPO on the teacher at the edge of its competence, and R1-Zero (GRPO straight from the pretrained base)
→ from the one cold-started student, four arms at equal compute (R1 §4.1): (a) GRPO, (b) SFT on the RL
teacher's verified traces, (c) SFT on as many generated worked solutions (the control), (d) on-policy
distillation → every model scored on the same held-out problems and on an out-of-distribution rung →
results.json (scores with clustered standard errors, paired comparisons with 95% intervals), report.md.

Each stage is the real CLI command in a process of its own (forked from a server that imported torch once:
stages/forkserver.py); a stage whose output exists is skipped, so an interrupted speedrun resumes where it
stopped. --budget scales every stage. The design and why: docs/rl.md ("The speedrun's experiment").

    nanoseek speedrun --out runs/speedrun
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
from ..options import check, check_out_dir, option, own_run
from .common import write_run_json
from .forkserver import StageRunner
from .speedrun_plan import (COMPARISONS, MODELS, PLAN, RL_ARGS, RUNGS, STUDENT_TOKENS_RULE, Model, cold_start_rows,
                            control_rows, write_results)


@dataclass(kw_only=True)
class SpeedrunConfig:
    """The R1 recipe as one experiment: pretrain → cold start → GRPO / R1-Zero → four student arms at equal compute
    → evaluation on held-out and out-of-distribution problems → report. Finished stages are skipped, so running it
    again into the same OUT resumes an interrupted run. Writes OUT/report.md, OUT/results.json and
    OUT/heldout.jsonl / OUT/ood.jsonl (the problems every evaluation scored)."""

    out: str = option(help="run directory (report.md, results.json and the evaluated problems are written here)")
    budget: float = option(1.0, help="scale every stage's steps, examples and compute (2 = twice as long)", above=0)
    preset: str = option("mini", help="teacher preset", choices=tuple(PRESETS))
    student: str = option("mini-dense", help="student preset", choices=tuple(PRESETS))
    model_overrides: dict = option(default_factory=dict, help="ModelConfig overrides for both models")
    data: list[str] = option(default_factory=list, help="pretraining data instead of the embedded corpus")
    vocab_size: int = option(PLAN["vocab_size"], help="tokenizer vocabulary", min=0)
    gpu: bool = option(False, help="the GPU preset: larger batches and more steps")
    eval_n: int = option(PLAN["eval_n"], help="held-out problems per evaluation (the OOD set has half as many)",
                         min=1)
    seed: int = option(0, help="seed of every stage (data draws, initialisation, sampling)", min=0)

    def __post_init__(self):
        check(self)


def plan(cfg: SpeedrunConfig) -> dict:
    """Steps, examples and compute per stage at this budget (PLAN is budget 1 on 2 CPU cores). The student's
    pretraining steps follow STUDENT_TOKENS_RULE (same batch and sequence length, so tokens ∝ steps)."""
    from ..config import get_preset
    from ..stats import param_counts

    scale = cfg.budget * (8 if cfg.gpu else 1)
    out = {k: (max(2, round(v * scale)) if isinstance(v, int) and k in PLAN["scaled"] else v)
           for k, v in PLAN.items() if k != "scaled"}
    teacher, student = (param_counts(get_preset(p, **cfg.model_overrides))["active_params"]
                        for p in (cfg.preset, cfg.student))
    out["student_pretrain"] = max(2, round(out["pretrain"] * student / teacher))
    out["student_flops"] = PLAN["student_flops"] * scale
    return out


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

    # every stage's process: `python -m nanoseek ARGS`, forked from one server that imported torch once
    with StageRunner("nanoseek") as runner:

        def stage(name: str, args: list[str], done: bool):
            if done:
                print(f"[speedrun] {name}: already done, skipped", file=sys.stderr)
                return
            timings[name] = _run(runner, name, args, log)
            timings_file.write_text(json.dumps(timings, indent=2) + "\n")

        _teacher(cfg, out, steps, stage)
        _students(cfg, out, steps, stage)
        for split in ("heldout", "ood"):  # one process per set scores every model (imports and problems once)
            t0 = time.perf_counter()
            if _evaluate(runner, out, split, cfg, steps, log):
                timings[f"eval_{split}"] = timings.get(f"eval_{split}", 0) + time.perf_counter() - t0
                timings_file.write_text(json.dumps(timings, indent=2) + "\n")
    write_results(out, cfg, steps, timings)
    from ..report import write_speedrun_report

    path = write_speedrun_report(out)
    print(f"[speedrun] report: {path}", file=sys.stderr)
    return path


def _common(cfg: SpeedrunConfig) -> dict:
    rung = RUNGS["rl"]
    return {"task": ["--task", "chain_sum", "--task-args", json.dumps(rung["task_args"])],
            "seed": ["--seed", str(cfg.seed)],
            "overrides": ["--model-overrides", json.dumps(cfg.model_overrides)] if cfg.model_overrides else []}


def _teacher(cfg: SpeedrunConfig, out: Path, steps: dict, stage) -> None:
    """Pretrain the teacher and the student base, cold-start both, GRPO the teacher, R1-Zero from the base."""
    c = _common(cfg)
    if cfg.data:
        data = ["--data", *cfg.data]
    else:  # the embedded corpus, task-heavy: worked training problems of the pretraining rungs, a share of English
        data = ["--easy-problems", str(steps["task_docs"]), "--easy-args", json.dumps(RUNGS["pretrain"]["task_args"]),
                "--natural-share", str(PLAN["natural_share"]), "--n-problems", str(PLAN["n_problems"])]
    decay_start, decay_end = PLAN["pretrain_decay"]
    common = ["--seq-len", str(PLAN["seq_len"]), "--batch-size", str(steps["batch"]), "--warmup",
              str(PLAN["warmup_frac"]), "--decay-start", str(decay_start), "--decay-end", str(decay_end),
              "--bias-update-stop", "1", "--mtp-switch", "1", *data, *c["overrides"], *c["seed"]]
    mask = ["--document-mask"] if PLAN["document_mask"] else []
    stage("pretrain", ["pretrain", "--preset", cfg.preset, "--out", str(out / "base"), "--steps",
                       str(steps["pretrain"]), "--eval-every", str(steps["pretrain"]), "--save-every",
                       str(steps["pretrain"]), "--vocab-size", str(cfg.vocab_size), *common,
                       *_maskable(cfg.preset, cfg, mask)],
          _finished(out / "base", steps["pretrain"]))
    tokenizer = str(out / "base" / "data" / "tokenizer.json")  # the student shares it (distillation needs it)
    stage("student-pretrain", ["pretrain", "--preset", cfg.student, "--out", str(out / "student-base"), "--steps",
                               str(steps["student_pretrain"]), "--eval-every", str(steps["student_pretrain"]),
                               "--save-every", str(steps["student_pretrain"]), "--tokenizer", tokenizer, *common,
                               *_maskable(cfg.student, cfg, mask)],
          _finished(out / "student-base", steps["student_pretrain"]))
    cold = out / "coldstart.jsonl"
    if not cold.exists():
        rows = cold_start_rows(steps["cold_n"], cfg.seed)
        cold.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = ["--epochs", "1", "--batch-size", "8", "--lr", str(PLAN["cold_lr"]), *c["seed"]]
    stage("coldstart", ["sft", "--init", str(out / "base"), "--data", str(cold), "--out", str(out / "coldstart"), *sft],
          bool(ckpt.step_dirs(out / "coldstart")))
    stage("student-coldstart", ["sft", "--init", str(out / "student-base"), "--data", str(cold), "--out",
                                str(out / "student-cold"), *sft], bool(ckpt.step_dirs(out / "student-cold")))
    # one checkpoint, at the end: a stage counts as done once it has one (a killed stage restarts, never half-run)
    rl = [*RL_ARGS, *c["task"], *c["seed"], "--eval-every", str(PLAN["rl_eval_every"]), "--eval-n",
          str(PLAN["rl_eval_n"]), "--save-every", "100000"]
    stage("grpo", ["grpo", "--init", str(out / "coldstart"), "--out", str(out / "rl"), "--steps",
                   str(steps["rl_steps"]), *rl], bool(ckpt.step_dirs(out / "rl")))
    stage("r1-zero", ["grpo", "--init", str(out / "base"), "--out", str(out / "r1-zero"), "--steps",
                      str(steps["r1_zero_steps"]), *rl], bool(ckpt.step_dirs(out / "r1-zero")))
    # rejection sampling of the RL teacher at the evaluation temperature, on training-split problems of the RL rungs
    stage("sample", ["sample", "--ckpt", str(out / "rl"), "--out", str(out / "traces.jsonl"), "--n",
                     str(steps["sample_n"]), "--k", "2", "--temperature", "0.6", "--max-new-tokens",
                     str(RUNGS["rl"]["max_new_tokens"]), "--keep", "correct", *c["task"], *c["seed"]],
          (out / "traces.jsonl").exists())


def _students(cfg: SpeedrunConfig, out: Path, steps: dict, stage) -> None:
    """The four arms from the one cold-started student, each given the same student compute (FLOPs)."""
    c = _common(cfg)
    budget = ["--max-flops", f"{steps['student_flops']:.6g}"]
    init = str(out / "student-cold")
    traces = out / "traces.jsonl"
    control = out / "control.jsonl"
    n_traces = len(traces.read_text().splitlines())
    if not ckpt.step_dirs(out / "control"):  # (re)written from the traces the control arm will match
        control.write_text("".join(json.dumps(r) + "\n" for r in control_rows(traces)))
    if n_traces == 0:  # nothing verified-correct to distil: say so in the report rather than train on nothing
        print("[speedrun] distill/control: skipped, rejection sampling kept no correct traces", file=sys.stderr)
    sft = ["--batch-size", "8", "--lr", str(PLAN["distill_lr"]), *budget, *c["seed"]]
    stage("distill", ["sft", "--init", init, "--data", str(traces), "--out", str(out / "distilled"), *sft],
          bool(ckpt.step_dirs(out / "distilled")) or n_traces == 0)
    stage("control", ["sft", "--init", init, "--data", str(control), "--out", str(out / "control"), *sft],
          bool(ckpt.step_dirs(out / "control")) or n_traces == 0)
    stage("student-grpo", ["grpo", "--init", init, "--out", str(out / "student-rl"), "--steps", "100000",
                           *RL_ARGS, *c["task"], *c["seed"], "--eval-every", str(PLAN["rl_eval_every"]),
                           "--eval-n", str(PLAN["rl_eval_n"]), "--save-every", "100000", *budget],
          bool(ckpt.step_dirs(out / "student-rl")))
    stage("onpolicy", ["distill", "--init", init, "--teacher", str(out / "rl"), "--out", str(out / "onpolicy"),
                       "--steps", "100000", "--max-new-tokens", str(RUNGS["rl"]["max_new_tokens"]), "--lr",
                       str(PLAN["onpolicy_lr"]), "--save-every", "100000", *c["task"], *c["seed"], *budget],
          bool(ckpt.step_dirs(out / "onpolicy")))


def _maskable(preset: str, cfg: SpeedrunConfig, flags: list[str]) -> list[str]:
    """--document-mask where the model takes document segments (V3 family, no MTP layers; `mini` and
    `mini-dense`), nothing otherwise (e.g. `--preset small`, which keeps V3's MTP module)."""
    from ..config import get_preset

    m = get_preset(preset, **cfg.model_overrides)
    return flags if m.family_traits.document_segments and not m.n_mtp_layers else []


def _finished(run_dir: Path, steps: int) -> bool:
    dirs = ckpt.step_dirs(run_dir)
    return bool(dirs) and dirs[-1].name == f"step_{steps:06d}"


def _evaluate(runner: StageRunner, out: Path, split: str, cfg: SpeedrunConfig, steps: dict, log: Path) -> bool:
    """`nanoseek eval` of every trained model on one set (held-out or OOD), in one process; each JSON line it
    prints becomes OUT/eval/<split>/<key>.json, so an interrupted evaluation keeps the models it finished.
    Returns whether anything was evaluated."""
    rung = RUNGS["rl"] if split == "heldout" else RUNGS["ood"]
    todo = [m for m in MODELS if not (out / "eval" / split / f"{m.key}.json").exists() and ckpt.step_dirs(out / m.dir)]
    if not todo:
        return False
    (out / "eval" / split).mkdir(parents=True, exist_ok=True)
    n = cfg.eval_n if split == "heldout" else max(1, cfg.eval_n // 2)
    args = ["eval", "--ckpt", *(str(out / m.dir) for m in todo), "--task", "chain_sum", "--task-args",
            json.dumps(rung["task_args"]), "--n", str(n), "--k", str(PLAN["eval_k"]), "--temperature", "0.6",
            "--top-p", "0.95", "--max-new-tokens", str(rung["max_new_tokens"]), "--json", "--seed", str(cfg.seed)]
    print(f"[speedrun] eval on {split}: {' '.join(m.key for m in todo)} …", file=sys.stderr, flush=True)
    with open(log, "a") as f:
        f.write(f"\n$ nanoseek {' '.join(args)}\n")
        start = f.tell()
    lines = out / "eval" / split / "stdout.jsonl"
    lines.unlink(missing_ok=True)
    code = runner.run(args, log, stdout=lines)
    for m, line in zip(todo, lines.read_text().splitlines(keepends=True) if lines.exists() else []):
        if line.endswith("\n"):  # a whole line: that model's evaluation finished
            (out / "eval" / split / f"{m.key}.json").write_text(line)
    lines.unlink(missing_ok=True)
    _check_stage(f"eval on {split}", code, log, start)
    return True


__all__ = ["COMPARISONS", "MODELS", "Model", "SpeedrunConfig", "STUDENT_TOKENS_RULE", "plan", "run"]
