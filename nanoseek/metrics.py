"""OUT/metrics.jsonl: one JSON object per line, each with `step` and named scalars. Reports and plots are built
from these files, never from state inside a script."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """OUT/metrics.jsonl: one JSON object per line, each with `step`."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records logged after `step` (a resumed run re-logs them)."""
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(self.path)


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
