"""OUT/metrics.jsonl: one JSON object per line, each with `step` and named scalars. Reports and plots are built
from these files, never from state inside a script.

`--tensorboard DIR` (every training stage) mirrors each record's numeric scalars into a TensorBoard event file,
for users whose dashboards already read those; metrics.jsonl stays the source of truth, and the event file follows
it: a resumed run hides (purges) the steps a killed run logged past its checkpoint, a fresh run everything an
earlier run left in DIR. TensorBoard needs the optional `tensorboard` package (pip install tensorboard).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TENSORBOARD_HELP = ("also write every numeric scalar of metrics.jsonl, with its step, as TensorBoard events in DIR "
                    "(one directory per run, e.g. runs/tb/NAME; needs pip install tensorboard)")


def check_tensorboard(logdir: str) -> None:
    """Refuse --tensorboard at the start of a command, not at its first logged step, when the package is missing.
    find_spec imports nothing, so the check costs nothing when the package is there."""
    if logdir and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or pip install 'nanoseek[tensorboard]')")


class MetricsLog:
    """OUT/metrics.jsonl: one JSON object per line, each with `step`; with `tensorboard`, the same scalars as
    TensorBoard events in that directory."""

    def __init__(self, path: Path, tensorboard: str = ""):
        check_tensorboard(tensorboard)
        self.path, self.tensorboard = Path(path), tensorboard
        self._writer, self._purge_step = None, 0  # the writer is made at the first record, once the purge is known

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard:
            self._write_scalars(record)

    def truncate_after(self, step: int) -> None:
        """Drop records logged after `step` (a resumed run re-logs them)."""
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(self.path)
        self._purge_step = step + 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write_scalars(self, record: dict) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step writes a restart marker: TensorBoard hides the events of earlier files in DIR at steps
            # >= it, as truncate_after drops them from metrics.jsonl (0 on a fresh run: the whole earlier run)
            self._writer = SummaryWriter(self.tensorboard, purge_step=self._purge_step)
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()  # a killed run's event file holds what its metrics.jsonl holds


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
