"""Forward+backward training throughput: nanoseek vs transformers' DeepseekV3ForCausalLM, in one run.

Same configuration (the `small` preset, MTP off), weights and batches; each model computes its loss its own
default way (ours: the fused head + cross-entropy; transformers: `labels=`), both in --precision (default auto:
bf16 where measured faster), and ours also in fp32 for bf16_speedup. See bench/common.py.

    python bench/forward.py [--threads 2] [--batch 8] [--seq-len 512] [--steps 10] [--precision auto]
                            [--out docs/results/forward.md]

Last line: tokens_per_s=… transformers_tokens_per_s=… ratio=… fp32_tokens_per_s=… bf16_speedup=… peak_fraction=…
"""

import contextlib
import time

import torch

from common import batches, hf_context, logit_check, parse_args, race, report, runtime, twin_models
from nanoseek.losses import lm_loss
from nanoseek.runtime import prepare_for_training


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rt = runtime(args)
    ours, theirs, cfg, impl = twin_models(args.preset)
    data = batches(cfg, args.batch, args.seq_len)
    rel = logit_check(ours, theirs, data[0][:, :-1])
    forward = prepare_for_training(ours, rt)

    def step(model, loss_fn, context=contextlib.nullcontext):
        def run(x, y):
            t0 = time.perf_counter()
            with context():
                loss = loss_fn(x, y)
            loss.backward()
            for p in model.parameters():
                p.grad = None
            return time.perf_counter() - t0
        return run

    fns = {"ours": step(ours, lambda x, y: lm_loss(forward, x, y)[0]),
           "hf": step(theirs, lambda x, y: theirs(x, labels=x).loss, lambda: hf_context(rt))}  # (shifts labels)
    if rt.precision != "fp32":
        fns["ours_fp32"] = step(ours, lambda x, y: lm_loss(ours, x, y)[0])
    report("bench/forward.py", args, cfg, impl, rel, race(args.steps, data, fns), rt)


if __name__ == "__main__":
    main()
