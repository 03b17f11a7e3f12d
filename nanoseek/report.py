"""Plots and tables made from metrics.jsonl files (never from state inside a script)."""

from __future__ import annotations

from pathlib import Path

from .stages.common import read_metrics


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


def line_plot(curves: dict[str, tuple[list[float], list[float]]], path: str | Path, title: str,
              xlabel: str = "step", ylabel: str = "", logy: bool = False) -> Path:
    """One PNG with a line per labelled (x, y) curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


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
    return {"steps": records[-1]["step"], "tokens": records[-1]["tokens"], "loss_tail": mean("loss"),
            "maxvio_tail": mean("maxvio"), "tokens_per_s": mean("tokens_per_s"), "mfu": mean("mfu"),
            "heldout_loss": final_eval.get("heldout_loss", float("nan")),
            "heldout_mtp_loss": final_eval.get("heldout_mtp_loss", float("nan")),
            "heldout_maxvio": final_eval.get("heldout_maxvio", float("nan"))}
