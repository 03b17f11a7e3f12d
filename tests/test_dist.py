"""torch.distributed on CPU (gloo, 2 processes via torchrun): data and expert parallelism equal one process, and a
checkpoint written by 2 processes resumes in 1."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from nanoseek import checkpoint as ckpt
from nanoseek.cli import main
from nanoseek.dist import DistInfo, check_layout
from nanoseek.config import get_preset


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    r = random.Random(0)
    words = "the cat sat on a mat and a dog ran to the big red house near the old river".split()
    path = tmp_path_factory.mktemp("dist") / "docs.txt"
    path.write_text("\n\n".join(" ".join(r.choice(words) for _ in range(r.randint(20, 90))) for _ in range(300)))
    return path


def args(corpus, out, steps=4):
    return ["pretrain", "--preset", "tiny", "--data", str(corpus), "--vocab-size", "300", "--steps", str(steps),
            "--batch-size", "8", "--seq-len", "32", "--save-every", "2", "--keep", "5", "--eval-every", "2",
            "--eval-batches", "1", "--lr", "5e-4", "--threads", "1", "--out", str(out)]


def torchrun(argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanoseek", *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def compare(a, b, loss_rtol=1e-6, param_atol=1e-6):
    """Same loss sequence (relative 1e-6) and same final parameters (absolute 1e-6 after 4 AdamW steps at lr 5e-4)."""
    ra = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for key in ("loss", "mtp_loss", "heldout_loss"):
            if key in x:
                assert abs(x[key] - y[key]) <= loss_rtol * abs(x[key]), (x["step"], key, x[key], y[key])
        assert x["maxvio"] == y["maxvio"]  # global expert loads are integers: exactly equal
    sa = load_file(str(ckpt.step_dirs(a)[-1] / "model.safetensors"))
    sb = load_file(str(ckpt.step_dirs(b)[-1] / "model.safetensors"))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert (sa[k] - sb[k]).abs().max().item() <= param_atol, k


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    os.environ["OMP_NUM_THREADS"] = "1"
    assert main(args(corpus, out)) == 0
    return out


def test_data_parallel_equals_one_process(corpus, single, tmp_path):
    torchrun(args(corpus, tmp_path / "dp"))
    compare(single, tmp_path / "dp")


def test_expert_parallel_equals_one_process_and_resumes_in_one(corpus, single, tmp_path):
    torchrun(args(corpus, tmp_path / "ep") + ["--ep", "2"])
    compare(single, tmp_path / "ep")
    shutil.rmtree(tmp_path / "ep" / "checkpoints" / "step_000004")  # as if killed after step 2
    assert (tmp_path / "ep" / "checkpoints" / "step_000002" / "train_state" / "dcp").is_dir()
    assert main(["pretrain", "--out", str(tmp_path / "ep"), "--resume"]) == 0  # one process, DCP reshards
    compare(single, tmp_path / "ep")


def test_impossible_layouts_are_rejected():
    cfg = get_preset("tiny")
    with pytest.raises(ValueError, match="cannot be split"):
        check_layout(cfg.replace(n_routed_experts=6, n_expert_groups=2), DistInfo(rank=0, world=4, ep=4), 8, 0)
    with pytest.raises(ValueError, match="multiple of the world size"):
        check_layout(cfg, DistInfo(rank=0, world=3, ep=1), 8, 0)
    assert main(["pretrain", "--preset", "tiny", "--out", "/tmp/nope", "--ep", "2"]) == 2  # no torchrun
