"""Pieces several stage scripts share: the run directory (run.json, --force), Ctrl-C, and the metrics file. Loading a checkpoint is checkpoint.load; pretraining's data cache is stages/pretrain_data.py."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import threading
from pathlib import Path

from ..metrics import MetricsLog, read_metrics  # noqa: F401  (re-exported for the stages)


def write_run_json(out: Path, command: str, settings: dict) -> None:
    """OUT/run.json: the command and every setting, so a later --resume (or a refusal) knows whose run it is."""
    (Path(out) / "run.json").write_text(json.dumps({"command": command, **settings}, indent=2) + "\n")


RUN_FILES = ("run.json", "metrics.jsonl", "checkpoints", "report.md", "figures")  # what a stage writes in OUT


def clear_run(out: Path) -> None:
    """--force: remove an earlier run's own files from OUT (never anything else; the data cache is kept)."""
    for name in RUN_FILES:
        target = Path(out) / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


class StopRequest:
    """Ctrl-C as a request: the first one asks the stage to stop at its next step boundary (it saves a checkpoint,
    then ends with status 130); a second one aborts at once. A context manager; a no-op outside the main thread."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.requested, self._previous = enabled, False, None

    def __enter__(self) -> "StopRequest":
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step to save a checkpoint (Ctrl-C again to abort)", file=sys.stderr, flush=True)
