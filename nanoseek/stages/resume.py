"""--resume for the fine-tuning stages (grpo, sft): which settings a resumed run inherits, checkpoints that carry
the training state, and putting that state back, so a run killed at any moment continues as if it never stopped
(on CPU with the same thread count: the same metrics.jsonl and final weights, bit for bit). pretrain.py has its
own variant, which also reshards the state of several processes.

A resumable checkpoint is an ordinary one (model.safetensors, config.json, tokenizer.json, meta.json) plus
train_state/state.pt: the optimizer, the random generators and the stage's own counters, checksummed in
meta.json with the rest. Only the latest checkpoint keeps its train_state (a resume only ever reads the latest,
and the optimizer's moments would triple the size of every older one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from .. import checkpoint as ckpt
from ..errors import CheckpointError

# Fields that describe this launch, never inherited from the stored run; and those that may differ between a run
# and its resumption without changing what it computes (the rest are inherited unless given again: the thread
# count too, since fp32 sums over 1 or 2 threads differ in the last bit).
INVOCATION = {"resume", "force"}
RESUME_FREE = INVOCATION | {"threads", "device", "save_every", "tensorboard"}
STATE_FILE = Path("train_state") / "state.pt"


class Resumable:
    """What the configs of the resumable fine-tuning commands (sft, grpo, distill) share: the flags required unless
    --resume, --resume against --force, and the configuration a --resume continues (`resumed_config`). A config
    class names its `command`, its `required` flags and the limits a resume may raise (`extendable`), and calls
    `check_resume()` from its __post_init__."""

    command: ClassVar[str]
    required: ClassVar[tuple[str, ...]]  # config fields that must be given unless --resume
    extendable: ClassVar[tuple[str, ...]] = ()

    def check_resume(self) -> None:
        if self.resume and self.force:
            raise ValueError("--resume continues the run in --out and --force replaces it: give one of them")
        if not self.resume and not all(getattr(self, name) for name in self.required):
            flags = [f"--{name.replace('_', '-')}" for name in self.required]
            listed = flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} and {flags[-1]}"
            raise ValueError(f"{listed} are required (or --resume, to continue the run in --out)")

    @classmethod
    def from_cli(cls, given: dict):
        """The flags given on the command line; with --resume, the stored run's settings plus those flags."""
        return cls.resume_of(**given) if given.get("resume") else cls(**given)

    @classmethod
    def resume_of(cls, out: str, **changes):
        """The configuration that continues the run in `out` (with `changes`, e.g. steps=100 to extend it)."""
        return resumed_config(cls, cls.command, {**changes, "out": str(out)}, extendable=cls.extendable)


def resumed_config(cls, command: str, given: dict, extendable: tuple[str, ...] = (), free: set = RESUME_FREE,
                   invocation: set = INVOCATION, unnamed: str | None = None):
    """--resume: the stored run's settings, then the flags given. A given flag that changes the computation is
    refused, except a larger value (or 0, no limit) of an `extendable` limit, which lets the run go further. `free`:
    the fields that may differ without changing the computation; `invocation`: those never inherited; `unnamed`:
    the command a run.json without a "command" field belongs to (older runs of that command)."""
    if given.get("force"):
        raise ValueError("--resume continues the run in --out and --force replaces it: give one of them")
    out = Path(given["out"])
    saved = read_run(cls, command, out, unnamed)
    for name, value in given.items():
        if name in free or name == "out" or value == saved.get(name, value):
            continue
        if name in extendable and (value > saved.get(name, 0) > 0 or (value == 0 and name != "steps")):
            change = (f"extending the run from {saved[name]} to {value} steps" if name == "steps" else
                      f"--{name.replace('_', '-')} {saved.get(name)} → {value}: the run goes on")
            print(f"--resume: {change}", file=sys.stderr)
            continue
        raise ValueError(f"--resume: --{name.replace('_', '-')} {value} differs from the run being resumed "
                         f"({saved.get(name)}); continue it with its own settings or start a new --out")
    inherited = {k: v for k, v in saved.items() if k not in invocation}
    return cls(**{**inherited, **given, "resume": True})


