"""The whole pipeline end to end on the tiny preset: every stage runs, the report is made from their outputs."""

import json
import random

from nanoseek.cli import main


def test_speedrun_smoke(tmp_path):
    r = random.Random(0)
    words = "the cat sat on a mat and the dog ran to the red house near a tree".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(r.choice(words) for _ in range(60)) for _ in range(200)))
    out = tmp_path / "run"
    args = ["speedrun", "--out", str(out), "--preset", "tiny", "--student", "tiny", "--budget", "0.03",
            "--data", str(corpus), "--vocab-size", "320", "--eval-n", "4",
            "--model-overrides", json.dumps({"max_seq_len": 512, "original_seq_len": 512})]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    for label in ("teacher base", "teacher + GRPO", "student base", "student distilled", "student + GRPO"):
        assert label in report
    assert "The R1 comparison" in report and len(list((out / "figures").glob("*.png"))) == 6
    timings = json.loads((out / "timings.json").read_text())
    assert {"pretrain", "student-pretrain", "grpo", "sample", "student-grpo"} <= set(timings)
    # a second call finds every stage done and only rewrites the report
    assert main(args) == 0 and json.loads((out / "timings.json").read_text()) == timings
