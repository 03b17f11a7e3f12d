"""Command options declared once: each field of a command's config dataclass carries its help, its choices and its
range, and the same declaration gives the command-line flag, its help text and the validation.

    @dataclass
    class EvalConfig:
        ckpt: str = option(help="checkpoint or run directory")
        n: int = option(100, help="held-out problems", min=1)
        task: str = option(help="task family", choices=TASK_NAMES)

        def __post_init__(self):
            check(self)          # ValueError naming the flag: "--n must be >= 1, got 0"

The CLI (cli.py) turns every field into a flag (`--max-new-tokens` for `max_new_tokens`; `positional=True` for an
argument without a flag) and builds the config, so a bad value is reported before any work starts, in one line,
and a library caller that builds the config directly gets the same ValueError. This module imports nothing heavy,
so `nanoseek --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

MISSING = dataclasses.MISSING


def option(default=MISSING, *, help: str, choices=None, min=None, max=None, above=None, below=None,
           positional: bool = False, metavar: str | None = None, default_factory=MISSING, cli: bool = True):
    """A dataclass field with its command-line declaration. min/max are inclusive, above/below exclusive bounds;
    `cli=False` keeps a field out of the command line (set by code, e.g. a stage driving another)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "min": min, "max": max,
            "above": above, "below": below, "positional": positional, "metavar": metavar, "cli": cli}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check(cfg) -> None:
    """Raise ValueError for the first field whose value breaks its declared choices or range."""
    for f in dataclasses.fields(cfg):
        m, value = f.metadata, getattr(cfg, f.name)
        if not m or value is None:
            continue
        name = f.name if m.get("positional") else flag(f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if m.get("choices") and v not in m["choices"]:
                raise ValueError(f"{name} must be one of {', '.join(map(str, m['choices']))}, got {v!r}")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}")
            for key, ok, word in (("min", lambda b: v >= b, ">="), ("max", lambda b: v <= b, "<="),
                                  ("above", lambda b: v > b, ">"), ("below", lambda b: v < b, "<")):
                bound = m.get(key)
                if bound is not None and not ok(bound):
                    raise ValueError(f"{name} must be {word} {bound}, got {v}")


# ----------------------------------------------------------------------------- output paths


def _writable_parent(path: Path) -> Path:
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot write in {parent} (permission denied)")
    return parent


def check_out_dir(path: str | Path, flag_name: str, own: bool, resumable: bool = False,
                  force: bool = False) -> None:
    """Refuse, before any work, an output directory a run must not write into.

    A missing or empty directory is fine. A non-empty one is accepted only when it holds this command's own
    output (`own`) and the user asked to continue it (`resumable`, i.e. --resume) or to replace it (--force).
    A foreign non-empty directory is never written into: nothing the user put there is ever destroyed."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag_name} {path}: is a file, not a directory")
    if not path.exists():
        _writable_parent(path)
        return
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag_name} {path}: not writable (permission denied)")
    if not any(path.iterdir()) or (own and (resumable or force)):
        return
    if own:
        raise ValueError(f"{flag_name} {path}: already holds a run of this command; pass --resume to continue it "
                         "(where supported), --force to replace it, or choose another directory")
    raise ValueError(f"{flag_name} {path}: a non-empty directory that nanoseek did not write; choose an empty or "
                     "new directory (nothing in it is touched)")


def own_run(path: str | Path, command: str) -> bool:
    """Whether `path` holds a run directory written by `command` (its run.json says so)."""
    import json

    try:
        record = json.loads((Path(path) / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("command", command) == command


def check_out_file(path: str | Path, flag_name: str, force: bool = False) -> None:
    """Refuse an output file that exists (unless --force) or cannot be written, before any work."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag_name} {path}: is a directory, not a file")
    if path.exists() and not force:
        raise ValueError(f"{flag_name} {path}: exists; pass --force to replace it or choose another file")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag_name} {path}: not writable (permission denied)")
    _writable_parent(path)


# ----------------------------------------------------------------------------- options shared by computing commands

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclasses.dataclass(kw_only=True)
class ComputeOptions:
    """--device, --precision and --threads: every command that runs a model takes them (see runtime.resolve)."""

    device: str = option("auto", help="where to run: auto (CUDA when present), cpu or cuda", choices=DEVICES)
    precision: str = option("auto", help="compute precision: auto (bf16 where the GPU or CPU has native bf16; "
                            "docs/precision.md), fp32 or bf16", choices=PRECISIONS)
    threads: int = option(0, help="CPU threads (0: every core this process may use)", min=0)
