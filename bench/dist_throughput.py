"""Training throughput with 1 vs 2 processes on this machine (informational), and the expert-parallel all-to-all
volume per step against its formula. Launches itself under torchrun.

    python bench/dist_throughput.py [--steps 6] [--out docs/results/distributed.md]

Last line: tokens_per_s_1=… tokens_per_s_2dp=… tokens_per_s_2ep=… a2a_bytes=… a2a_formula_bytes=…
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import publish  # noqa: E402
from nanoseek import Transformer, get_preset  # noqa: E402
from nanoseek import dist as ddp  # noqa: E402
from nanoseek.losses import lm_loss  # noqa: E402
from nanoseek.optim import build_optimizer  # noqa: E402

BATCH, SEQ = 16, 512


def worker(steps: int, ep: int, out: str) -> None:
    info = ddp.setup(torch.device("cpu"), ep)
    torch.set_num_threads(max(1, 2 // info.world))
    torch.manual_seed(0)
    cfg = get_preset("small", n_mtp_layers=0)
    model = ddp.parallelize(Transformer(cfg), info)
    opt = build_optimizer(model, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    rows = BATCH // info.world
    times = []
    for step in range(steps + 1):
        batch = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=gen)[info.rank * rows:(info.rank + 1) * rows]
        t0 = time.perf_counter()
        loss, _ = lm_loss(model, batch[:, :-1], batch[:, 1:])
        loss.backward()
        ddp.finish_grads(model, info)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ddp.barrier(info)
        times.append(time.perf_counter() - t0)
        if step == 0:  # warm-up: reset the all-to-all counters
            for m in model.modules():
                if hasattr(m, "remote_rows"):
                    m.remote_rows = 0
    remote = sum(getattr(m, "remote_rows", 0) for m in model.modules()) * 2  # backward mirrors forward
    if info.main:
        Path(out).write_text(json.dumps({"step_s": statistics.median(times[1:]), "world": info.world, "ep": ep,
                                         "remote_rows_per_step": remote / steps, "dim": cfg.dim,
                                         "moe_layers": cfg.n_moe_layers, "k": cfg.n_activated_experts}))


def launch(n: int, ep: int, steps: int, tmp: Path) -> dict:
    out = tmp / f"r{n}-{ep}.json"
    me = [str(Path(__file__).resolve()), "--worker", "--steps", str(steps), "--ep", str(ep), "--result", str(out)]
    if n == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *me]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // n))})
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--result", default="")
    args = ap.parse_args()
    if args.worker:
        return worker(args.steps, args.ep, args.result)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        one, dp, ep = (launch(1, 1, args.steps, Path(d)), launch(2, 1, args.steps, Path(d)),
                       launch(2, 2, args.steps, Path(d)))
    tps = {k: BATCH * SEQ / r["step_s"] for k, r in (("1", one), ("2dp", dp), ("2ep", ep))}
    # all-to-all per step, both ranks: dispatch + combine, forward + backward, for the slots whose expert
    # lives on the other rank; with W ranks and uniform routing that is a (W-1)/W share of the N·K slots
    formula_rows = ep["moe_layers"] * 4 * BATCH * SEQ * ep["k"] * (ep["world"] - 1) / ep["world"]
    measured = ep["remote_rows_per_step"] * ep["world"]
    bytes_ = {k: v * ep["dim"] * 4 for k, v in (("measured", measured), ("formula", formula_rows))}
    lines = [f"`small` preset (MTP off), batch {BATCH}×{SEQ}, fp32 AdamW, 2 CPU cores in all (threads = 2 / processes), "
             "gloo; median of the steps after a warm-up", "",
             "| layout | step (s) | tokens/s |", "|---|---|---|",
             f"| 1 process | {one['step_s']:.2f} | {tps['1']:.0f} |",
             f"| 2 processes, data parallel (FSDP2) | {dp['step_s']:.2f} | {tps['2dp']:.0f} |",
             f"| 2 processes, expert parallel + FSDP2 | {ep['step_s']:.2f} | {tps['2ep']:.0f} |", "",
             f"All-to-all per step (expert parallel, both ranks, fp32 rows of {ep['dim']}): measured "
             f"{bytes_['measured'] / 1e6:.1f} MB; formula {ep['moe_layers']} MoE layers × 4 (dispatch, combine; forward, "
             f"backward) × N·K = {BATCH * SEQ}·{ep['k']} slots × (W−1)/W × dim × 4 B = {bytes_['formula'] / 1e6:.1f} MB "
             "(uniform routing; the measured share of remote slots is what the router chose)."]
    headline = (f"tokens_per_s_1={tps['1']:.0f} tokens_per_s_2dp={tps['2dp']:.0f} tokens_per_s_2ep={tps['2ep']:.0f} "
                f"a2a_bytes={bytes_['measured']:.0f} a2a_formula_bytes={bytes_['formula']:.0f}")
    publish("bench/dist_throughput.py", lines, headline, args.out)


if __name__ == "__main__":
    main()
