"""A full training step (forward, backward, optimizer): nanoseek vs transformers + torch.optim.AdamW, in one run.

Same configuration (the `small` preset, MTP off), weights and batches, both in --precision (default auto: bf16
where measured faster, as mixed precision with fp32 weights and optimizer state), and ours also in fp32 for
bf16_speedup. Ours: the fused head + cross-entropy, gradient clipping and our AdamW (fused kernel, no decay on
norms). Theirs: `labels=` loss (under autocast in bf16), the same clipping, `torch.optim.AdamW` with its defaults
(foreach), as a transformers user would write it. See bench/common.py.

    python bench/train_step.py [--threads 2] [--batch 8] [--seq-len 512] [--steps 10] [--precision auto]
                               [--out docs/results/train_step.md]

Last line: tokens_per_s=… transformers_tokens_per_s=… ratio=… fp32_tokens_per_s=… bf16_speedup=… peak_fraction=…
"""

import contextlib
import copy
import time

import torch

from common import batches, hf_context, logit_check, parse_args, race, report, runtime, twin_models
from nanoseek.losses import lm_loss
from nanoseek.optim import build_optimizer
from nanoseek.runtime import prepare_for_training


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rt = runtime(args, training=True)
    ours, theirs, cfg, impl = twin_models(args.preset)
    data = batches(cfg, args.batch, args.seq_len)
    rel = logit_check(ours, theirs, data[0][:, :-1])
    ours32 = copy.deepcopy(ours)
    forward = prepare_for_training(ours, rt)

    def step(model, opt, loss_fn, context=contextlib.nullcontext):
        def run(x, y):
            t0 = time.perf_counter()
            with context():
                loss = loss_fn(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0
        return run

    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    fns = {"ours": step(ours, build_optimizer(ours, lr=1e-4), lambda x, y: lm_loss(forward, x, y)[0]),
           "hf": step(theirs, opt_theirs, lambda x, y: theirs(x, labels=x).loss, lambda: hf_context(rt))}
    if rt.precision != "fp32":
        fns["ours_fp32"] = step(ours32, build_optimizer(ours32, lr=1e-4), lambda x, y: lm_loss(ours32, x, y)[0])
    report("bench/train_step.py", args, cfg, impl, rel, race(args.steps, data, fns), rt)


if __name__ == "__main__":
    main()
