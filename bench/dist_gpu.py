"""GPU readiness of the distributed trainer, for a device session: the CPU code path on NCCL, in a few minutes.

    python bench/dist_gpu.py --out $OUT/dist_gpu.md      # also writes dist_gpu.json beside it

1. Environment: torch, CUDA and NCCL versions, the GPUs.
2. With 2+ GPUs (at most 8 used): bench/dist_throughput.py's layouts on NCCL (data parallel, expert parallel over
   all GPUs, DP × EP with 4+), each against one GPU training the same batch chunks as micro-batches: worst
   relative loss difference (GPU kernels are not bit-reproducible, so it is reported, not required to be 0),
   tokens/s and expert all-to-all bytes per step against the uniform-routing formula. With one GPU only the
   one-GPU reference runs: NCCL refuses two ranks on one device, so the multi-rank rows say so.
3. A collective timeout on NCCL (2+ GPUs): rank 0 starts an expert all-to-all that no other rank joins, with a 10 s
   timeout; the run must end with one line naming rank 0 and the collective and a non-zero torchrun status.

Last line: gpus=… tokens_per_s_1=… tokens_per_s_dp=… tokens_per_s_ep=… a2a_bytes=… worst_rel_diff=… timeout_ok=…
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_throughput  # noqa: E402
from common import publish  # noqa: E402
from nanoseek import dist as ddp  # noqa: E402
from nanoseek.model import Experts  # noqa: E402

HANG_S = 10


def lone_collective() -> None:
    """Under torchrun: rank 0 dispatches to experts on a group whose other members never join."""
    import torch.distributed as dist

    info = ddp.setup(torch.device("cuda"), 1, timeout_s=HANG_S)
    group = dist.new_group(timeout=timedelta(seconds=HANG_S))
    dist.all_reduce(torch.zeros(1, device=info.device), group=group)  # NCCL connects lazily: connect everyone first
    alone = ddp.DistInfo(rank=info.rank, world=info.world, ep=info.world, timeout_s=HANG_S, device=info.device,
                         ep_group=group)
    if info.rank:
        ddp.barrier(info)  # never completes: torchrun stops this rank once rank 0 has failed
        return
    experts = Experts(2 * info.world, 8, 16).to(info.device)
    experts.dispatch = ddp.ExpertDispatch("layers.1.ffn.experts", experts.n_experts, alone)
    counts = torch.zeros(experts.n_experts, dtype=torch.long, device=info.device)
    counts[0] = 2
    try:
        with ddp.guard(alone, "in the timeout check"):
            experts.dispatch(torch.zeros(2, 8, device=info.device), counts, experts)
            torch.cuda.synchronize()
    except ddp.CollectiveError as e:
        print(f"dist_gpu: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def timeout_check(n: int) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(Path(__file__).resolve()), "--lone-collective"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_S + 120)
    except subprocess.TimeoutExpired:
        return False, f"no exit within {HANG_S + 120} s"
    line = next((x for x in done.stderr.splitlines() if x.startswith("dist_gpu: rank 0 of")), "")
    return done.returncode != 0 and "all_to_all_single (expert slot counts" in line, line or done.stderr[-500:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=0, help="global batch (0: 8 sequences per GPU)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="dist_gpu.md")
    ap.add_argument("--lone-collective", action="store_true")
    args = ap.parse_args()
    if args.lone_collective:
        return lone_collective()
    gpus = torch.cuda.device_count()
    if not gpus:
        raise SystemExit("dist_gpu: no CUDA device visible; run bench/dist_throughput.py for CPU/gloo")
    n = min(gpus, 8)
    env = [f"torch {torch.__version__}, CUDA {torch.version.cuda}, NCCL "
           f"{torch.cuda.nccl.version()}, {gpus} × {torch.cuda.get_device_name(0)}", ""]
    run = argparse.Namespace(device="cuda", procs=max(n, 2), preset=args.preset, batch=args.batch or 8 * max(n, 2),
                             seq=args.seq, steps=args.steps)
    if n >= 2:
        lines, headline, raw = dist_throughput.measure(run)
        ok, line = timeout_check(n)
    else:  # the one-GPU reference alone
        one = dist_throughput.train(ddp.DistInfo(device=torch.device("cuda")), run.preset, run.batch, run.seq,
                                    run.steps, micro=run.batch // 2)
        tps = run.batch * run.seq / one["step_s"]
        lines = [f"1 GPU, `{run.preset}` batch {run.batch}×{run.seq} as 2 micro-batches: {one['step_s']:.3f} s/step, "
                 f"{tps:.0f} tokens/s", "", "Multi-rank NCCL rows: not run (NCCL needs one GPU per rank; 1 visible)."]
        headline, raw, ok, line = f"tokens_per_s_1={tps:.0f}", {"one": one}, False, "not run: needs 2+ GPUs"
    lines += ["", f"Collective timeout on NCCL ({HANG_S} s): {'ok' if ok else 'NOT ok'} — `{line}`"]
    headline = f"gpus={gpus} {headline} timeout_ok={int(ok)}"
    publish("bench/dist_gpu.py", lines, headline, args.out, preamble=env)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"env": env[0], "raw": raw, "timeout_ok": ok,
                                                              "timeout_line": line}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    main()
