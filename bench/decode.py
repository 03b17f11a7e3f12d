"""Decoding speed: nanoseek's engine vs transformers' `generate`, same weights (via save_hf), same prompts, one run.

Greedy decoding of --new-tokens tokens after prompts of --prompt-len tokens taken from the checkpoint's held-out
text, at batch 1 and batch 32, end to end (prefill included) and without early stopping on either side. Also:
cache bytes per token (ours: the latent cache; transformers: its DynamicCache after generation), and MTP
speculative decoding (greedy, batch 1) against plain decoding: draft acceptance and speedup. --precision
(default auto: bf16 where measured faster) sets both: ours via runtime.prepare_inference (bf16 weights, fp32
router, bf16 latent cache), transformers loaded with from_pretrained(dtype=...), its best inference setting.

Also in the same run: our engine with the model's own cached forward (`Engine(decode="reference")`, what the folded
decode step replaced), so the step's gain is a ratio of one run; with --compile, the torch.compile'd step too. The
bound: at batch 1 a token must read every active weight once, so memory bandwidth (measured here by a large copy)
over the bytes of those weights bounds tokens/s; the fraction of it reached is printed.

    python bench/decode.py --ckpt runs/evidence/aux-free [--precision auto] [--compile] [--out docs/results/decode.md]

Last line: ratio_b1=… ratio_b32=… vs_reference_b1=… vs_reference_b32=… bound_fraction_b1=…
cache_bytes_per_token=… acceptance=… spec_speedup=…
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
from nanoseek.stats import param_counts  # noqa: E402


def copy_bandwidth(mbytes: int = 256, reps: int = 5) -> float:
    """Bytes/s of the best of `reps` copies of an mbytes buffer (each reads and writes it: 2 × mbytes moved)."""
    a = torch.ones(mbytes * 2**20 // 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best


def weight_bytes_per_token(model) -> int:
    """Bytes of the weights one token reads: the active parameters less the embedding table (one row is read)."""
    counts = param_counts(model.cfg)
    return (counts["active_params"] - counts["embedding_params"] + model.cfg.dim) * model.head.weight.element_size()


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
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd decode step (compiles first)")
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
    others = {"reference": Engine(model, decode="reference")}
    if args.compile:
        others["compiled"] = Engine(model, decode="compiled")
        t0 = time.perf_counter()
        for batch in (1, 32):  # compile both graphs (batch 1 is specialised) before timing
            others["compiled"].generate(prompts_from(ckpt, batch, args.prompt_len), SamplingParams(max_new_tokens=4))
        compile_s = time.perf_counter() - t0
    rows, ratios, vs = [], {}, {name: {} for name in others}
    for batch in (1, 32):
        prompts = prompts_from(ckpt, batch, args.prompt_len)
        t_ours, out = time_ours(engine, prompts, args.new_tokens)
        t_hf, hf_out = time_hf(theirs, prompts, args.new_tokens)
        hf_tokens = hf_out.sequences[:, args.prompt_len:].tolist()
        agree = np.mean([a == b for g, h in zip(out, hf_tokens) for a, b in zip(g.tokens, h)])
        n_new = batch * args.new_tokens
        ratios[batch] = t_hf / t_ours
        cells = []
        for name, other in others.items():
            t_other, other_out = time_ours(other, prompts, args.new_tokens)
            same = np.mean([a == b for g, h in zip(out, other_out) for a, b in zip(g.tokens, h.tokens)])
            vs[name][batch] = t_other / t_ours
            cells.append(f"{n_new / t_other:.1f} ({same:.0%} same)")
        rows.append(f"| {batch} | {n_new / t_ours:.1f} | {' | '.join(cells)} | {n_new / t_hf:.1f} | "
                    f"{ratios[batch]:.2f} | {agree:.1%} |")
        if batch == 1:
            b1_tokens_s = n_new / t_ours
        if batch == 32:
            cache = hf_out.past_key_values
            hf_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
            hf_per_token = hf_bytes / (batch * (args.prompt_len + args.new_tokens - 1))
    bandwidth, read = copy_bandwidth(), weight_bytes_per_token(model)
    bound = bandwidth / read
    ours_per_token = model.new_cache(1, 1).bytes_per_token()
    acceptance = speedup = float("nan")
    if model.cfg.n_mtp_layers:  # speculative decoding drafts with the MTP module
        spec_prompts = prompts_from(ckpt, 8, args.prompt_len)
        t_plain = sum(time_ours(engine, [p], args.new_tokens)[0] for p in spec_prompts)
        accepted = drafted = 0
        t_spec = 0.0
        for p in spec_prompts:
            t, out = time_ours(engine, [p], args.new_tokens, speculative=True)
            t_spec += t
            accepted, drafted = accepted + out.stats.accepted, drafted + out.stats.drafted
        acceptance, speedup = accepted / max(drafted, 1), t_plain / t_spec
        spec_line = (f"MTP speculative decoding (batch 1, greedy, {len(spec_prompts)} prompts): acceptance "
                     f"{acceptance:.1%}, speedup {speedup:.2f}× over plain decoding (outputs identical by "
                     "construction, tested).")
    else:
        spec_line = "MTP speculative decoding: not measured (this model has no MTP module)."
    lines = [
        f"checkpoint: {ckpt}; prompts of {args.prompt_len} tokens from held-out text; {args.new_tokens} new "
        f"tokens, greedy, {rt.precision} (--precision {args.precision}), {args.threads} threads; transformers "
        f"{type(theirs).__name__}.generate in {rt.precision}",
        "", f"| batch | nanoseek tokens/s | {' | '.join(f'nanoseek {n} tokens/s' for n in others)} | transformers "
        f"tokens/s | ratio | same tokens as transformers |", "|---" * (5 + len(others)) + "|",
        *rows, "",
        f"Bound at batch 1: a token reads {read / 1e6:.1f} MB of weights ({rt.precision}; active parameters less the "
        f"embedding table); a copy here moves {bandwidth / 1e9:.1f} GB/s, so at most {bound:,.0f} tokens/s. Reached: "
        f"{b1_tokens_s:.1f} tokens/s, {b1_tokens_s / bound:.1%} of the bound.",
        *([f"torch.compile of the decode step: {compile_s:.0f} s before the first timed token."]
          if args.compile else []),
        f"Cache bytes per token ({rt.precision}): nanoseek {ours_per_token:,} (= n_layers × (kv_lora_rank + "
        f"qk_rope_head_dim) × {model.head.weight.element_size()}); transformers' DynamicCache {hf_per_token:,.0f}.",
        spec_line,
    ]
    headline = (f"ratio_b1={ratios[1]:.2f} ratio_b32={ratios[32]:.2f} vs_reference_b1={vs['reference'][1]:.2f} "
                f"vs_reference_b32={vs['reference'][32]:.2f} bound_fraction_b1={b1_tokens_s / bound:.3f} "
                + (f"vs_compiled_b1={vs['compiled'][1]:.2f} vs_compiled_b32={vs['compiled'][32]:.2f} "
                   if args.compile else "") + f"cache_bytes_per_token={ours_per_token} "
                f"acceptance={acceptance:.3f} spec_speedup={speedup:.2f}")
    publish("bench/decode.py", lines, headline, args.out)


if __name__ == "__main__":
    main()
