"""Plots and tables made from metrics.jsonl files (never from state inside a script)."""

from __future__ import annotations

import json
from pathlib import Path

from .metrics import read_metrics


def series(records: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, y) of every record that has `key`."""
    pts = [(r[x], r[key]) for r in records if key in r and r[key] == r[key]]
    return [p[0] for p in pts], [p[1] for p in pts]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (window 1: unchanged)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(6.4, 3.8), dpi=120)


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def line_plot(curves: dict[str, tuple[list[float], list[float]]], path: str | Path, title: str,
              xlabel: str = "step", ylabel: str = "", logy: bool = False) -> Path:
    """One PNG with a line per labelled (x, y) curve."""
    plt, fig, ax = _figure()
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label, linewidth=1.4)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    return _save(plt, fig, path)


def plot_runs(runs: dict[str, str | Path], key: str, path: str | Path, title: str, window: int = 1,
              ylabel: str = "", logy: bool = False) -> Path:
    """Plot `key` from each run directory's metrics.jsonl, optionally smoothed."""
    curves = {}
    for label, run_dir in runs.items():
        x, y = series(read_metrics(Path(run_dir) / "metrics.jsonl"), key)
        curves[label] = (x, smooth(y, window))
    return line_plot(curves, path, title, ylabel=ylabel or key, logy=logy)


