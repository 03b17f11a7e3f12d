"""The speedrun's stage runner: a command forked from its server behaves as the same command in a new interpreter
(output, exit status, Ctrl-C), and without os.fork the runner starts that interpreter instead."""

import ast
import os
import random
import signal
import threading
import time
from pathlib import Path

from nanoseek import checkpoint as ckpt
from nanoseek.stages.forkserver import StageRunner

COMMANDS = [["stats", "tiny"], ["stats", "--bogus"], ["pretrain", "--steps", "0", "--out", "unused"]]


def _outputs(runner: StageRunner, where: Path) -> list:
    where.mkdir()
    results = []
    for i, args in enumerate(COMMANDS):
        out, err = where / f"{i}.out", where / f"{i}.err"
        code = runner.run(args, err, stdout=out)
        results.append((code, out.read_text() if out.exists() else "", err.read_text()))
    return results


def test_a_forked_command_equals_the_command_in_a_new_interpreter(tmp_path, monkeypatch):
    with StageRunner("nanoseek") as runner:
        forked = _outputs(runner, tmp_path / "forked")
    monkeypatch.delattr(os, "fork")
    with StageRunner("nanoseek") as runner:
        spawned = _outputs(runner, tmp_path / "spawned")
    assert forked == spawned
    assert [code for code, _, _ in forked] == [0, 2, 2]
    assert "total parameters" in forked[0][1] and "usage: nanoseek stats" in forked[1][2]
    assert "--steps must be >= 1" in forked[2][2]


def test_ctrl_c_reaches_the_stage_which_saves_and_exits_130(tmp_path):
    r = random.Random(0)
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(" ".join(r.choice("a cat sat on the mat by a red dog".split()) for _ in range(60))
                                  for _ in range(200)))
    run = tmp_path / "run"
    args = ["pretrain", "--preset", "tiny", "--data", str(corpus), "--vocab-size", "300", "--steps", "100000",
            "--batch-size", "4", "--seq-len", "32", "--save-every", "100000", "--precision", "fp32", "--out", str(run)]
    with StageRunner("nanoseek") as runner:
        result = {}
        worker = threading.Thread(target=lambda: result.update(code=runner.run(args, tmp_path / "log")))
        worker.start()
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 300  # a safety net for a hung child, not a speed bound
        while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
            time.sleep(0.02)
        assert runner.child is not None and runner.child != runner._server.pid  # the stage's own process
        os.kill(runner.child, signal.SIGINT)
        worker.join(300)
        assert runner._server.poll() is None  # the server ignores Ctrl-C: it is there for the next stage
    assert result["code"] == 130
    assert "interrupted after step" in (tmp_path / "log").read_text()
    assert 3 <= int(ckpt.step_dirs(run)[-1].name[5:]) < 100000


def test_no_stage_imports_the_command_line():
    """The CLI sits above the stages (it dispatches to them), so a stage that imported it would be a cycle; the
    runner is told which program to fork instead."""
    stages = Path(__file__).parent.parent / "nanoseek" / "stages"
    for file in sorted(stages.glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # relative to nanoseek.stages: level 1 is it, level 2 nanoseek
                base = ".".join(["nanoseek", "stages"][: 3 - node.level]) if node.level else ""
                module = ".".join(p for p in (base, node.module) if p)
                names = [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            bad = [n for n in names if n == "nanoseek.cli" or n.startswith("nanoseek.cli.")]
            assert not bad, f"{file.name} imports the command line: {bad}"
