"""nanoseek: the DeepSeek-V3 / R1 recipe as a small, tested PyTorch codebase.

    from nanoseek import ModelConfig, Transformer, build_model, get_preset, load

The names are resolved on first use (PEP 562), so `nanoseek --help` and the config layer start without torch.
"""

from importlib import import_module

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Transformer", "PRESETS", "build_model", "get_preset", "load", "__version__"]

_WHERE = {"ModelConfig": "config", "PRESETS": "config", "get_preset": "config", "Transformer": "model",
          "build_model": "generations", "load": "checkpoint"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")
