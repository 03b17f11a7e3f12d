"""An evaluation's decoding in fp32 and in bf16 at several row counts, with a matmul probe beside `auto`'s choice.

For each row count R (the sequences decoded together: `nanoseek eval`'s n × k), the checkpoint scores R / 4
held-out problems × 4 samples (temperature 0.6, top-p 0.95, 64 new tokens), once in fp32 and once in bf16,
alternating, --reps times; the median times give bf16_speedup. The probe is runtime.bf16_probe (bf16/fp32 matmul
throughput at the model's shapes and R rows), a measurement shown beside what `--precision auto` chooses for R
rows (runtime.resolve, which decides from the hardware and times nothing): where the two disagree with
bf16_speedup, this is the bench that says so (runtime.DECODE_BF16_ROWS). Engines and models are built once, so only
decoding is timed.

    python bench/eval_precision.py --ckpt runs/speedrun/coldstart --out docs/results/eval_precision.md

Last line: rows=… probe=… bf16_speedup=… auto=… (one group per row count)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import publish  # noqa: E402
from nanoseek.engine import Engine  # noqa: E402
from nanoseek.evaluation import evaluate  # noqa: E402
from nanoseek.runtime import bf16_probe, prepare_inference, probe_shapes, resolve, set_threads  # noqa: E402
from nanoseek.checkpoint import load  # noqa: E402
from nanoseek.tasks import get_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="checkpoint or run directory")
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 128, 256, 512, 800])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--task-args", default='{"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}')
    ap.add_argument("--out", help="write the markdown record here")
    a = ap.parse_args()
    set_threads(a.threads)
    task = get_task("chain_sum", **json.loads(a.task_args))
    engines, cfg = {}, None
    for precision in ("fp32", "bf16"):
        model, tokenizer = load(a.ckpt, require_tokenizer=True)
        cfg = model.cfg
        engines[precision] = Engine(prepare_inference(model, resolve("cpu", precision)), tokenizer)
    lines = ["| rows | probe | auto | fp32 s | bf16 s | bf16_speedup | pass@1 fp32 / bf16 |",
             "|---|---|---|---|---|---|---|"]
    heads = []
    for rows in a.rows:
        problems = task.problems(0, max(1, rows // 4), split="heldout")
        times, acc = {"fp32": [], "bf16": []}, {}
        for _ in range(a.reps):
            for precision, engine in engines.items():
                t0 = time.perf_counter()
                r = evaluate(engine, task, problems, k=4, temperature=0.6, top_p=0.95, max_new_tokens=64, seed=0)
                times[precision].append(time.perf_counter() - t0)
                acc[precision] = r["accuracy"]
        probe = bf16_probe(probe_shapes(cfg, rows))["speedup"]
        auto = resolve("cpu", "auto", rows=rows).precision
        f32, b16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
        lines.append(f"| {rows} | {probe}× | {auto} | {f32:.2f} | {b16:.2f} | {f32 / b16:.2f} | "
                     f"{acc['fp32']:.1%} / {acc['bf16']:.1%} |")
        heads.append(f"rows={rows} probe={probe} bf16_speedup={f32 / b16:.2f} auto={auto}")
    preamble = [f"checkpoint: {a.ckpt}; {a.threads} threads; median of {a.reps} alternating runs per precision; "
                f"auto: {resolve('cpu', 'auto', rows=max(a.rows)).reason}", ""]
    publish("bench/eval_precision.py", lines, " ".join(heads), a.out, preamble)


if __name__ == "__main__":
    main()
