"""torch.distributed on CPU (gloo): every layout (data parallel, expert parallel, DP × EP) trains bit for bit like one
process (in fp32 and in bf16 mixed precision), a collective that never completes ends the run with one line and a
non-zero exit, and a run that loses a rank to SIGKILL stops with one line and resumes from its last DCP checkpoint
in one process, exactly."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoseek import checkpoint as ckpt
from nanoseek.cli import main
from nanoseek.config import get_preset
from nanoseek.dist import DistInfo, check_layout

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    r = random.Random(0)
    words = "the cat sat on a mat and a dog ran to the big red house near the old river".split()
    path = tmp_path_factory.mktemp("dist") / "docs.txt"
    path.write_text("\n\n".join(" ".join(r.choice(words) for _ in range(r.randint(20, 90))) for _ in range(300)))
    return path


def args(corpus, out, steps, precision="fp32", batch=16):
    """`batch` sequences of the tiny preset's 64 tokens (default: the default batch), half of them per forward
    pass."""
    return ["pretrain", "--preset", "tiny", "--data", str(corpus), "--vocab-size", "300", "--steps", str(steps),
            "--batch-size", str(batch), "--micro-batch", str(batch // 2), "--save-every", "2", "--keep", "2",
            "--eval-every", "4", "--eval-batches", "1", "--threads", "1", "--dist-timeout", "60", "--precision",
            precision, "--out", str(out)]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_layouts_train_like_one_process_and_a_lone_collective_times_out_with_one_line(tmp_path):
    """4 processes: DP, EP 4, DP × EP 2×2 (also with every token routed to rank 0's experts, with FP8 experts, and
    in bf16 mixed precision) give one process's losses, expert loads and parameters bit for bit; then rank 0's
    lone collective times out."""
    script = Path(__file__).with_name("dist_checks.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "--log-dir",
           str(tmp_path / "logs"), "--redirects", "3", str(script), "--steps", "3"]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    rank0 = next((tmp_path / "logs").glob("*/attempt_0/0"))
    out, err = (rank0 / "stdout.log").read_text(), (rank0 / "stderr.log").read_text()
    assert done.returncode != 0, "the hang check must end the run with a non-zero exit"
    passed = [line for line in out.splitlines() if line.startswith("ok ")]
    assert len(passed) == 10, out + err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"dist_checks: rank 0 of 4: collective all_to_all_single \(expert slot counts, "
                        r"layers\.1\.ffn\.experts\) failed in the hang check: Timed out waiting 3000ms .*"
                        r"--dist-timeout 3 s\)", last), last


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killed_rank_stops_the_run_with_one_line_and_it_resumes_exactly_in_one_process(corpus, tmp_path):
    """In bf16 mixed precision: FSDP's bf16 copies on two ranks, then one process's own, train alike."""
    ref, run = tmp_path / "one", tmp_path / "ep"
    # Half the default batch and 8 steps: bf16 is emulated on AVX2-only hosts (~3 s a default step here). The kill
    # lands after the first checkpoint (step 2), with 6 steps still to come
    assert main(args(corpus, ref, 8, "bf16", batch=8)) == 0  # one process, the batch in two micro-batches
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    logs = [open(tmp_path / f"rank{r}.err", "w+") for r in range(2)]
    cmd = [sys.executable, "-m", "nanoseek", *args(corpus, run, 8, "bf16", batch=8), "--ep", "2"]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL,
                              stderr=logs[r]) for r in range(2)]
    deadline = time.monotonic() + 300
    while not ckpt.step_dirs(run) and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)  # mid-run: a checkpoint exists, most steps are still to come
    procs[0].wait(timeout=120)  # the survivor's next collective meets the closed connection
    procs[1].wait(timeout=30)
    err = (tmp_path / "rank0.err").read_text()
    assert procs[0].returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"nanoseek pretrain: rank 0 of 2: collective \w+ \(.+\) failed (at|saving the checkpoint of) "
                        r"step \d+: .+ — a peer died, hung or issued its collectives in another order "
                        r"\(--dist-timeout 60 s\)", last), last
    assert len(records(run)) < 8 and (ckpt.step_dirs(run)[-1] / "train_state" / "dcp").is_dir()
    assert json.loads((run / "runtime.json").read_text())["precision"] == "bf16"

    assert main(["pretrain", "--out", str(run), "--resume"]) == 0  # one process: DCP reshards the experts
    assert [(r["step"], r["loss"], r["maxvio"], r.get("heldout_loss")) for r in records(run)] == [
        (r["step"], r["loss"], r["maxvio"], r.get("heldout_loss")) for r in records(ref)]
    sa, sb = (load_file(str(ckpt.step_dirs(x)[-1] / "model.safetensors")) for x in (ref, run))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_impossible_layouts_are_rejected():
    cfg = get_preset("tiny")
    with pytest.raises(ValueError, match="cannot be split"):
        check_layout(cfg.replace(n_routed_experts=6, n_expert_groups=2), DistInfo(rank=0, world=4, ep=4), 8, 0)
    with pytest.raises(ValueError, match="multiple of the world size"):
        check_layout(cfg, DistInfo(rank=0, world=3, ep=1), 8, 0)
    assert main(["pretrain", "--preset", "tiny", "--out", "/tmp/nope", "--ep", "2"]) == 2  # no torchrun
    assert main(["pretrain", "--preset", "tiny", "--out", "/tmp/nope", "--dist-timeout", "0"]) == 2
