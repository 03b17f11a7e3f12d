"""Where a decode step's time goes: wall time per part of the model, at batch 1 and batch 32, from a checkpoint.

A profile, not a race: it times nanoseek's engine alone (bench/decode.py races transformers). Greedy decoding of
--new-tokens after prompts of --prompt-len tokens from the checkpoint's held-out text; the time of one decode step is
(time of N + 2 new tokens − time of 2) / N, so prefill cancels out. Each part is timed by forward pre/post hooks
on its modules (attention, MoE and its routed experts, gate and shared expert, dense FFN, norms, head), summed over
the same difference of two runs; "rest" is the step minus its top-level parts (embedding, sampling, the engine's
bookkeeping). The hooks themselves add a few µs per module call, so the parts are upper bounds.

    python bench/decode_profile.py --ckpt runs/speedrun/coldstart [--precision auto] [--threads 2]

Last line: step_ms_b1=… step_ms_b32=… experts_share_b32=…
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decode import prompts_from  # noqa: E402
from nanoseek import load  # noqa: E402
from nanoseek.checkpoint import CheckpointError, resolve as resolve_checkpoint  # noqa: E402
from nanoseek.engine import Engine, SamplingParams  # noqa: E402
from nanoseek.runtime import prepare_inference, resolve  # noqa: E402

TOP = ("attention", "MoE", "dense FFN", "norms", "head")  # the parts that do not nest in one another


class PartTimer:
    """Accumulates wall time per named part while `on`, from hooks around each module's forward."""

    def __init__(self):
        self.seconds, self.on = defaultdict(float), False

    def watch(self, name: str, module: torch.nn.Module) -> None:
        starts = []
        module.register_forward_pre_hook(lambda m, a: starts.append(time.perf_counter()))

        def done(m, a, out):
            t0 = starts.pop()
            if self.on:
                self.seconds[name] += time.perf_counter() - t0
        module.register_forward_hook(done)

    def run(self, fn) -> tuple[float, dict]:
        self.seconds.clear()
        self.on, t0 = True, time.perf_counter()
        fn()
        elapsed, self.on = time.perf_counter() - t0, False
        return elapsed, dict(self.seconds)


def watch_model(model, timer: PartTimer) -> None:
    for layer in model.layers:
        timer.watch("attention", layer.attn)
        timer.watch("norms", layer.attn_norm)
        timer.watch("norms", layer.ffn_norm)
        moe = getattr(layer.ffn, "experts", None) is not None
        timer.watch("MoE" if moe else "dense FFN", layer.ffn)
        if moe:
            timer.watch("MoE: routed experts", layer.ffn.experts)
            timer.watch("MoE: gate", layer.ffn.gate)
            if layer.ffn.shared_experts is not None:
                timer.watch("MoE: shared expert", layer.ffn.shared_experts)
    timer.watch("norms", model.norm)
    timer.watch("head", model.head)


def profile(engine: Engine, timer: PartTimer, prompts, new: int) -> tuple[float, dict]:
    """(seconds per decode step, {part: seconds per decode step}), the best of 3 pairs of runs."""
    def gen(n):
        return lambda: engine.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0))
    gen(new + 2)()  # warm-up
    best = None
    for _ in range(3):
        t_long, parts_long = timer.run(gen(new + 2))
        t_short, parts_short = timer.run(gen(2))
        step = (t_long - t_short) / new
        if best is None or step < best[0]:
            best = (step, {k: (v - parts_short.get(k, 0.0)) / new for k, v in parts_long.items()})
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="a run directory or checkpoint (as bench/decode.py)")
    ap.add_argument("--precision", default="auto", help="auto (measured at the batch-32 rows), fp32 or bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        ckpt = resolve_checkpoint(args.ckpt)
    except CheckpointError as e:  # one line, exit 2
        print(f"decode_profile: {e}", file=sys.stderr)
        sys.exit(2)
    model, _ = load(ckpt)
    rt = resolve("cpu", args.precision, rows=32)
    model = prepare_inference(model, rt).eval()
    timer = PartTimer()
    watch_model(model, timer)
    engine = Engine(model)
    print(f"checkpoint: {ckpt}; {rt.precision}, {args.threads} threads; greedy, prompts of {args.prompt_len} "
          f"tokens, {args.new_tokens} timed decode steps\n")
    print("| part | batch 1 (ms) | share | batch 32 (ms) | share |\n|---|---|---|---|---|")
    results = {b: profile(engine, timer, prompts_from(ckpt, b, args.prompt_len), args.new_tokens) for b in (1, 32)}
    for b, (step, parts) in results.items():
        parts["rest"] = step - sum(parts.get(k, 0.0) for k in TOP)
    names = [k for k in ("attention", "MoE", "MoE: routed experts", "MoE: gate", "MoE: shared expert", "dense FFN",
                         "norms", "head", "rest") if k in results[32][1]]
    for k in names:
        cells = [f"{results[b][1][k] * 1e3:.2f} | {results[b][1][k] / results[b][0]:.0%}" for b in (1, 32)]
        print(f"| {k} | {' | '.join(cells)} |")
    step1, step32 = results[1][0], results[32][0]
    print(f"| **step** | **{step1 * 1e3:.2f}** ({1 / step1:.0f} tokens/s) | | **{step32 * 1e3:.2f}** "
          f"({32 / step32:.0f} tokens/s) | |\n")
    share = results[32][1].get("MoE: routed experts", 0.0) / step32
    print(f"step_ms_b1={step1 * 1e3:.2f} step_ms_b32={step32 * 1e3:.2f} experts_share_b32={share:.2f}")


if __name__ == "__main__":
    main()
