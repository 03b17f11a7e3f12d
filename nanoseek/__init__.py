"""nanoseek: the DeepSeek-V3 / R1 recipe as a small, tested PyTorch codebase."""

from .checkpoint import load
from .config import PRESETS, ModelConfig, get_preset
from .model import Transformer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Transformer", "PRESETS", "get_preset", "load", "__version__"]
