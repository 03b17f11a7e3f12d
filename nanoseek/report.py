"""Plots and tables made from metrics.jsonl and results.json files (never from state inside a script).

`write_speedrun_report(out)` renders a speedrun's results.json (written by stages/speedrun.py, which owns the
stage table and the experiment's design): every score with its clustered standard error, every comparison as a
paired difference with a 95% confidence interval, and the plots. It knows no stage or directory names: the
record names the models, the comparisons and the metrics files behind each curve."""

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


def interval_plot(rows: list[tuple[str, list[tuple[float, float]]]], series_names: list[str], path: str | Path,
                  title: str, xlabel: str) -> Path:
    """Horizontal bars with 95% intervals: rows (label, [(value, se) per series]); one colour per series. Labels sit
    on the y axis, so long model names never overlap."""
    plt, fig, ax = _figure()
    fig.set_size_inches(7.2, 0.5 + 0.42 * len(rows) * max(1, len(series_names)) ** 0.5 + 0.6)
    height = 0.8 / max(1, len(series_names))
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for j, name in enumerate(series_names):
        ys = [i + (j - (len(series_names) - 1) / 2) * height for i in range(len(rows))]
        vals = [r[1][j][0] for r in rows]
        errs = [1.96 * r[1][j][1] if r[1][j][1] == r[1][j][1] else 0 for r in rows]
        ax.barh(ys, vals, height=height * 0.9, xerr=errs, capsize=2, color=colours[j % len(colours)], label=name,
                error_kw={"elinewidth": 0.8})
        for y, v, e in zip(ys, vals, errs):  # the value right of its interval, clear of the error bar
            ax.text(min(v + e, 1.0) + 0.01, y, f"{v:.0%}", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.08)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9, wrap=True)
    ax.grid(axis="x", alpha=0.3)
    if len(series_names) > 1:
        ax.legend(fontsize=8, loc="lower right")
    return _save(plt, fig, path)


def training_curve_plot(runs: dict[str, Path], key: str, path: str | Path, title: str, ylabel: str,
                        window: int = 10, points: str = "") -> Path:
    """Each run's `key` per step as faint raw values and a trailing mean over `window` steps, plus, where the run
    logged it, the held-out `points` key as markers: a reader sees the trend through per-step noise."""
    plt, fig, ax = _figure()
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]
    for i, (label, metrics) in enumerate(runs.items()):
        records = read_metrics(Path(metrics))
        x, y = series(records, key)
        c = colours[i % len(colours)]
        if x:
            ax.plot(x, y, color=c, alpha=0.2, linewidth=0.8)
            ax.plot(x, smooth(y, window), color=c, linewidth=1.6, label=f"{label} ({window}-step mean)")
        if points:
            px, py = series(records, points)
            if px:
                ax.plot(px, py, "o", color=c, markersize=4, markeredgecolor="black", markeredgewidth=0.5,
                        label=f"{label}: held-out")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


# ----------------------------------------------------------------------------- the speedrun's report


def _pct(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.1f}"


def _score(r: dict, key: str) -> str:
    value, se = r.get(key), r.get(f"{key}_se")
    return "-" if value is None else f"{_pct(value)} ± {_pct(se)}"


