"""Distributed training throughput and expert all-to-all volume, with a correctness check against one process, on
CPU (gloo) or GPU (NCCL). Launches itself under torchrun for each layout, then runs one process on the same
batches as micro-batches.

    python bench/dist_throughput.py [--device cpu] [--procs 2] [--steps 6] [--out docs/results/dist-throughput.md]

Layouts: data parallel (FSDP2), expert parallel over all processes, and DP × EP (EP over half of them, 4+
processes). CPU: 2 cores in all, threads = 2 / processes (informational: the processes share the cores). Per
layout: median step time after a warm-up, tokens/s, the expert all-to-all bytes sent per step (all ranks, forward
and backward, measured in the dispatcher) against the uniform-routing formula, and the worst relative loss
difference from one process. bench/dist_gpu.py runs this on every GPU of a machine.

Last line: tokens_per_s_1=… tokens_per_s_dp=… tokens_per_s_ep=… a2a_bytes=… a2a_formula_bytes=… worst_rel_diff=…
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import publish  # noqa: E402
from nanoseek import dist as ddp  # noqa: E402
from nanoseek.config import get_preset  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.optim import build_optimizer  # noqa: E402
from nanoseek.stages.pretrain import PretrainConfig, _Trainer  # noqa: E402


def train(info: ddp.DistInfo, preset: str, batch: int, seq: int, steps: int, micro: int = 0) -> dict:
    """`steps` + 1 optimizer steps (the first a warm-up) of `preset` on random tokens; per-step losses and times."""
    device = info.device
    torch.manual_seed(0)
    model = ddp.parallelize(Transformer(get_preset(preset, n_mtp_layers=0)).to(device), info)
    cfg = PretrainConfig(out="unused", preset=preset, steps=steps + 1, batch_size=batch, micro_batch=micro)
    trainer = _Trainer(cfg, model, model, build_optimizer(model, cfg.lr), device, seq, info)
    gen = torch.Generator().manual_seed(1)
    rows, losses, times, sent = batch // info.world, [], [], 0
    for step in range(steps + 1):
        tokens = torch.randint(0, model.cfg.vocab_size, (batch, seq + 1), generator=gen)
        ddp.barrier(info)
        before, t0 = ddp.expert_traffic(model), time.perf_counter()
        losses.append(trainer.step(tokens[info.chunk * rows:(info.chunk + 1) * rows].to(device), step)["loss"])
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        sent += (ddp.expert_traffic(model) - before) if step else 0
    total = torch.tensor([float(sent)], dtype=torch.float64, device=device)
    ddp.all_reduce_([total], info)
    return {"losses": losses, "step_s": statistics.median(times[1:]), "a2a_bytes_per_step": total.item() / steps,
            "dim": model.cfg.dim, "moe_layers": model.cfg.n_moe_layers, "k": model.cfg.n_activated_experts}


def worker(args) -> None:
    device = torch.device(args.device)
    info = ddp.setup(device, args.ep, timeout_s=300)
    if device.type == "cpu":
        torch.set_num_threads(max(1, 2 // info.world))
    result = {"world": info.world, "ep": args.ep, **train(info, args.preset, args.batch, args.seq, args.steps)}
    if info.main:
        Path(args.result).write_text(json.dumps(result))


def launch(n: int, ep: int, args, tmp: Path) -> dict:
    out = tmp / f"r{n}-{ep}.json"
    me = [str(Path(__file__).resolve()), "--worker", "--device", args.device, "--preset", args.preset, "--batch",
          str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--ep", str(ep), "--result", str(out)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *me]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // n)) if args.device == "cpu" else "4"}
    subprocess.run(cmd, check=True, env=env, timeout=1200)
    return json.loads(out.read_text())


def measure(args) -> tuple[list[str], str, dict]:
    """Every layout of args.procs processes against one process; (markdown lines, headline, raw results)."""
    n = args.procs
    layouts = [("data parallel (FSDP2)", 1), (f"expert parallel {n} + FSDP2", n)] + (
        [(f"DP {n // 2} × EP 2 + FSDP2", 2)] if n >= 4 and n % 2 == 0 else [])
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    one = train(ddp.DistInfo(device=device), args.preset, args.batch, args.seq, args.steps, micro=args.batch // n)
    runs = {}
    with tempfile.TemporaryDirectory() as d:
        for name, ep in layouts:
            try:
                runs[name] = launch(n, ep, args, Path(d))
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:  # recorded, not fatal
                runs[name] = {"error": f"{type(e).__name__}: {e}"}
    tokens = args.batch * args.seq
    rows = [f"| 1 process, {n} micro-batches | {one['step_s']:.3f} | {tokens / one['step_s']:.0f} | – | – | – |"]
    worst = 0.0
    for name, r in runs.items():
        if "error" in r:
            rows.append(f"| {name} | failed: {r['error'][:200]} | | | | |")
            continue
        rel = max(abs(a - b) / abs(a) for a, b in zip(one["losses"], r["losses"]))
        worst = max(worst, rel)
        # uniform routing: a (W-1)/W share of the N·K slots leaves its rank, twice (dispatch, combine) in the
        # forward and twice in the backward, as rows of dim values
        r["formula_bytes"] = r["moe_layers"] * 4 * tokens * r["k"] * (r["ep"] - 1) / r["ep"] * r["dim"] * 4
        rows.append(f"| {name} | {r['step_s']:.3f} | {tokens / r['step_s']:.0f} | {rel:.1e} | "
                    f"{r['a2a_bytes_per_step'] / 1e6:.1f} | {r['formula_bytes'] / 1e6:.1f} |")
    ep_run = runs.get(layouts[1][0], {})
    lines = [f"`{args.preset}` preset (MTP off), batch {args.batch}×{args.seq}, fp32 AdamW, {args.device}, {n} "
             f"processes; median step after a warm-up of 1", "",
             "| layout | step (s) | tokens/s | worst relative loss diff vs 1 process | all-to-all MB/step measured | "
             "formula (uniform routing) |", "|---|---|---|---|---|---|", *rows]
    tps = {k: tokens / r["step_s"] if "step_s" in r else 0.0 for k, r in (("dp", runs[layouts[0][0]]), ("ep", ep_run))}
    headline = (f"tokens_per_s_1={tokens / one['step_s']:.0f} tokens_per_s_dp={tps['dp']:.0f} "
                f"tokens_per_s_ep={tps['ep']:.0f} a2a_bytes={ep_run.get('a2a_bytes_per_step', 0):.0f} "
                f"a2a_formula_bytes={ep_run.get('formula_bytes', 0):.0f} worst_rel_diff={worst:.1e}")
    return lines, headline, {"one": one, **runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--result", default="")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    lines, headline, _ = measure(args)
    publish("bench/dist_throughput.py", lines, headline, args.out)


if __name__ == "__main__":
    main()