def summary(run_dir: str | Path, tail: float = 0.2) -> dict:
    """Final held-out numbers and means over the last `tail` of training steps."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    if not records:
        return {}
    start = records[-1]["step"] * (1 - tail)
    last = [r for r in records if r["step"] > start]

    def mean(key):
        vals = [r[key] for r in last if key in r]
        return sum(vals) / len(vals) if vals else float("nan")

    final_eval = next((r for r in reversed(records) if "heldout_loss" in r), {})
    # RL runs log no token count; pretraining runs do
    return {"steps": records[-1]["step"], "tokens": records[-1].get("tokens", 0), "loss_tail": mean("loss"),
            "maxvio_tail": mean("maxvio"), "tokens_per_s": mean("tokens_per_s"), "mfu": mean("mfu"),
            "heldout_loss": final_eval.get("heldout_loss", float("nan")),
            "heldout_mtp_loss": final_eval.get("heldout_mtp_loss", float("nan")),
            "heldout_maxvio": final_eval.get("heldout_maxvio", float("nan"))}


def bar_plot(values: dict[str, float], path: str | Path, title: str, ylabel: str = "") -> Path:
    """One PNG bar per labelled fraction, annotated in percent."""
    plt, fig, ax = _figure()
    bars = ax.bar(list(values), list(values.values()), color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:.0%}" for v in values.values()], fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, max(1.0, max(values.values(), default=0) * 1.15))
    ax.tick_params(axis="x", labelsize=8)
    return _save(plt, fig, path)


def _stage_row(out: Path, name: str, label: str, timing_key: str, timings: dict) -> str:
    from .checkpoint import read_config
    from .stats import param_counts

    run_dir = out / name
    if not run_dir.exists():
        return f"| {label} | - | skipped (no verified-correct traces to train on) | - | - | - | - | - | - |"
    counts = param_counts(read_config(run_dir))
    records = read_metrics(run_dir / "metrics.jsonl")
    ev = json.loads((out / "eval" / f"{name}.json").read_text()) if (out / "eval" / f"{name}.json").exists() else {}
    last = records[-1] if records else {}
    if "tokens" in last and "heldout_loss" in last:  # pretraining
        trained, metric = f"{last['tokens'] / 1e6:.2f}M tokens", f"held-out loss {last['heldout_loss']:.3f}"
    elif records and "reward" in last:  # GRPO
        steps = sum(1 for r in records if "reward" in r)
        trained = f"{steps} RL steps"
        metric = f"reward {sum(r['reward'] for r in records[-5:] if 'reward' in r) / 5:.2f} (last 5)"
    elif records:  # SFT
        trained = f"{sum(r.get('tokens', 0) for r in records) / 1e3:.0f}K target tokens"
        metric = f"loss {last.get('loss', float('nan')):.3f}"
    else:
        trained, metric = "-", "-"
    wall = timings.get(timing_key)
    return (f"| {label} | {counts['total_params'] / 1e6:.1f}M / {counts['active_params'] / 1e6:.1f}M | {trained} | "
            f"{f'{wall:.0f}s' if wall else '-'} | {metric} | {ev.get('accuracy', float('nan')):.1%} | "
            f"{ev.get('cons_at_k', float('nan')):.1%} | {ev.get('format', float('nan')):.0%} | "
            f"{ev.get('mean_response_tokens', float('nan')):.0f} |")


def _runtime_of(out: Path, name: str) -> dict | None:
    """The precision choice a stage recorded: pretraining's runtime.json, the other stages' run.json "runtime"."""
    path = out / name / "runtime.json"
    if path.exists():
        return json.loads(path.read_text())
    path = out / name / "run.json"
    return json.loads(path.read_text()).get("runtime") if path.exists() else None


def precision_line(out: Path) -> str:
    """One line: every training stage's and evaluation's compute precision and the probe's bf16/fp32 speedup
    behind an `auto` choice (runtime.resolve), from the files the stages wrote."""
    parts = []
    for name in ("base", "student-base", "coldstart", "rl", "distilled", "student-rl"):
        rt = _runtime_of(out, name)
        if rt:
            speedup = rt.get("probe", {}).get("speedup")
            parts.append(f"{TRAINED_BY[name]} {rt['precision']}" + (f" (probe {speedup}×)" if speedup else ""))
    evals = [json.loads(p.read_text()).get("runtime") for p in sorted(out.glob("eval/*.json"))]
    evals = [e for e in evals if e]
    if evals:
        # one probe per evaluation process (a resumed speedrun may have had several): each distinct figure once
        speedups = ", ".join(dict.fromkeys(str(e["probe"]["speedup"]) for e in evals
                                           if e.get("probe", {}).get("speedup")))
        parts.append(f"evaluations {'/'.join(sorted({e['precision'] for e in evals}))}"
                     + (f" (probe {speedups}× at their decoding rows)" if speedups else ""))
    if not parts:
        return ""
    from .runtime import LARGE_ROWS, MIN_SPEEDUP, MIN_SPEEDUP_TRAINING

    return (f"Compute precision (`--precision auto`: bf16 where a probe of this machine's matmuls measures it "
            f"faster than fp32 by at least {MIN_SPEEDUP_TRAINING}× for training and for decoding {LARGE_ROWS} rows "
            f"or more, {MIN_SPEEDUP}× for decoding fewer): "
            + "; ".join(parts) + ".")


TRAINED_BY = {"base": "pretrain", "coldstart": "coldstart", "rl": "grpo", "student-base": "student-pretrain",
              "distilled": "distill", "student-rl": "student-grpo"}  # checkpoint directory -> its speedrun stage


def write_speedrun_report(out: str | Path, cfg: dict, stages: list[tuple[str, str, str]], timings: dict) -> Path:
    """DIR/report.md: one table of every stage and the plots, all made from the stages' own output files.
    stages: (results key, checkpoint directory, label) of each evaluated model, in the table's order."""
    out = Path(out)
    figs = out / "figures"
    plots = [
        plot_runs({"teacher (MoE)": out / "base", "student (dense)": out / "student-base"}, "loss",
                  figs / "pretrain_loss.png", "Pretraining loss", window=5),
        plot_runs({"teacher": out / "base"}, "maxvio", figs / "expert_balance.png",
                  "Expert-load MaxVio (mean over MoE layers)", window=5),
        plot_runs({"teacher": out / "rl", "student": out / "student-rl"}, "reward", figs / "rl_reward.png",
                  "GRPO reward per step", window=3),
        plot_runs({"teacher": out / "rl", "student": out / "student-rl"}, "accuracy", figs / "rl_accuracy.png",
                  "GRPO rollout accuracy per step", window=3),
        plot_runs({"teacher": out / "rl", "student": out / "student-rl"}, "response_len",
                  figs / "rl_length.png", "GRPO mean response length (tokens)", window=3),
    ]
    evals = {label: json.loads((out / "eval" / f"{name}.json").read_text())["accuracy"]
             for _, name, label in stages if (out / "eval" / f"{name}.json").exists()}
    plots.append(bar_plot(evals, figs / "eval.png", f"Held-out pass@1 on {cfg['task']}"))
    total = sum(timings.values())
    distilled, student_rl = evals.get("student distilled"), evals.get("student + GRPO")
    lines = [
        "# nanoseek speedrun report", "",
        f"Task `{cfg['task']}` {json.dumps(cfg['task_args'])}; teacher `{cfg['preset']}`, student `{cfg['student']}`; "
        f"budget {cfg['budget']}; wall time of all stages{' and evaluations' if 'eval' in timings else ''} "
        f"{total / 60:.1f} min.", "",
        "| stage | params (total / active) | trained on | wall time | final training metric | held-out pass@1 "
        "| cons@4 | well-formed | response tokens |",
        "|---|---|---|---|---|---|---|---|---|",
        *[_stage_row(out, name, label, TRAINED_BY.get(name, name), timings) for _, name, label in stages], "",
        f"pass@1 and cons@4: {cfg['eval_n']} held-out problems (listed in heldout.jsonl; none of their questions "
        "is in any training source), 4 samples each at temperature 0.6, top-p 0.95. results.json has the same "
        "numbers.", "",
    ]
    precision = precision_line(out)
    lines += [precision, ""] if precision else []
    n_traces = len((out / "traces.jsonl").read_text().splitlines()) if (out / "traces.jsonl").exists() else 0
    lines += [f"Rejection sampling kept {n_traces} verified-correct, well-formed traces.", ""]
    if student_rl is not None:
        distilled_text = f"{distilled:.1%}" if distilled is not None else "not trained (no traces)"
        lines += [f"**The R1 comparison.** The same student, for the same wall time "
                  f"({timings.get('sample', 0) + timings.get('distill', 0):.0f}s): distilled from the RL teacher's "
                  f"traces {distilled_text} vs trained by GRPO directly {student_rl:.1%}.", ""]
    lines += [f"![{p.stem}](figures/{p.name})" for p in plots] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
