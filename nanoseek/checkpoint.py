"""nanoseek checkpoint directories: config.json (ModelConfig), model.safetensors, tokenizer.json, meta.json.

Every save goes to a temporary sibling directory that is renamed into place, so a crash never leaves a
half-written checkpoint behind (training state is added by the pretraining stage under train_state/).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .errors import CheckpointError
from .generations import build_model
from .model import Transformer


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_dir(path: str | Path):
    """Context manager yielding a temporary directory that replaces `path` on success."""
    return _AtomicDir(Path(path))


class _AtomicDir:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        replace_dir(self.tmp, self.path)
        return False


def replace_dir(tmp: Path, path: Path) -> None:
    """Move a finished directory into place; an existing one is swapped out first, then removed."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_model_files(model: Transformer, out: Path, tokenizer_file: str | Path | None = None,
                      meta: dict | None = None, state: dict | None = None) -> None:
    """Write config.json, model.safetensors, optional tokenizer.json and meta.json into an existing directory.

    `state` replaces model.state_dict() (e.g. the full state gathered from a sharded model)."""
    model.cfg.save(out / "config.json")
    state = {k: v.detach().contiguous() for k, v in (state if state is not None else model.state_dict()).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "nanoseek"})
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "meta.json")
    record = {**(meta or {}), "checksums": {f: _sha256(out / f) for f in files}}
    (out / "meta.json").write_text(json.dumps(record, indent=2) + "\n")


def verify(path: str | Path) -> dict:
    """Check every file against the sha256 in meta.json; returns meta, raises CheckpointError naming damage."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'meta.json'}: missing or unreadable ({e})") from None
    for name, digest in meta.get("checksums", {}).items():
        file = path / name
        if not file.exists():
            raise CheckpointError(f"{file}: missing (listed in meta.json)")
        if _sha256(file) != digest:
            raise CheckpointError(f"{file}: damaged (checksum differs from meta.json)")
    return meta


def step_dirs(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (a directory only appears once fully written)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory standing for its latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a file, not a checkpoint or run directory")
    if (path / "config.json").exists():
        return path
    steps = step_dirs(path)
    if steps:
        return steps[-1]
    inside = sorted(p.name for p in path.iterdir() if p.is_dir() and ((p / "config.json").exists() or step_dirs(p)))
    hint = f"; the runs inside it: {', '.join(inside[:12])}{' …' if len(inside) > 12 else ''}" if inside else ""
    raise CheckpointError(f"{path}: neither a checkpoint (no config.json) nor a run directory with "
                          f"checkpoints/{hint}")


def save_model(model: Transformer, path: str | Path, tokenizer_file: str | Path | None = None,
               meta: dict | None = None) -> Path:
    """Atomically write a checkpoint directory for `model`."""
    with atomic_dir(path) as tmp:
        write_model_files(model, tmp, tokenizer_file, meta)
    return Path(path)


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a nanoseek checkpoint (or run) directory, or of a Hugging Face DeepSeek one."""
    file = (resolve(path) if Path(path).is_dir() else Path(path)) / "config.json"
    if not file.exists():
        raise CheckpointError(f"{file}: missing (not a checkpoint directory)")
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    try:
        if "model_type" in d:
            from .hf import config_from_hf

            return config_from_hf(d)
        return ModelConfig.from_dict(d)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{file}: {e}") from None


_INIT_ON_CPU_BELOW = 1 << 25  # parameters (~0.3 s of initialisation on our CPUs)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """Load a nanoseek checkpoint directory (config.json + model.safetensors) into a Transformer.

    The files are checked against the sha256 sums in meta.json first, so flipped bytes are named, not loaded."""
    path = resolve(path)
    if (path / "meta.json").exists():
        verify(path)
    cfg = read_config(path)
    file = path / "model.safetensors"
    if not file.exists():
        raise CheckpointError(f"{file}: missing")
    try:
        state = load_file(str(file))
    except Exception as e:  # safetensors has its own error types for corrupt files
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    if sum(t.numel() for t in state.values()) < _INIT_ON_CPU_BELOW:
        # the meta device skips initialising what the file overwrites, but its first use imports torch._dynamo
        # (~1 s of every eval, sample or chat start); a small model initialises faster than that. fork_rng: the
        # load leaves the global random state as the meta path does
        with torch.random.fork_rng(devices=[]):
            model = build_model(cfg)
    else:
        with torch.device("meta"):
            model = build_model(cfg)
        model = model.to_empty(device="cpu")
    model.reset_buffers()
    expected = model.state_dict()
    for key in sorted(set(expected) | set(state)):
        if key not in state:
            raise CheckpointError(f"{file}: missing tensor {key}")
        if key not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {key}")
        if state[key].shape != expected[key].shape:
            raise CheckpointError(f"{file}: tensor {key} has shape {tuple(state[key].shape)}, "
                                  f"the config implies {tuple(expected[key].shape)}")
    model.load_state_dict(state)
    return model.to(dtype)


def load(path: str | Path, dtype: torch.dtype = torch.float32, *, require_tokenizer: bool = False):
    """(model, tokenizer or None) of a nanoseek checkpoint directory, or of a run's latest checkpoint.

    require_tokenizer: a checkpoint without tokenizer.json is a CheckpointError (the text stages need one), named
    before the weights are read."""
    path = resolve(path)
    file = path / "tokenizer.json"
    if require_tokenizer and not file.exists():
        raise CheckpointError(f"{path}: the checkpoint has no tokenizer.json (text stages need one)")
    model = load_model(path, dtype)
    tokenizer = None
    if file.exists():
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer.load(file)
    return model, tokenizer


def recorded_precision(path: str | Path) -> str | None:
    """The compute precision ("fp32" or "bf16") the checkpoint's meta.json says it was trained in, or None (an
    imported checkpoint, or one older than the record). Reads meta.json only: no checksum pass, no weights."""
    try:
        precision = json.loads((resolve(path) / "meta.json").read_text()).get("precision")
    except (CheckpointError, OSError, ValueError):  # a model given in memory (tests, bench/) has no directory
        return None
    return precision if precision in ("fp32", "bf16") else None