def _model_rows(results: dict) -> list[str]:
    sets = results["sets"]
    out = ["| model | params (total / active) | trained | wall time: own / with its ancestors | training FLOPs: own "
           f"/ with ancestors | held-out pass@1 (%) | OOD pass@1 (%) | cons@{sets['heldout']['k']} | well-formed "
           "| weights moved |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results["stages"].items():
        moved = r.get("weights_moved")
        out.append(
            f"| {r['label']} (`{key}`) | {r['params_total'] / 1e6:.2f}M / {r['params_active'] / 1e6:.2f}M | "
            f"{r.get('trained', '-')} | {r.get('wall_s', 0):.0f} s / {r.get('wall_s_lineage', 0):.0f} s | "
            f"{r.get('flops', 0):.2e} / {r.get('flops_lineage', 0):.2e} | {_score(r, 'pass1')} | "
            f"{_score(r, 'ood_pass1')} | {_pct(r.get('cons'))} | {_pct(r.get('format'))} | "
            f"{'-' if moved is None else f'{moved:.3f}' + (' **no**' if moved == 0 else '')} |")
    return out


def comparison_sentence(c: dict, sets: dict) -> str:
    """One comparison in words: the paired difference, its interval and whether it excludes zero."""
    where = "held-out" if c["set"] == "heldout" else "out-of-distribution"
    verdict = ("significant: the interval excludes 0" if c["ci_low"] > 0 or c["ci_high"] < 0
               else "not significant: the interval includes 0")
    return (f"{c['claim']} ({where}): {100 * c['diff']:+.1f} points, 95% CI [{100 * c['ci_low']:+.1f}, "
            f"{100 * c['ci_high']:+.1f}] over {c['n']} paired problems; {verdict}.")


def write_speedrun_report(out: str | Path) -> Path:
    """OUT/report.md and OUT/figures/*.png from OUT/results.json."""
    out = Path(out)
    results = json.loads((out / "results.json").read_text())
    sets, stages, figs = results["sets"], results["stages"], out / "figures"
    plots = []
    for name, spec in results.get("curves", {}).items():
        runs = {label: out / m for label, m in spec["runs"].items() if (out / m).exists()}
        if runs:
            plots.append(training_curve_plot(runs, spec["key"], figs / f"{name}.png", spec["title"], spec["ylabel"],
                                             spec.get("window", 10), spec.get("points", "")))
    rows = [(r["label"], [(r.get("pass1", float("nan")), r.get("pass1_se", float("nan"))),
                          (r.get("ood_pass1", float("nan")), r.get("ood_pass1_se", float("nan")))])
            for r in stages.values() if r.get("pass1") is not None]
    if rows:
        plots.append(interval_plot(rows, [f"held-out: {sets['heldout']['what']}", f"OOD: {sets['ood']['what']}"],
                                   figs / "eval.png", f"pass@1 on {results['task']}\n(whiskers: 95% "
                                   "intervals, clustered by problem)", "pass@1 (mean of k samples per problem)"))
    lines = [
        "# nanoseek speedrun report", "",
        f"Task `{results['task']}`. Held-out set: {sets['heldout']['n']} problems of {sets['heldout']['what']} "
        f"({json.dumps(sets['heldout']['task_args'])}), none of whose signed-term multisets is in any training source; "
        f"out-of-distribution (OOD) set: {sets['ood']['n']} problems of {sets['ood']['what']} "
        f"({json.dumps(sets['ood']['task_args'])}), a rung no training stage ever sees. "
        f"{sets['heldout']['k']} samples per problem at temperature {sets['heldout']['temperature']}, top-p "
        f"{sets['heldout']['top_p']}.", "",
        f"Host: {results.get('host', '?')}. {results.get('precision', '')}", "",
        f"Seed {results.get('seed', 0)}, budget {results.get('budget', 1)}; wall time of all stages and evaluations "
        f"{results.get('wall_s_total', 0) / 60:.1f} min.", "",
        "## Models", "",
        *_model_rows(results), "",
        "pass@1 ± its standard error clustered by problem (the k samples of a problem are not independent). "
        "Weights moved: ‖θ − θ_init‖ / ‖θ_init‖ from the checkpoint it started from (0 means the stage changed "
        "nothing).", "",
        "## Comparisons", "",
        "Each a paired difference over the same problems (the per-problem accuracy of a minus that of b), with a "
        "normal 95% interval.", "",
        *[f"- {comparison_sentence(c, sets)}" for c in results.get("comparisons", [])], "",
    ]
    lines += [f"{p}" for p in results.get("notes", [])] + ([""] if results.get("notes") else [])
    lines += ["## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in plots] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
