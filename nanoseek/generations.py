"""Which model a config builds: DeepSeek-V3 (model.py), V3.2 with sparse attention (sparse.py) or V4 with
compressed attention and hyper-connections (model_v4.py). The later generations subclass the V3 Transformer,
so this module sits above all three; everything that builds a model from a config it did not choose itself
(checkpoints, Hugging Face import, pretraining) goes through `build_model`."""

from __future__ import annotations

from .config import ModelConfig, family_entry
from .model import Transformer
from .model_v4 import TransformerV4
from .sparse import TransformerV32

CLASSES = {"v3": Transformer, "v32": TransformerV32, "v4": TransformerV4}  # keyed like config.FAMILIES


def build_model(cfg: ModelConfig) -> Transformer:
    """A freshly initialised model of cfg's generation (cfg.family)."""
    return family_entry(CLASSES, cfg.family, "generations.CLASSES")(cfg)
