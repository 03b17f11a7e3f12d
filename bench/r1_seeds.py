"""The speedrun as an experiment over seeds: the whole pipeline for each seed, then the mean ± sd of every model's
held-out and OOD pass@1 and of every paired comparison, written to docs/results/r1-seeds.md.

One run is one draw: its clustered standard errors say how well it measured its own models, not how much the
recipe varies from seed to seed (pretraining data order, initialisation, sampling). The README quotes these means.

    python bench/r1_seeds.py --seeds 0 1 2 --out runs/seeds          # ~3 × the speedrun's time
    python bench/r1_seeds.py --out runs/seeds --summarize-only       # re-read finished runs, rewrite the record

Each seed runs `nanoseek speedrun --seed S --out OUT/seed-S` (finished stages are skipped, so an interrupted
sweep resumes). The record names the host and the precision each run recorded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    m = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{100 * m:.1f} ± {100 * sd:.1f}"


def summarize(runs: dict[int, dict]) -> str:
    """Markdown: per-model mean ± sd over seeds, per comparison the mean difference and each seed's 95% CI."""
    seeds = sorted(runs)
    first = runs[seeds[0]]
    rows = ["| model | held-out pass@1 (mean ± sd) | OOD pass@1 | per seed held-out (± clustered SE) | weights moved |",
            "|---|---|---|---|---|"]
    for key, r in first["stages"].items():
        held = [runs[s]["stages"][key]["pass1"] for s in seeds if key in runs[s]["stages"]]
        ood = [runs[s]["stages"][key].get("ood_pass1") for s in seeds if key in runs[s]["stages"]]
        per = ", ".join(f"{100 * runs[s]['stages'][key]['pass1']:.1f} ± {100 * runs[s]['stages'][key]['pass1_se']:.1f}"
                        for s in seeds if key in runs[s]["stages"])
        moved = ", ".join(f"{runs[s]['stages'][key]['weights_moved']:.3f}" if runs[s]["stages"][key].get(
            "weights_moved") is not None else "–" for s in seeds if key in runs[s]["stages"])
        rows.append(f"| {r['label']} (`{key}`) | {_mean_sd(held)} | {_mean_sd([x for x in ood if x is not None])} "
                    f"| {per} | {moved} |")
    comps = ["| comparison (a − b) | set | mean diff | per seed: diff [95% CI] | seeds with CI > 0 |", "|---|---|---|---|---|"]
    for c in first["comparisons"]:
        same = [next(x for x in runs[s]["comparisons"] if (x["a"], x["b"], x["set"]) == (c["a"], c["b"], c["set"]))
                for s in seeds]
        per = "; ".join(f"{100 * x['diff']:+.1f} [{100 * x['ci_low']:+.1f}, {100 * x['ci_high']:+.1f}]" for x in same)
        above = sum(x["ci_low"] > 0 for x in same)
        comps.append(f"| {c['a']} − {c['b']} | {c['set']} | {100 * statistics.fmean(x['diff'] for x in same):+.1f} "
                     f"| {per} | {above} of {len(same)} |")
    walls = [runs[s]["wall_s_total"] / 60 for s in seeds]
    return "\n".join([
        f"Seeds {', '.join(map(str, seeds))}; host: {first['host']}.", "",
        f"{first['precision']}", "",
        f"Held-out set: {first['sets']['heldout']['n']} problems of {first['sets']['heldout']['what']}; OOD set: "
        f"{first['sets']['ood']['n']} problems of {first['sets']['ood']['what']}; k = {first['sets']['heldout']['k']}"
        f" samples per problem at T = {first['sets']['heldout']['temperature']}. Wall time per run (stages + "
        f"evaluations, without install): {', '.join(f'{w:.1f}' for w in walls)} min.", "",
        "pass@1 in %, mean ± sd over seeds:", "", *rows, "",
        "Paired differences in points (per-problem, same problems within a seed):", "", *comps, ""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="example: python bench/r1_seeds.py --seeds 0 1 2 --out runs/seeds",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/seeds", help="one speedrun directory per seed is made here")
    ap.add_argument("--record", default=str(ROOT / "docs" / "results" / "r1-seeds.md"))
    ap.add_argument("--summarize-only", action="store_true", help="only re-read finished runs")
    ap.add_argument("speedrun_args", nargs="*", help="extra `nanoseek speedrun` flags, after --")
    a = ap.parse_args()
    out = Path(a.out)
    runs = {}
    for seed in a.seeds:
        run_dir = out / f"seed-{seed}"
        if not a.summarize_only:
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "nanoseek", "speedrun", "--out", str(run_dir), "--seed", str(seed),
                   *a.speedrun_args]
            print(f"[r1_seeds] seed {seed}: {' '.join(cmd)}", file=sys.stderr, flush=True)
            if subprocess.call(cmd) != 0:
                print(f"r1_seeds: seed {seed} failed (see {run_dir}/speedrun.log)", file=sys.stderr)
                return 1
            print(f"[r1_seeds] seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        path = run_dir / "results.json"
        if path.exists():
            runs[seed] = json.loads(path.read_text())
    if not runs:
        print(f"r1_seeds: no finished run under {out}", file=sys.stderr)
        return 2
    body = summarize(runs)
    record = Path(a.record)
    head = (f"# The speedrun over seeds\n\nRecorded {datetime.date.today()} by\n`python bench/r1_seeds.py --seeds "
            f"{' '.join(map(str, sorted(runs)))} --out {a.out}`.\n\n")
    record.write_text(head + body)
    print(body)
    print(f"[r1_seeds] wrote {record}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
