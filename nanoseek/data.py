"""Token streams and the packed, resumable pretraining loader.

Documents are encoded, each followed by eos, and concatenated into one flat stream per split (V3 packs
documents without cross-document masking, report §4.1). The stream is cut into windows of seq_len + 1
tokens (inputs and shifted targets); each epoch visits the windows in a seeded random order. The loader's
whole state is (epoch, position), so a checkpoint restores it exactly.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from .tokenizer import Tokenizer


def encode_documents(docs: list[str], tokenizer: Tokenizer, chunk: int = 2048) -> np.ndarray:
    """All documents as one int32 stream, each followed by the eos id."""
    eos = tokenizer.eos_id
    parts = []
    for i in range(0, len(docs), chunk):
        for ids in tokenizer.encode_batch(docs[i:i + chunk]):
            parts.append(np.asarray(ids + [eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


class PackedLoader:
    """Batches of windows of seq_len + 1 tokens from a flat stream, in a seeded order per epoch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, shuffle: bool = True):
        self.tokens, self.seq_len, self.seed, self.shuffle = tokens, seq_len, seed, shuffle
        self.n_windows = max(0, (len(tokens) - 1) // seq_len)
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_windows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def check_batch(self, n: int) -> None:
        if self.n_windows < n:
            raise ValueError(f"corpus too small: {len(self.tokens)} tokens make {self.n_windows} sequences of "
                             f"{self.seq_len + 1} tokens, fewer than one batch of {n}")

    def next(self, n: int) -> torch.Tensor:
        """The next n windows as a (n, seq_len + 1) int64 tensor; wraps into a new epoch when needed."""
        self.check_batch(n)
        rows = []
        while len(rows) < n:
            if self.position == self.n_windows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            start = int(self._order[self.position]) * self.seq_len
            rows.append(self.tokens[start:start + self.seq_len + 1])
            self.position += 1
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "n_windows": self.n_windows, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n_windows"] != self.n_windows or state["seed"] != self.seed:
            raise ValueError("the data changed since the checkpoint was written "
                             f"({state['n_windows']} windows then, {self.n_windows} now)")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


def fixed_batches(tokens: np.ndarray, seq_len: int, batch: int, n_batches: int) -> list[torch.Tensor]:
    """The first n_batches × batch windows in order: the same held-out set at every evaluation."""
    loader = PackedLoader(tokens, seq_len, seed=0, shuffle=False)
    n_batches = min(n_batches, loader.n_windows // batch)
    return [loader.next(batch) for _ in range(n_batches)]


# ----------------------------------------------------------------------------- on-disk cache


def fingerprint(*parts) -> str:
    """A short hash of JSON-able parts (corpus recipe, tokenizer settings) naming a cache entry."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


