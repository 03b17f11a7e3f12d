"""One SFT step on packed rows (the speedrun's cold start and distillation): blockwise segment attention vs one
masked SDPA call per row, the speedrun's two models, steps alternating in one run.

SFT packs samples into rows of the context (sft.pack) and masks attention to each sample. `segment_attention`
(nanoseek/packed_attention.py) computes only the keys a block of queries can see; `masked_sdpa` (its reference,
and what the model ran before) computes the whole row under a mask. The samples here are random tokens with the
length spread of the speedrun's traces (50-85 tokens, the first 20 a prompt without loss), packed as `sft` packs
them, 8 rows per step, at the stage's own precision choice (--precision, default auto).

    python bench/sft_step.py --steps 6 --out docs/results/sft_step.md

Last line: small_speedup=… small_dense_speedup=… (masked-SDPA step time over segment-attention step time)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import publish  # noqa: E402
from nanoseek import kernels as model_module  # noqa: E402  (where the model looks up its packed-attention kernel)
from nanoseek.config import get_preset  # noqa: E402
from nanoseek.generations import build_model  # noqa: E402
from nanoseek.optim import build_optimizer  # noqa: E402
from nanoseek.packed_attention import masked_sdpa, segment_attention  # noqa: E402
from nanoseek.runtime import prepare_for_training, resolve, set_threads  # noqa: E402
from nanoseek.stages.sft import _batch, _losses, pack  # noqa: E402


def packed_batches(vocab: int, seq_len: int, rows: int, n: int, seed: int = 0) -> list[dict]:
    r = random.Random(seed)
    samples = []
    while len(samples) < n * rows * 8:
        length = r.randint(50, 85)
        ids = [r.randrange(4, vocab) for _ in range(length)]
        samples.append((ids[:20], ids[20:]))
    packed = pack(samples, seq_len, 0)
    return [_batch(packed[i * rows:(i + 1) * rows]) for i in range(n)]


def step_fn(model, forward, opt):
    params = [p for p in model.parameters() if p.requires_grad]

    def step(b: dict) -> float:
        t0 = time.perf_counter()
        ce, _ = _losses(forward, None, b, 1.0)
        ce.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step


def race(preset: str, args) -> tuple[dict, str, float]:
    """Median step seconds per attention form, the precision used, mean tokens per row."""
    torch.manual_seed(0)
    cfg = get_preset(preset)
    model = build_model(cfg)
    model.mtp.requires_grad_(False)  # as sft trains
    rt = resolve("cpu", args.precision, training=True)
    forward, opt = prepare_for_training(model, rt), build_optimizer(model, 1e-4, weight_decay=0.0)
    data = packed_batches(cfg.vocab_size, cfg.max_seq_len, args.rows, 4, args.seed)
    fill = statistics.mean(float((b["segments"] >= 0).float().mean()) for b in data) * cfg.max_seq_len
    forms = {"segment": segment_attention, "masked": masked_sdpa}
    step, times = step_fn(model, forward, opt), {name: [] for name in forms}
    try:
        for i in range(args.steps + 1):
            for name, fn in forms.items():
                model_module.segment_attention = fn
                dt = step(data[i % len(data)])
                if i:  # the first round builds oneDNN kernels
                    times[name].append(dt)
    finally:
        model_module.segment_attention = segment_attention
    return {k: statistics.median(v) for k, v in times.items()}, rt.precision, fill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="measured steps per form (after one warm-up round)")
    ap.add_argument("--rows", type=int, default=8, help="packed rows per step (the speedrun's --batch-size)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: all this process may use)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the markdown record here")
    args = ap.parse_args()
    args.threads = set_threads(args.threads)
    lines = [f"{args.rows} packed rows per step, {args.threads} threads, steps alternating; median of {args.steps}",
             "", "| model | precision | tokens per row | masked SDPA step (ms) | segment attention step (ms) | "
             "speedup |", "|---|---|---|---|---|---|"]
    speedups = {}
    for preset in ("small", "small-dense"):
        t, precision, fill = race(preset, args)
        speedups[preset] = t["masked"] / t["segment"]
        lines.append(f"| {preset} | {precision} | {fill:.0f} | {t['masked'] * 1e3:.0f} | {t['segment'] * 1e3:.0f} | "
                     f"{speedups[preset]:.2f}× |")
    headline = " ".join(f"{p.replace('-', '_')}_speedup={s:.2f}" for p, s in speedups.items())
    publish("SFT step on packed rows: segment attention vs one masked SDPA", lines, headline, args.out)


if __name__ == "__main__":
    main()
