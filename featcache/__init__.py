"""featcache: run a frozen image encoder once over a dataset and cache its features in HDF5.

Public API::

    from featcache import build, open_store
    build("features.h5", "ferplus", "data/ferplus", model="openai/clip-vit-base-patch32")
    ds = open_store("features.h5").dataset("ferplus")
    feats = ds.features("clip-vit-base-patch32", ds.indices("train"))   # (n, 2, 512): orig + flip
"""
__version__ = "0.1.0"

from featcache.store import StoreError, open_store  # noqa: E402

__all__ = ["__version__", "open_store", "StoreError", "build"]


def build(*args, **kwargs):
    """Build (or complete) a feature store; see :func:`featcache.build.build_store`."""
    from featcache.build import build_store  # torch/transformers load only when building

    return build_store(*args, **kwargs)
