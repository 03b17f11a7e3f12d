"""Where a training step goes: forward and backward wall time per kind of module, from hooks (no profiler).

The step is pretraining's (`lm_loss` with MTP, backward, clipping, AdamW) at the speedrun's size by default:
`small`, 16 × 512, 2 threads, --precision auto. Module forward hooks time each module's forward; full backward
hooks time its backward (they add a little work of their own, so the step is slower than unhooked); the fused
head + cross-entropy is timed around its forward, which also computes its gradients. Kinds nest: "moe" includes
"experts", "gate" and "shared", "mtp" includes its own attention, MoE and norms (also counted under theirs).

    python bench/train_profile.py [--preset small] [--batch 16] [--seq-len 512] [--steps 3] [--precision auto]

Last line: step_ms=… head_share=… attention_share=… moe_share=… norm_share=…
"""

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanoseek import Transformer, get_preset  # noqa: E402
from nanoseek import losses, model as M  # noqa: E402
from nanoseek.optim import build_optimizer  # noqa: E402
from nanoseek.runtime import prepare_for_training, resolve  # noqa: E402


def kind(module, name: str) -> str | None:
    for cls, label in ((M.MLA, "attention"), (M.Gate, "gate"), (M.Experts, "experts"), (M.MoE, "moe"),
                       (M.RMSNorm, "norm"), (M.MTP, "mtp")):
        if isinstance(module, cls):
            return label
    if isinstance(module, M.MLP):
        return "shared" if "shared" in name else "dense_ffn"
    return None


def hook(model: torch.nn.Module, acc: dict) -> None:
    """Accumulate seconds per (kind, direction) into acc."""
    started = {}
    for name, module in model.named_modules():
        label = kind(module, name)
        if label is None:
            continue

        def begin(key, *_):
            started[key] = time.perf_counter()

        def end(key, label_dir, *_):
            t = started.pop(key, None)
            if t is not None:
                acc[label_dir] += time.perf_counter() - t

        module.register_forward_pre_hook(lambda m, a, k=("f", id(module)): begin(k))
        module.register_forward_hook(lambda m, a, o, k=("f", id(module)), l=label: end(k, f"{l} fwd"))
        module.register_full_backward_pre_hook(lambda m, g, k=("b", id(module)): begin(k))
        module.register_full_backward_hook(lambda m, gi, go, k=("b", id(module)), l=label: end(k, f"{l} bwd"))
    forward = losses._LinearCrossEntropy.forward

    def timed(ctx, *args):
        t = time.perf_counter()
        out = forward(ctx, *args)
        acc["head+CE fwd+grads"] += time.perf_counter() - t
        return out

    losses._LinearCrossEntropy.forward = staticmethod(timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="measured steps (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    model = Transformer(cfg).train()
    rt = resolve("cpu", args.precision, training=True)
    forward, opt = prepare_for_training(model, rt), build_optimizer(model, lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(1))
    acc = collections.defaultdict(float)
    hook(model, acc)

    def step():
        loss, mtp = losses.lm_loss(forward, x[:, :-1], x[:, 1:])
        (loss + 0.3 * sum(mtp)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    acc.clear()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    total = (time.perf_counter() - t0) / args.steps
    print(f"preset {args.preset}, {args.batch}×{args.seq_len}, {rt.precision}, {args.threads} threads: "
          f"step {total * 1e3:.0f} ms (hooked)")
    print("| part | ms per step | share |\n|---|---|---|")
    for key, seconds in sorted(acc.items(), key=lambda kv: -kv[1]):
        print(f"| {key} | {seconds / args.steps * 1e3:.1f} | {seconds / args.steps / total:.1%} |")

    def share(*keys):
        return sum(acc[k] for k in keys) / args.steps / total

    print(f"step_ms={total * 1e3:.0f} head_share={share('head+CE fwd+grads'):.3f} "
          f"attention_share={share('attention fwd', 'attention bwd'):.3f} moe_share={share('moe fwd', 'moe bwd'):.3f} "
          f"norm_share={share('norm fwd', 'norm bwd'):.3f}")


if __name__ == "__main__":
    main()
