"""Run by tests/test_dist.py under torchrun (gloo, CPU, one thread per process); not a test module itself.

Every layout of the world size (data parallel, expert parallel over all ranks, DP × EP with EP over half of them)
trains the tiny model on the default batch shape, and must reproduce bit for bit one process that trains on the
same batch chunks as micro-batches: the same losses and expert loads at every step and the same final parameters.
Also with a routing bias that sends every token to rank 0's experts (the other ranks receive no slot: the case
that deadlocked FSDP2's backward), with FP8 experts, and in bf16 mixed precision (FSDP2's bf16 all-gather against
one process's runtime.MixedPrecision). Then rank 0 issues a collective that no other rank
joins: it must stop with one line naming itself and the collective once the timeout expires (exit status 1).

    torchrun --standalone --nproc_per_node=4 tests/dist_checks.py --steps 6
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from nanoseek import dist as ddp
from nanoseek.config import get_preset
from nanoseek.fp8 import convert_to_fp8
from nanoseek.model import Experts, Gate, Transformer
from nanoseek.optim import build_optimizer
from nanoseek.runtime import Runtime, prepare_for_training
from nanoseek.stages.pretrain import PretrainConfig, _Trainer

BATCH, SEQ = 16, 64  # the default --batch-size and the tiny preset's sequence length
HANG_TIMEOUT_S = 3


def train(info: ddp.DistInfo, steps: int, fp8: bool = False, favour: int = 0, micro: int = 0, bf16: bool = False):
    """Per-step (loss, grad_norm, maxvio) and the final full state dict (rank 0; None elsewhere). bf16: mixed
    precision (one process: runtime.MixedPrecision; several: FSDP2's bf16 all-gather of the fp32 shards)."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny"))
    for gate in (m for m in model.modules() if isinstance(m, Gate)):
        gate.bias[:favour] = 10.0  # experts 0..favour-1 win every selection
    if fp8:
        convert_to_fp8(model)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = ddp.parallelize(model, info, dtype)
    forward = prepare_for_training(model, Runtime(torch.device("cpu"), "bf16" if bf16 else "fp32"))
    cfg = PretrainConfig(out="unused", preset="tiny", steps=steps, batch_size=BATCH, micro_batch=micro)
    opt = build_optimizer(model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    trainer = _Trainer(cfg, model, forward, opt, torch.device("cpu"), SEQ, info)
    gen = torch.Generator().manual_seed(1)
    rows, out = BATCH // info.world, []
    for step in range(steps):
        batch = torch.randint(0, model.cfg.vocab_size, (BATCH, SEQ + 1), generator=gen)
        m = trainer.step(batch[info.chunk * rows:(info.chunk + 1) * rows], step)
        out.append((m["loss"], m["grad_norm"], m["maxvio"]))
    return out, ddp.full_model_state(model, info)


def compare(name: str, ref, got) -> None:
    (ref_steps, ref_state), (steps, state) = ref, got
    for i, ((l0, g0, v0), (l1, g1, v1)) in enumerate(zip(ref_steps, steps)):
        assert l1 == l0 and v1 == v0, f"{name} step {i + 1}: loss {l1!r} vs {l0!r}, maxvio {v1} vs {v0}"
        assert abs(g1 - g0) <= 1e-12 * g0, f"{name} step {i + 1}: grad norm {g1!r} vs {g0!r}"
    assert len(steps) == len(ref_steps) and state.keys() == ref_state.keys()
    for k in state:
        assert torch.equal(state[k], ref_state[k]), f"{name}: parameter {k} differs"
    print(f"ok {name}: {len(steps)} steps, losses {steps[0][0]:.4f} -> {steps[-1][0]:.4f}, bit-identical", flush=True)


def hang(info: ddp.DistInfo) -> None:
    """Rank 0 starts an expert dispatch on a group whose other members never join it."""
    group = dist.new_group(timeout=timedelta(seconds=HANG_TIMEOUT_S))
    alone = dataclasses.replace(info, ep=info.world, ep_group=group, timeout_s=HANG_TIMEOUT_S)
    if info.rank != 0:
        ddp.barrier(info)  # waits for rank 0, which never comes: torchrun ends this process when rank 0 fails
        return
    experts = Experts(2 * info.world, 8, 16)
    experts.dispatch = ddp.ExpertDispatch("layers.1.ffn.experts", experts.n_experts, alone)
    xs, counts = torch.zeros(2, 8), torch.zeros(experts.n_experts, dtype=torch.long)
    counts[0] = 2
    try:
        with ddp.guard(alone, "in the hang check"):
            experts.dispatch(xs, counts, experts)
    except ddp.CollectiveError as e:
        print(f"dist_checks: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    raise AssertionError("the lone collective returned")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = int(__import__("os").environ["WORLD_SIZE"])
    micro = BATCH // world
    layouts = [("data parallel", 1), (f"expert parallel {world}", world)] + (
        [(f"DP x EP {world // 2}x2", 2)] if world >= 4 else [])
    cases = [("", {}, args.steps), (", all tokens to rank 0's experts", {"favour": 2}, max(2, args.steps // 2)),
             (", FP8 experts", {"fp8": True}, 2), (", bf16 mixed precision", {"bf16": True}, 2)]
    info = None
    for suffix, kw, steps in cases:
        ref = None
        for name, ep in layouts if not kw or "bf16" in kw else layouts[1:]:
            info = ddp.setup(torch.device("cpu"), ep, timeout_s=60)
            got = train(info, steps, **kw)
            if info.main:
                ref = ref or train(ddp.DistInfo(), steps, micro=micro, **kw)  # one process, chunks as micro-batches
                compare(name + suffix, ref, got)
            ddp.barrier(info)
    hang(info)


if __name__ == "__main__":
    main()
