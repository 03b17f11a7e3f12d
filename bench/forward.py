"""Forward+backward training throughput: nanoseek vs transformers' DeepseekV3ForCausalLM, same run.

Both models get the same configuration (the `small` preset, MTP off since transformers has no MTP training
path), the same weights (ours exported with save_hf and loaded by from_pretrained) and the same batches.
Steps alternate between the two models so that machine noise hits both alike; the median step is reported.
Achieved model FLOP/s (stats.train_flops_per_token × tokens/s) is divided by this machine's fp32 matmul
peak, measured here on square matmuls with the same thread count.

    python bench/forward.py [--threads 2] [--batch 8] [--seq-len 512] [--steps 10] [--out docs/results/forward.md]

Last line: tokens_per_s=… transformers_tokens_per_s=… ratio=… peak_fraction=…
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanoseek import Transformer, get_preset  # noqa: E402
from nanoseek.hf import save_hf  # noqa: E402
from nanoseek.stats import model_stats  # noqa: E402


def matmul_peak(seconds: float = 3.0) -> float:
    """Best fp32 GFLOP/s over a few square sizes (the denominator of peak_fraction)."""
    best = 0.0
    for n in (1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            a @ b
        t0, reps = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds / 2:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def train_step(model, tokens: torch.Tensor, targets: torch.Tensor, hf: bool) -> float:
    """One forward+backward, each model computing its loss its own default way."""
    t0 = time.perf_counter()
    if hf:
        loss = model(tokens, labels=tokens).loss  # transformers shifts the labels itself
    else:
        loss, _ = model(tokens, targets)
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10, help="measured steps per model (after 2 warm-up steps)")
    ap.add_argument("--out", default=None, help="write a markdown record here (e.g. docs/results/forward.md)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import AutoModelForCausalLM

    cfg = get_preset(args.preset, n_mtp_layers=0)
    ours = Transformer(cfg)
    with torch.no_grad():  # a trained-looking routing bias, so that the bias path is exercised too
        for m in ours.modules():
            if hasattr(m, "bias") and isinstance(m.bias, torch.Tensor) and m.bias.dim() == 1 and m.bias.numel() == cfg.n_routed_experts:
                m.bias.normal_(0, 0.01)
    with tempfile.TemporaryDirectory() as d:
        save_hf(ours, d)
        theirs = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    impl = f"attn={theirs.config._attn_implementation} experts={getattr(theirs.config, '_experts_implementation', None)}"
    ours.train(), theirs.train()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=gen) for _ in range(4)]

    with torch.no_grad():  # same weights, same function: check before timing anything
        x = batches[0][:, :-1]
        a, b = ours(x), theirs(x).logits
        rel = ((a - b).abs().max() / b.abs().max()).item()
    times = {"ours": [], "hf": []}
    for step in range(args.steps + 2):
        seq = batches[step % len(batches)]
        for name, model in (("ours", ours), ("hf", theirs)):
            dt = train_step(model, seq[:, :-1], seq[:, 1:], hf=name == "hf")
            if step >= 2:
                times[name].append(dt)
    peak = matmul_peak()
    n_tok = args.batch * args.seq_len
    flops_per_token = model_stats(cfg, args.seq_len)["train_flops_per_token"]
    tps = {k: n_tok / statistics.median(v) for k, v in times.items()}
    ratio = tps["ours"] / tps["hf"]
    frac = tps["ours"] * flops_per_token / peak
    frac_hf = tps["hf"] * flops_per_token / peak

    lines = [
        f"config: preset {args.preset} (MTP off), {model_stats(cfg)['active_params'] / 1e6:.2f}M active params, "
        f"batch {args.batch}×{args.seq_len}, fp32, {args.threads} threads; transformers {impl}",
        f"logit check before timing: max rel diff {rel:.1e}",
        f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s; model FLOPs/token {flops_per_token / 1e6:.2f} M",
        "",
        "| model | median step (ms) | tokens/s | model GFLOP/s | peak fraction |",
        "|---|---|---|---|---|",
    ]
    for name, label in (("ours", "nanoseek"), ("hf", "transformers")):
        med = statistics.median(times[name])
        lines.append(f"| {label} | {med * 1e3:.1f} | {tps[name]:.0f} | {tps[name] * flops_per_token / 1e9:.1f} | "
                     f"{(frac if name == 'ours' else frac_hf):.3f} |")
    headline = (f"tokens_per_s={tps['ours']:.0f} transformers_tokens_per_s={tps['hf']:.0f} ratio={ratio:.2f} "
                f"peak_fraction={frac:.3f}")
    print("\n".join(lines))
    print(headline)
    if args.out:
        cmd = "python " + " ".join(sys.argv)
        rec = [f"# bench/forward.py — {datetime.date.today()}", "", f"Command: `{cmd}`", "",
               f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
               f"{_cpu_name()}", "", *lines, "", "```", headline, "```", ""]
        Path(args.out).write_text("\n".join(rec))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


if __name__ == "__main__":
    main()
