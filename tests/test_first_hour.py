"""docs/first-hour.md stays true: every `nanoseek …` line of its bash blocks runs, verbatim, against a stand-in
for a finished speedrun (tiny models in runs/speedrun/{base,coldstart,rl,student-cold}) and exits 0."""

import json
import re
import shlex
import shutil
from pathlib import Path

from nanoseek.cli import main

DOC = Path(__file__).resolve().parent.parent / "docs" / "first-hour.md"
RL_RUNG = {"min_terms": 4, "max_terms": 4, "min_digits": 1, "max_digits": 1}


def doc_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("nanoseek ")]


def _stand_in_speedrun(root: Path) -> None:
    """What the doc's commands read from runs/speedrun, made of tiny models in seconds."""
    from nanoseek.stages.speedrun_plan import cold_start_rows

    runs = root / "runs" / "speedrun"
    assert main(["pretrain", "--preset", "tiny", "--out", str(runs / "base"), "--steps", "2", "--n-problems", "50",
                 "--eval-batches", "0"]) == 0
    cold = root / "coldstart.jsonl"
    cold.write_text("".join(json.dumps(r) + "\n" for r in cold_start_rows(16, 0)))
    # enough epochs on 16 solutions that the stand-in writes the format and stops at eos (else every sampled
    # completion runs to the token limit and the doc's evaluations take minutes)
    assert main(["sft", "--init", str(runs / "base"), "--data", str(cold), "--out", str(runs / "coldstart"),
                 "--batch-size", "8", "--epochs", "40", "--lr", "3e-3"]) == 0
    assert main(["grpo", "--init", str(runs / "coldstart"), "--out", str(runs / "rl"), "--task", "chain_sum",
                 "--task-args", json.dumps(RL_RUNG), "--steps", "1", "--eval-every", "0"]) == 0
    shutil.copytree(runs / "coldstart", runs / "student-cold")
    shutil.copy(cold, runs / "traces.jsonl")  # verified solutions in the traces' row format


def test_every_command_of_the_first_hour_runs(tmp_path, monkeypatch, capsys):
    commands = doc_commands()
    assert len(commands) >= 8 and any("--resume" in c for c in commands)
    monkeypatch.chdir(tmp_path)
    _stand_in_speedrun(tmp_path)
    for command in commands:
        capsys.readouterr()
        code = main(shlex.split(command)[1:])
        err = capsys.readouterr().err
        assert code == 0, (command, err[-2000:])
        assert "Traceback" not in err, command
    assert (tmp_path / "exports" / "my-grpo" / "config.json").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs/my-grpo/metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 15  # the resumed run went on to --steps 15
