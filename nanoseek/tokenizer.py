"""Byte-level BPE tokenizer with nanoseek's special tokens (the R1 format itself lives in template.py).

`Tokenizer.train(texts, vocab_size)` trains one with the `tokenizers` library; `Tokenizer.load(path)` reads
any Hugging Face `tokenizer.json` (DeepSeek-V3's included) or a directory holding one. Special tokens are
single ids and are matched in raw text, so `<think>` written in a document encodes as one token.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .template import TAGS

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, *TAGS]  # the R1 tags are single tokens, so a completion's format is cheap to learn
MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # every byte, the special tokens, and at least one merge

# Names other tokenizers use for the same roles (DeepSeek-V3 spells them with full-width bars).
_ALIASES = {
    "bos": [BOS, "<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<|endoftext|>"],
    "eos": [EOS, "<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"],
    "pad": [PAD, "<｜▁pad▁｜>", "<pad>", "<|pad|>"],
}

class Tokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer` that knows its bos/eos/pad ids."""

    def __init__(self, tk: HFTokenizer):
        self.tk = tk
        vocab = tk.get_vocab(with_added_tokens=True)
        self.special = {name: next((vocab[a] for a in names if a in vocab), None) for name, names in _ALIASES.items()}
        if self.special["eos"] is None:
            raise ValueError("tokenizer has no end-of-sequence token (looked for " + ", ".join(_ALIASES["eos"]) + ")")

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "Tokenizer":
        """Byte-level BPE on `texts` with SPECIAL_TOKENS first (ids 0..6). Deterministic for the same input."""
        if vocab_size < MIN_VOCAB:
            raise ValueError(f"vocab_size must be at least {MIN_VOCAB} for byte-level BPE")
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise ValueError(f"{file}: no tokenizer.json there")
        try:
            return cls(HFTokenizer.from_file(str(file)))
        except Exception as e:  # tokenizers raises its own exception type for malformed files
            raise ValueError(f"{file}: not a readable tokenizer.json ({e})") from None

    def save(self, path: str | Path) -> None:
        self.tk.save(str(path))

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self.special["eos"]

    @property
    def bos_id(self) -> int | None:
        return self.special["bos"]

    @property
    def pad_id(self) -> int:
        return self.special["pad"] if self.special["pad"] is not None else self.eos_id

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids + [self.eos_id] if eos else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)
