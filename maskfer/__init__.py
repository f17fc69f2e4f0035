"""maskfer: stage 2 of CAFE, the sigmoid-mask CNN trained against cached frozen features."""
from featcache.errors import FerError  # the base of every error meant for a user, featcache's and maskfer's

__all__ = ["FerError", "Predictor"]


def __getattr__(name: str):
    # `from maskfer import Predictor` without importing torch for every `import maskfer` (the CLI starts fast)
    if name == "Predictor":
        from maskfer.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'maskfer' has no attribute {name!r}")
