"""Decoding speed of this checkout's engine against another checkout's (e.g. the previous commit), in one process.

Two benchmark runs a minute apart on a shared 2-core machine differ by 10-20%; a change worth 10% needs a paired
measurement. This loads the other checkout's `nanoseek` package under another name, builds both engines on the
same checkpoint, and alternates them: each pair of runs decodes the same prompts (from the checkpoint's held-out
text, as bench/decode.py takes them), and the ratio of each pair's times is reported with its median and range.

    git worktree add /tmp/prev HEAD~1
    python bench/decode_ab.py --ckpt /tmp/dec/small --other /tmp/prev [--pairs 7]

Cases: batch 1 greedy, batch 1 MTP speculative (8 prompts one at a time, when the checkpoint has an MTP module),
batch 32 greedy, batch 32 at temperature 1 with top-p 0.95. Last line: ratio_b1=… ratio_spec=… ratio_b32=…
ratio_b32_sampled=… (other's time over ours: above 1, this checkout is faster).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from decode import prompts_from  # noqa: E402
from nanoseek.checkpoint import resolve  # noqa: E402

CASES = [("b1", 1, 0.0, False), ("spec", 8, 0.0, True), ("b32", 32, 0.0, False), ("b32_sampled", 32, 1.0, False)]


def load_other(checkout: Path, tmp: Path):
    """The other checkout's package, imported as `nanoseek_other` (its modules import each other relatively)."""
    shutil.copytree(checkout / "nanoseek", tmp / "nanoseek_other", ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(tmp))
    return importlib.import_module("nanoseek_other.checkpoint"), importlib.import_module("nanoseek_other.engine")


def timed(engine, params_cls, prompts, temperature: float, speculative: bool, new: int) -> float:
    params = params_cls(max_new_tokens=new, temperature=temperature, top_p=0.95 if temperature else 1.0)
    t0 = time.perf_counter()
    if speculative:
        for p in prompts:
            engine.generate([p], params, speculative=True)
    else:
        engine.generate(prompts, params)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--other", required=True, help="root of the other checkout (holds nanoseek/)")
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (Path(args.other) / "nanoseek" / "engine.py").exists():
        sys.exit(f"decode_ab: {args.other} has no nanoseek/engine.py")
    torch.set_num_threads(args.threads)
    from nanoseek.checkpoint import load
    from nanoseek.engine import Engine, SamplingParams

    ckpt = resolve(args.ckpt)
    with tempfile.TemporaryDirectory() as d:
        other_ck, other_engine = load_other(Path(args.other), Path(d))
        ours_model, other_model = load(ckpt)[0], other_ck.load(ckpt)[0]
        engines = {"other": (other_engine.Engine(other_model), other_engine.SamplingParams),
                   "ours": (Engine(ours_model), SamplingParams)}
        prompts = prompts_from(ckpt, 32, 32)
        headline = []
        for name, B, temperature, speculative in CASES:
            if speculative and not ours_model.mtp:
                continue
            runs = {k: [] for k in engines}
            for i in range(args.pairs + 1):  # the first pair warms up
                for k, (engine, params) in engines.items():
                    t = timed(engine, params, prompts[:B], temperature, speculative, args.new_tokens)
                    if i:
                        runs[k].append(t)
            ratios = sorted(o / u for o, u in zip(runs["other"], runs["ours"]))
            tokens = B * args.new_tokens
            print(f"{name}: other {tokens / statistics.median(runs['other']):.1f} tokens/s, ours "
                  f"{tokens / statistics.median(runs['ours']):.1f}; other/ours time, median of {len(ratios)} pairs "
                  f"{statistics.median(ratios):.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f})", flush=True)
            headline.append(f"ratio_{name}={statistics.median(ratios):.3f}")
    print(" ".join(headline))


if __name__ == "__main__":
    main()
