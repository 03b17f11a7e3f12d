"""Pretraining's data: the corpus (embedded, or --data files) split into training and held-out documents, a
tokenizer trained on the training split (or --tokenizer), and both splits as token streams, built once per run
in OUT/data and, for the embedded corpus, shared across runs in $NANOSEEK_CACHE (default ~/.cache/nanoseek).

A cache entry is known by a key of everything that shapes it (DATA_VERSION, the source, the tokenizer), so a
changed recipe builds anew and an unchanged one is reused, never half-built (directories are written atomically).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_dir
from ..config import get_preset
from ..data import encode_documents, fingerprint
from ..tokenizer import Tokenizer

# bump when the corpus recipe or the tokenizer training changes (3: held-out split by content; 4: no preamble;
# 5: sums split by their signed terms, steps begin "First,"/"Then")
DATA_VERSION = 5


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
