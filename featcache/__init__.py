"""featcache: run a frozen image encoder once over a dataset and cache its features in HDF5.

Public API::

    from featcache import open_store
    from featcache.build import build_store
    build_store("features.h5", "ferplus", "data/ferplus", model="openai/clip-vit-base-patch32")
    ds = open_store("features.h5").dataset("ferplus")
    feats = ds.features("clip-vit-base-patch32", ds.indices("train"))   # (n, 2, 512): orig + flip

Every error meant for a user derives from :class:`FerError` (featcache.errors), maskfer's too.

``open_store`` and ``StoreError`` are loaded on first use (PEP 562): ``import featcache.errors``,
which maskfer.config needs at CLI start, must not load h5py and numpy (about 80 ms).
"""
__version__ = "0.1.0"

from typing import TYPE_CHECKING  # noqa: E402

from featcache.errors import FerError  # noqa: E402

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ below loads them
    from featcache.store import StoreError, open_store  # noqa: F401

__all__ = ["__version__", "FerError", "open_store", "StoreError"]

_LAZY = ("open_store", "StoreError")


def __getattr__(name: str):
    if name in _LAZY:
        # The one project import inside a function that tests/test_layering.py allows (see above).
        from featcache import store

        globals().update({n: getattr(store, n) for n in _LAZY})
        return globals()[name]
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
