"""Golden losses (torchtitan-style): a fixed-seed `tiny` pretraining run in fp32 on one thread must reproduce
the committed per-step losses, MTP losses, gradient norms and expert-load MaxVio exactly, bit for bit. Any change
to the model, the loss, the optimizer, the data pipeline or the initialisation shows up here first; a change
that is meant to alter the numbers regenerates the file, and the diff shows by how much:

    python -m tests.test_golden --update
"""

import json
import random
import sys
from pathlib import Path

from nanoseek.cli import main

GOLDEN = Path(__file__).parent / "golden" / "tiny_pretrain.json"
KEYS = ("loss", "mtp_loss", "grad_norm", "maxvio", "lr")


def _run(tmp: Path) -> list[dict]:
    r = random.Random(0)
    words = "the cat sat on a mat and a dog ran to the big red house near the old river".split()
    corpus = tmp / "docs.txt"
    corpus.write_text("\n\n".join(" ".join(r.choice(words) for _ in range(r.randint(20, 90))) for _ in range(300)))
    out = tmp / "run"
    assert main(["pretrain", "--preset", "tiny", "--data", str(corpus), "--vocab-size", "300", "--steps", "6",
                 "--batch-size", "8", "--seq-len", "64", "--precision", "fp32", "--threads", "1", "--eval-every",
                 "0", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: row[k] for k in ("step", *KEYS)} for row in rows]


def test_tiny_pretraining_reproduces_the_golden_losses_exactly(tmp_path):
    got, want = _run(tmp_path), json.loads(GOLDEN.read_text())
    assert len(got) == len(want) == 6
    for g, w in zip(got, want):
        assert g == w, f"step {w['step']}: {g} != golden {w} (regenerate with python -m tests.test_golden --update)"


if __name__ == "__main__" and "--update" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(_run(Path(d)), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
