"""Pieces every stage script shares: checkpoints in and out, the run directory, Ctrl-C, and the data preparation
(corpus → tokenizer → token streams)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from .. import checkpoint as ckpt
from ..checkpoint import atomic_dir
from ..errors import CheckpointError
from ..metrics import MetricsLog, read_metrics  # noqa: F401  (re-exported for the stages)
from ..config import get_preset
from ..data import encode_documents, fingerprint
from ..tokenizer import Tokenizer

DATA_VERSION = 5  # bump when the corpus recipe or the tokenizer training changes (3: held-out split by content; 4: no preamble; 5: sums split by their signed terms, steps begin "First,"/"Then")


def load_checkpoint(path, dtype=None):
    """(model, tokenizer) of a checkpoint or run directory; a checkpoint without tokenizer.json is an error."""
    import torch

    model, tokenizer = ckpt.load(path, dtype or torch.float32)
    if tokenizer is None:
        raise CheckpointError(f"{path}: the checkpoint has no tokenizer.json (text stages need one)")
    return model, tokenizer


def save_step(out: Path, step: int, model, tokenizer, meta: dict) -> Path:
    """Atomically write OUT/checkpoints/step_N (model, config, tokenizer, meta with checksums); returns it."""
    path = Path(out) / "checkpoints" / f"step_{step:06d}"
    with atomic_dir(path) as tmp:
        tokenizer.save(tmp / "tokenizer.json")  # checksummed with the rest by write_model_files
        ckpt.write_model_files(model, tmp, meta={"step": step, **meta})
    return path


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


def cache_root() -> Path:
    return Path(os.environ.get("NANOSEEK_CACHE", Path.home() / ".cache" / "nanoseek"))


def _data_key(cfg, tokenizer_file: str | Path = "") -> str:
    if cfg.data:
        from glob import glob

        files = sorted({f for pattern in cfg.data for f in glob(os.path.expanduser(pattern), recursive=True)})
        source = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files] or cfg.data
    else:
        source = ["embedded", cfg.data_seed, cfg.n_problems] + (
            [cfg.easy_problems, cfg.easy_args] if cfg.easy_problems else []) + (
            [cfg.natural_share] if cfg.natural_share != 1 else [])
    tokenizer_file = tokenizer_file or cfg.tokenizer
    if tokenizer_file:  # known by its content, so a run given another run's tokenizer reuses that run's streams
        digest = hashlib.sha256(Path(tokenizer_file).read_bytes()).hexdigest()[:16]
        return fingerprint(DATA_VERSION, source, ["file", digest])
    return fingerprint(DATA_VERSION, source, "", cfg.vocab_size or get_preset(cfg.preset).vocab_size)


def _split_documents(cfg) -> dict[str, list[str]]:
    from ..corpus import build_default_corpus, read_user_data

    if not cfg.data:
        return build_default_corpus(seed=cfg.data_seed, n_problems=cfg.n_problems, progress=True,
                                    easy_problems=cfg.easy_problems, easy_args=cfg.easy_args,
                                    natural_share=cfg.natural_share)
    docs = read_user_data(cfg.data)
    order = np.random.default_rng(cfg.data_seed).permutation(len(docs))
    n_held = max(1, len(docs) // 50) if len(docs) > 1 else 0
    held = set(order[:n_held].tolist())
    return {"train": [d for i, d in enumerate(docs) if i not in held], "heldout": [docs[i] for i in sorted(held)]}


def _build(cfg, dest: Path) -> None:
    docs = _split_documents(cfg)
    print(f"data: {len(docs['train'])} training and {len(docs['heldout'])} held-out documents", file=sys.stderr)
    if cfg.tokenizer:
        tokenizer = Tokenizer.load(cfg.tokenizer)
    else:
        tokenizer = Tokenizer.train(docs["train"], cfg.vocab_size or get_preset(cfg.preset).vocab_size)
    with atomic_dir(dest) as tmp:
        tokenizer.save(tmp / "tokenizer.json")
        for split in ("train", "heldout"):
            np.save(tmp / f"{split}.npy", encode_documents(docs[split], tokenizer))
        (tmp / "meta.json").write_text(json.dumps({"key": _data_key(cfg), "documents": {
            k: len(v) for k, v in docs.items()}}) + "\n")


def prepare_data(cfg, out: Path) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """Tokenizer and train/held-out token streams for a run, built once and kept in OUT/data.

    The embedded corpus is also cached across runs in $NANOSEEK_CACHE (default ~/.cache/nanoseek).
    """
    key = _data_key(cfg)
    data_dir = Path(out) / "data"
    if not _is_current(data_dir, key):
        shared = cache_root() / "data" / key
        if not cfg.data and _is_current(shared, key):
            with atomic_dir(data_dir) as tmp:
                shutil.copytree(shared, tmp, dirs_exist_ok=True)
        else:
            _build(cfg, data_dir)
            if not cfg.data:
                _share(data_dir, key)
    if not cfg.data and not cfg.tokenizer:  # also under the key of a run given this tokenizer (e.g. a student)
        _share(data_dir, _data_key(cfg, data_dir / "tokenizer.json"))
    tokenizer = Tokenizer.load(data_dir / "tokenizer.json")
    return tokenizer, np.load(data_dir / "train.npy"), np.load(data_dir / "heldout.npy")


def _share(data_dir: Path, key: str) -> None:
    """Copy a run's data into the cross-run cache under `key` (unless it is there already)."""
    shared = cache_root() / "data" / key
    if _is_current(shared, key):
        return
    shared.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(shared) as tmp:
        shutil.copytree(data_dir, tmp, dirs_exist_ok=True)
        meta = json.loads((tmp / "meta.json").read_text())
        (tmp / "meta.json").write_text(json.dumps({**meta, "key": key}) + "\n")


def _is_current(path: Path, key: str) -> bool:
    try:
        return json.loads((path / "meta.json").read_text())["key"] == key
    except (OSError, ValueError, KeyError):
        return False
