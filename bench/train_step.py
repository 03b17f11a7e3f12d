"""A full training step (forward, backward, optimizer): nanoseek vs transformers + torch.optim.AdamW, in one run.

Same configuration (the `small` preset, MTP off), weights and batches. Ours: the fused head + cross-entropy,
gradient clipping and our AdamW (fused kernel, no decay on norms). Theirs: `labels=` loss, the same clipping,
`torch.optim.AdamW` with its defaults (foreach), as a transformers user would write it. See bench/common.py.

    python bench/train_step.py [--threads 2] [--batch 8] [--seq-len 512] [--steps 10] [--out docs/results/train_step.md]

Last line: tokens_per_s=… ratio=… peak_fraction=…
"""

import time

import torch

from common import batches, logit_check, parse_args, race, report, twin_models
from nanoseek.losses import lm_loss
from nanoseek.optim import build_optimizer


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours, theirs, cfg, impl = twin_models(args.preset)
    data = batches(cfg, args.batch, args.seq_len)
    rel = logit_check(ours, theirs, data[0][:, :-1])
    opt_ours = build_optimizer(ours, lr=1e-4)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(model, opt, loss_fn):
        def run(x, y):
            t0 = time.perf_counter()
            loss_fn(x, y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0
        return run

    times = race(args.steps, data, {
        "ours": step(ours, opt_ours, lambda x, y: lm_loss(ours, x, y)[0]),
        "hf": step(theirs, opt_theirs, lambda x, y: theirs(x, labels=x).loss),
    })
    report("bench/train_step.py", args, cfg, impl, rel, times, headline_keys=("tokens_per_s", "ratio", "peak_fraction"))


if __name__ == "__main__":
    main()