def read_run(cls, command: str, out: Path, unnamed: str | None = None) -> dict:
    """The settings of the `command` run stored in out/run.json that are fields of `cls`; ValueError if there is
    none (a run.json without a "command" field counts as `unnamed`'s)."""
    try:
        saved = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        raise ValueError(f"--resume: {out} holds no {command} run (no readable run.json)") from None
    if saved.get("command", unnamed) != command:
        raise ValueError(f"--resume: {out} holds a {saved.get('command')} run, not a {command} run")
    known = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in saved.items() if k in known}


# ----------------------------------------------------------------------------- saving


def save(out: Path, step: int, model, tokenizer, meta: dict, state: dict) -> Path:
    """Atomically write OUT/checkpoints/step_N with `state` (torch.save-able) under train_state/; then drop the
    train_state of the older checkpoints."""
    path = Path(out) / "checkpoints" / f"step_{step:06d}"
    with ckpt.atomic_dir(path) as tmp:
        (tmp / STATE_FILE.parent).mkdir()
        torch.save(state, tmp / STATE_FILE)
        tokenizer.save(tmp / "tokenizer.json")
        ckpt.write_model_files(model, tmp, meta={"step": step, **meta})  # checksums the train state too
    for old in ckpt.step_dirs(out)[:-1]:
        _drop_train_state(old)
    return path


def _drop_train_state(path: Path) -> None:
    """Remove a checkpoint's train_state. meta.json stops listing it first (atomically), so a kill in between
    leaves an unlisted file behind, never a checkpoint that fails its checksums."""
    if not (path / STATE_FILE.parent).is_dir():
        return
    meta = json.loads((path / "meta.json").read_text())
    prefix = STATE_FILE.parent.name + "/"
    meta["checksums"] = {k: v for k, v in meta.get("checksums", {}).items() if not k.startswith(prefix)}
    tmp = path / f".meta.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path / "meta.json")
    shutil.rmtree(path / STATE_FILE.parent, ignore_errors=True)


def rng_state() -> dict:
    """Every process-wide generator a step may draw from (the stages' own generators are saved by the stages)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def stream_state(stream) -> dict:
    """A tasks.ProblemStream's position: the questions it handed out, its counters and its buffered draws (kept
    whole rather than regenerated, so a resumed stream yields the same problems whatever the task's generator)."""
    return {k: v for k, v in vars(stream).items() if k != "task"}


def load_stream_state(stream, state: dict) -> None:
    vars(stream).update(state)


# ----------------------------------------------------------------------------- resuming


def latest(out: Path) -> tuple[Path, dict]:
    """(the latest checkpoint of the run in OUT, its train state); one-line errors for what cannot resume."""
    steps = ckpt.step_dirs(out)
    if not steps:
        raise ValueError(f"--resume: {out} has no checkpoint to resume from (pass --force to start it over)")
    path = steps[-1]
    ckpt.verify(path)  # CheckpointError naming a damaged file
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"{path}: no {STATE_FILE} (a checkpoint written without training state cannot be "
                              "resumed; pass --force to start the run over)")
    return path, torch.load(path / STATE_FILE, weights_only=False)


def load_weights(path: Path, model) -> None:
    """The checkpoint's weights into `model` in place (the optimizer and any bf16 view keep pointing at them)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path / "model.safetensors")))


def check_precision(path: Path, precision: str) -> None:
    """A run continues in the precision it trained in (bit-exactness needs it; `auto` may resolve otherwise on
    another host)."""
    trained = json.loads((path / "meta.json").read_text()).get("precision")
    if trained and trained != precision:
        raise ValueError(f"--resume: {path} was trained in {trained}, this run resolves to {precision}; pass "
                         f"--precision {trained}")


def nothing_to_do(path: Path, step: int) -> Path:
    print(f"--resume: the run finished at step {step} ({path}); nothing to do (a larger --steps or limit "
          "extends it where the stage allows)", file=sys.stderr)
    return path
