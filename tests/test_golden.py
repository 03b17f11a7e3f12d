"""Golden losses (torchtitan-style): a fixed-seed `tiny` pretraining run in fp32, on one thread and on two, must
reproduce the committed per-step losses, MTP losses, gradient norms and expert-load MaxVio exactly, bit for bit. Any change
to the model, the loss, the optimizer, the data pipeline or the initialisation shows up here first; a change
that is meant to alter the numbers regenerates the file, and the diff shows by how much:

    python -m tests.test_golden --update

The bits depend on the CPU as well as on the code: MKL takes other GEMM paths on an AMD EPYC than on an Intel
Xeon, and the first step's gradient norm already differs in the 9th digit. So the file holds one golden run per
kind of machine (CPU vendor and torch's CPU capability) and thread count (two threads split the GEMMs and the
reductions differently: the two-thread run is its own golden run), each compared bit for bit on its kind; on a kind with no
golden run yet, every golden run there must agree within 1e-5 relative (the kinds measured so far differ by less
than 1.5e-7), and `--update` adds this kind's run. An update after a change meant to alter the numbers rewrites
the file with this kind's run only, since the others are then stale.
"""

import json
import platform
import random
import sys
from pathlib import Path

import pytest
import torch

from nanoseek.cli import main

GOLDEN = Path(__file__).parent / "golden" / "tiny_pretrain.json"
KEYS = ("loss", "mtp_loss", "grad_norm", "maxvio", "lr")


def _run(tmp: Path, threads: int = 1) -> list[dict]:
    r = random.Random(0)
    words = "the cat sat on a mat and a dog ran to the big red house near the old river".split()
    corpus = tmp / "docs.txt"
    corpus.write_text("\n\n".join(" ".join(r.choice(words) for _ in range(r.randint(20, 90))) for _ in range(300)))
    out = tmp / "run"
    assert main(["pretrain", "--preset", "tiny", "--data", str(corpus), "--vocab-size", "300", "--steps", "6",
                 "--batch-size", "8", "--seq-len", "64", "--precision", "fp32", "--threads", str(threads), "--eval-every",
                 "0", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: row[k] for k in ("step", *KEYS)} for row in rows]


def machine_kind(threads: int = 1) -> str:
    """The CPU vendor and torch's CPU capability, e.g. "GenuineIntel AVX512": what decides which kernels run (and
    ", 2 threads" for a run on two)."""
    vendor = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("vendor_id")), platform.machine()) if Path("/proc/cpuinfo").exists() else \
        platform.machine()
    return f"{vendor} {torch.backends.cpu.get_cpu_capability()}" + (f", {threads} threads" if threads > 1 else "")


@pytest.mark.parametrize("threads", [1, 2])
def test_tiny_pretraining_reproduces_the_golden_losses_exactly(tmp_path, threads):
    got, goldens, kind = _run(tmp_path, threads), json.loads(GOLDEN.read_text()), machine_kind(threads)
    if kind in goldens:
        want = goldens[kind]
        assert len(got) == len(want) == 6
        for g, w in zip(got, want):
            assert g == w, (f"step {w['step']} on {kind}: {g} != golden {w} (regenerate with python -m "
                            f"tests.test_golden --update)")
        return
    for other, want in goldens.items():  # no golden run for this kind of machine: close to every stored one
        assert len(got) == len(want) == 6
        for g, w in zip(got, want):
            for key in KEYS:
                assert abs(g[key] - w[key]) <= 1e-5 * abs(w[key]), (
                    f"step {w['step']}: {key} {g[key]} is not within 1e-5 of {w[key]}, the golden run of {other} "
                    f"(this machine, {kind}, has none: add it with python -m tests.test_golden --update)")


if __name__ == "__main__" and "--update" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        runs = {}
        for t in (1, 2):
            (Path(d) / str(t)).mkdir()
            runs[machine_kind(t)] = _run(Path(d) / str(t), t)
    goldens = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if any(other not in runs and any(abs(g[k] - w[k]) > 1e-5 * abs(w[k]) for run in runs.values()
                                     for g, w in zip(run, want) for k in KEYS) for other, want in goldens.items()):
        goldens = {}  # the numbers moved: the other kinds' runs are stale, regenerate them there
    goldens.update(runs)
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(goldens, indent=1) + "\n")
    print(f"wrote {GOLDEN}: golden runs of {', '.join(goldens)}")
