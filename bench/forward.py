"""Forward+backward training throughput: nanoseek vs transformers' DeepseekV3ForCausalLM, in one run.

Same configuration (the `small` preset, MTP off), weights and batches; each model computes its loss its own
default way (ours: the fused head + cross-entropy; transformers: `labels=`). See bench/common.py.

    python bench/forward.py [--threads 2] [--batch 8] [--seq-len 512] [--steps 10] [--out docs/results/forward.md]

Last line: tokens_per_s=… transformers_tokens_per_s=… ratio=… peak_fraction=…
"""

import time

import torch

from common import batches, logit_check, parse_args, race, report, twin_models
from nanoseek.losses import lm_loss


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours, theirs, cfg, impl = twin_models(args.preset)
    data = batches(cfg, args.batch, args.seq_len)
    rel = logit_check(ours, theirs, data[0][:, :-1])

    def step(model, loss_fn):
        def run(x, y):
            t0 = time.perf_counter()
            loss_fn(x, y).backward()
            for p in model.parameters():
                p.grad = None
            return time.perf_counter() - t0
        return run

    times = race(args.steps, data, {
        "ours": step(ours, lambda x, y: lm_loss(ours, x, y)[0]),
        "hf": step(theirs, lambda x, y: theirs(x, labels=x).loss),  # transformers shifts the labels itself
    })
    report("bench/forward.py", args, cfg, impl, rel, times,
           headline_keys=("tokens_per_s", "transformers_tokens_per_s", "ratio", "peak_fraction"))


if __name__ == "__main__":
    main()
