"""Decoding speed: nanoseek's engine vs transformers' `generate`, same weights (via save_hf), same prompts, one run.

Greedy decoding of --new-tokens tokens after prompts of --prompt-len tokens taken from the checkpoint's held-out
text, at batch 1 and batch 32, end to end (prefill included) and without early stopping on either side. Also:
cache bytes per token (ours: the latent cache; transformers: its DynamicCache after generation), and MTP
speculative decoding (greedy, batch 1) against plain decoding: draft acceptance and speedup. --precision
(default auto: bf16 where measured faster) sets both: ours via runtime.prepare_inference (bf16 weights, fp32
router, bf16 latent cache), transformers loaded with from_pretrained(dtype=...), its best inference setting.

    python bench/decode.py --ckpt runs/evidence/aux-free [--precision auto] [--out docs/results/decode.md]

Last line: ratio_b1=… ratio_b32=… cache_bytes_per_token=… acceptance=… spec_speedup=…
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import publish  # noqa: E402
from nanoseek import load  # noqa: E402
from nanoseek.checkpoint import resolve as resolve_checkpoint  # noqa: E402
from nanoseek.engine import Engine, SamplingParams  # noqa: E402
from nanoseek.hf import save_hf  # noqa: E402
from nanoseek.runtime import prepare_inference, resolve  # noqa: E402


def prompts_from(ckpt: Path, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens from the run's held-out stream (random tokens if there is none)."""
    stream_file = ckpt.parent.parent / "data" / "heldout.npy"
    if stream_file.exists():
        stream = np.load(stream_file)
        starts = np.linspace(0, len(stream) - length - 1, n).astype(int)
        return [stream[s:s + length].tolist() for s in starts]
    gen = torch.Generator().manual_seed(0)
    return torch.randint(10, 1000, (n, length), generator=gen).tolist()


def time_ours(engine: Engine, prompts, new: int, speculative: bool = False, reps: int = 3):
    params = SamplingParams(max_new_tokens=new, temperature=0)
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = engine.generate(prompts, params, speculative=speculative)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def time_hf(model, prompts, new: int, reps: int = 3):
    ids = torch.tensor(prompts)
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="runs/evidence/aux-free")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--precision", default="auto", help="auto (measured at 32 rows), fp32 or bf16, for both libraries")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    ckpt = resolve_checkpoint(args.ckpt)
    model, _ = load(ckpt)
    rt = resolve("cpu", args.precision, rows=32)  # auto: decided at the batch-32 headline's rows
    with tempfile.TemporaryDirectory() as d:
        save_hf(model, d)
        theirs = AutoModelForCausalLM.from_pretrained(d, dtype=rt.dtype).eval()
    model = prepare_inference(model, rt)
    engine = Engine(model)  # token ids in and out: no eos stop, like transformers with eos_token_id=None
    rows, ratios = [], {}
    for batch in (1, 32):
        prompts = prompts_from(ckpt, batch, args.prompt_len)
        t_ours, out = time_ours(engine, prompts, args.new_tokens)
        t_hf, hf_out = time_hf(theirs, prompts, args.new_tokens)
        hf_tokens = hf_out.sequences[:, args.prompt_len:].tolist()
        agree = np.mean([a == b for g, h in zip(out, hf_tokens) for a, b in zip(g.tokens, h)])
        n_new = batch * args.new_tokens
        ratios[batch] = t_hf / t_ours
        rows.append(f"| {batch} | {n_new / t_ours:.1f} | {n_new / t_hf:.1f} | {ratios[batch]:.2f} | {agree:.1%} |")
        if batch == 32:
            cache = hf_out.past_key_values
            hf_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
            hf_per_token = hf_bytes / (batch * (args.prompt_len + args.new_tokens - 1))
    ours_per_token = model.new_cache(1, 1).bytes_per_token()
    spec_prompts = prompts_from(ckpt, 8, args.prompt_len)
    t_plain = sum(time_ours(engine, [p], args.new_tokens)[0] for p in spec_prompts)
    accepted = drafted = 0
    t_spec = 0.0
    for p in spec_prompts:
        t, out = time_ours(engine, [p], args.new_tokens, speculative=True)
        t_spec += t
        accepted, drafted = accepted + out.stats.accepted, drafted + out.stats.drafted
    acceptance, speedup = accepted / max(drafted, 1), t_plain / t_spec
    lines = [
        f"checkpoint: {ckpt}; prompts of {args.prompt_len} tokens from held-out text; {args.new_tokens} new "
        f"tokens, greedy, {rt.precision} (--precision {args.precision}), {args.threads} threads; transformers "
        f"{type(theirs).__name__}.generate in {rt.precision}",
        "", "| batch | nanoseek tokens/s | transformers tokens/s | ratio | same tokens |", "|---|---|---|---|---|",
        *rows, "",
        f"Cache bytes per token ({rt.precision}): nanoseek {ours_per_token:,} (= n_layers × (kv_lora_rank + "
        f"qk_rope_head_dim) × {model.head.weight.element_size()}); transformers' DynamicCache {hf_per_token:,.0f}.",
        f"MTP speculative decoding (batch 1, greedy, {len(spec_prompts)} prompts): acceptance {acceptance:.1%}, "
        f"speedup {speedup:.2f}× over plain decoding (outputs identical by construction, tested).",
    ]
    headline = (f"ratio_b1={ratios[1]:.2f} ratio_b32={ratios[32]:.2f} cache_bytes_per_token={ours_per_token} "
                f"acceptance={acceptance:.3f} spec_speedup={speedup:.2f}")
    publish("bench/decode.py", lines, headline, args.out)


if __name__ == "__main__":
    main()
