"""The HDF5 feature store: schema (versioned, see docs/store_format.md) and the read API.

Readers open the file lazily and once per process, so a Store can be handed to
DataLoader workers: h5py handles do not survive fork, so a handle opened in the parent
is never reused in a child (the pid is checked on every access).
Writers never modify a published store in place: featcache.build writes a new copy and
atomically renames it over the old one, so readers always see a complete file.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from featcache.errors import FerError

SCHEMA_NAME = "featcache"
SCHEMA_VERSION = 1
VIEWS = ("orig", "flip")
# Per-row CRC-32 checksums (optional in v1: stores written before them have none; see docs/store_format.md)
FEATURES_CRC = "features_crc32"   # encoders/<key>/features_crc32 (n,) uint32, beside encoders/<key>/features
IMAGES_CRC = "images_crc32"       # images_crc32/<S> (n,) uint32, beside images/<S>
# Augmented views (optional in v1: `featcache build --aug-views K`; a store without them has 0 views)
AUG_FEATURES = "aug_features"     # encoders/<key>/aug_features (n, K, C), the features' dtype
AUG_PARAMS = "aug_params"         # encoders/<key>/aug_params (n, K, len(featcache.views.PARAMS)) float32
AUG_CRC = {AUG_FEATURES: "aug_features_crc32", AUG_PARAMS: "aug_params_crc32"}  # (n, K) uint32, one per view row

_STR = h5py.string_dtype("utf-8")


class StoreError(FerError):
    """A store that is missing, unreadable, of another schema, or lacks what was asked for."""


# --------------------------------------------------------------------------- writing helpers
def init_file(f: h5py.File, tool_version: str) -> None:
    """Stamp a new file with the schema; check an existing one."""
    if "schema" not in f.attrs:
        f.attrs["schema"] = SCHEMA_NAME
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["tool_version"] = tool_version
        f.require_group("datasets")
    else:
        check_schema(f, f.filename)


def check_schema(f: h5py.File, path: str | os.PathLike) -> None:
    name = f.attrs.get("schema")
    version = f.attrs.get("schema_version")
    if name != SCHEMA_NAME:
        raise StoreError(f"{path} is an HDF5 file but not a featcache store (no 'schema=featcache' attribute)")
    try:
        version = int(version)
    except (TypeError, ValueError):
        raise StoreError(f"{path} is a featcache store without a valid schema_version attribute ({version!r})") from None
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{path} uses featcache store schema v{version}; this featcache reads v{SCHEMA_VERSION}. "
            "Rebuild the store or install the matching featcache version."
        )


def write_dataset(
    f: h5py.File,
    name: str,
    *,
    ids: Sequence[str],
    labels: np.ndarray,
    splits: Sequence[str],
    attrs: dict,
    skipped: Sequence[tuple[str, str, str]] = (),
) -> h5py.Group:
    """Create the dataset group with its rows (ids, labels, splits) and provenance."""
    g = f["datasets"].create_group(name)
    g.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=_STR)
    g.create_dataset("labels", data=np.asarray(labels, dtype=np.int8))
    g.create_dataset("splits", data=np.asarray(splits, dtype=object), dtype=_STR)
    sk = np.asarray([list(s) for s in skipped], dtype=object).reshape(-1, 3)
    g.create_dataset("skipped", data=sk, dtype=_STR)  # columns: id, where, reason
    for k, v in attrs.items():
        g.attrs[k] = v if isinstance(v, (str, int, float)) else json.dumps(v, sort_keys=True)
    g.require_group("encoders")
    g.require_group("images")
    g.require_group(IMAGES_CRC)
    return g


def create_features(g: h5py.Group, key: str, n: int, dim: int, attrs: dict) -> h5py.Dataset:
    eg = g["encoders"].create_group(key)
    for k, v in attrs.items():
        eg.attrs[k] = v if isinstance(v, (str, int, float)) else json.dumps(v, sort_keys=True)
    rows = max(1, min(n, 4096))
    eg.create_dataset(FEATURES_CRC, shape=(n,), dtype=np.uint32)
    return eg.create_dataset("features", shape=(n, len(VIEWS), dim), dtype=np.float32, chunks=(rows, len(VIEWS), dim))


def create_images(g: h5py.Group, size: int, n: int) -> h5py.Dataset:
    g.require_group(IMAGES_CRC).create_dataset(str(size), shape=(n,), dtype=np.uint32)
    # One image per chunk: training reads random batches, so chunks must not span images.
    return g["images"].create_dataset(str(size), shape=(n, size, size, 3), dtype=np.uint8, chunks=(1, size, size, 3))


def create_aug(eg: h5py.Group, n: int, dim: int, n_params: int, dtype=np.float32
               ) -> tuple[h5py.Dataset, h5py.Dataset]:
    """Empty ``aug_features`` (n, 0, C) and ``aug_params`` (n, 0, P) with their checksums (n, 0), all growable
    along the views axis (``grow_aug``), chunked one view per chunk so that adding views rewrites nothing."""
    rows = max(1, min(n, 4096))
    for name, width, dt in ((AUG_FEATURES, dim, dtype), (AUG_PARAMS, n_params, np.float32)):
        eg.create_dataset(name, shape=(n, 0, width), maxshape=(n, None, width), dtype=dt, chunks=(rows, 1, width))
        eg.create_dataset(AUG_CRC[name], shape=(n, 0), maxshape=(n, None), dtype=np.uint32, chunks=(rows, 1))
    return eg[AUG_FEATURES], eg[AUG_PARAMS]


def grow_aug(eg: h5py.Group, views: int) -> None:
    """Resize the views axis of the augmented-view arrays (and their checksums) to ``views``."""
    for name, crc in AUG_CRC.items():
        eg[name].resize(views, axis=1)
        eg[crc].resize(views, axis=1)


def row_crc32(a: np.ndarray) -> np.ndarray:
    """CRC-32 (zlib) of each row's bytes, C order, little-endian: ``(len(a),)`` uint32."""
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return np.fromiter((zlib.crc32(r) for r in a.reshape(len(a), -1)), dtype=np.uint32, count=len(a))


def checksums_of(d: h5py.Dataset) -> h5py.Dataset | None:
    """The checksum dataset of ``encoders/<key>/features`` or ``images/<S>``; None in a store without them."""
    leaf = d.name.rsplit("/", 1)[1]
    if leaf == "features":  # encoders/<key>/features; image arrays are named by their size
        c = d.parent.get(FEATURES_CRC)
    elif leaf in AUG_CRC:   # encoders/<key>/aug_features, aug_params: one checksum per (row, view)
        c = d.parent.get(AUG_CRC[leaf])
    else:
        c = d.parent.parent.get(f"{IMAGES_CRC}/{leaf}")
    return c if isinstance(c, h5py.Dataset) else None


def bad_rows(d: h5py.Dataset, crc: h5py.Dataset, block_bytes: int = 64 << 20) -> tuple[np.ndarray, list[str]]:
    """Rows of ``d`` whose bytes do not match their stored CRC-32, reading every row once in blocks
    (memory stays flat). A block HDF5 cannot read at all counts as bad, and its error is returned.
    ``crc`` is ``(n,)`` (one per row) or ``(n, K)`` (one per row of each view: the augmented views);
    a row is bad when any of its checksums is."""
    n = d.shape[0]
    lead = crc.ndim  # axes of d that the checksums index
    row_bytes = max(1, int(np.prod(d.shape[1:], dtype=np.int64)) * d.dtype.itemsize)
    step = max(1, block_bytes // row_bytes)
    if d.chunks:
        step = max(d.chunks[0], step - step % d.chunks[0])
    want = crc[()]
    bad, errors = [], []
    for start in range(0, n, step):
        stop = min(n, start + step)
        try:
            block = d[start:stop]
            got = row_crc32(block.reshape((-1,) + block.shape[lead:])).reshape(block.shape[:lead])
        except (OSError, RuntimeError, ValueError) as e:  # unreadable chunk: a damaged file
            bad.append(np.arange(start, stop))
            errors.append(f"rows {start}..{stop - 1} unreadable ({str(e).splitlines()[0]})")
            continue
        mismatch = got != want[start:stop]
        bad.append(start + np.flatnonzero(mismatch.reshape(len(mismatch), -1).any(axis=1)))
    return (np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)), errors


# --------------------------------------------------------------------------- reading
class Store:
    """A read-only view of a feature store. Cheap to create and to pickle."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"feature store {self.path} does not exist (create it with `featcache build`)")
        self._pid: int | None = None
        self._file: h5py.File | None = None
        self.file  # fail early on a file that is not a store

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._pid, self._file = None, None

    @property
    def file(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            try:
                self._file = h5py.File(self.path, "r")
            except OSError as e:
                raise StoreError(f"cannot open feature store {self.path}: {e}") from e
            self._pid = os.getpid()
            try:
                check_schema(self._file, self.path)
            except StoreError:
                self.close()  # do not keep a handle on a file that is not a store
                raise
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def attrs(self) -> dict:
        return dict(self.file.attrs)

    def datasets(self) -> list[str]:
        return sorted(self.file["datasets"].keys())

    def dataset(self, name: str) -> "DatasetView":
        if name not in self.file["datasets"]:
            have = ", ".join(self.datasets()) or "none"
            raise StoreError(
                f"store {self.path} has no dataset {name!r} (it has: {have}). "
                f"Add it with `featcache build --dataset {name} --root DIR --cache {self.path}`."
            )
        return DatasetView(self, name)


def open_store(path: str | os.PathLike) -> Store:
    """Open a feature store for reading."""
    return Store(path)


def _attr(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            return v
    if isinstance(v, np.generic):
        return v.item()
    return v


class DatasetView:
    """One dataset of a store. Row order is fixed at build time; ``indices`` select rows."""

    def __init__(self, store: Store, name: str):
        self.store, self.name = store, name
        self._cache: dict[str, np.ndarray] = {}

    def __getstate__(self):
        return {"store": self.store, "name": self.name}

    def __setstate__(self, state):
        self.store, self.name, self._cache = state["store"], state["name"], {}

    @property
    def group(self) -> h5py.Group:
        return self.store.file["datasets"][self.name]

    def _column(self, key: str, as_str: bool) -> np.ndarray:
        if key not in self._cache:
            d = self.group[key]
            self._cache[key] = d.asstr()[()] if as_str else d[()]
        return self._cache[key]

    @property
    def attrs(self) -> dict:
        return {k: _attr(v) for k, v in self.group.attrs.items()}

    @property
    def ids(self) -> np.ndarray:
        return self._column("ids", True)

    @property
    def labels(self) -> np.ndarray:
        return self._column("labels", False).astype(np.int64)

    @property
    def splits(self) -> np.ndarray:
        return self._column("splits", True)

    @property
    def skipped(self) -> list[tuple[str, str, str]]:
        return [tuple(r) for r in self.group["skipped"].asstr()[()].tolist()]

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    @property
    def root(self) -> str:
        return self.attrs.get("root", "")

    @property
    def manifest_name(self) -> str:
        return self.attrs.get("manifest_name", "")

    def __len__(self) -> int:
        return int(self.group["ids"].shape[0])

    def split_names(self) -> list[str]:
        return sorted(set(self.splits.tolist()))

    def indices(self, split: str | None = None) -> np.ndarray:
        if split is None or split == "all":  # every row, whether or not the dataset has an 'all' split
            return np.arange(len(self), dtype=np.int64)
        sel = np.flatnonzero(self.splits == split)
        if sel.size == 0:
            raise StoreError(
                f"dataset {self.name!r} in {self.store.path} has no split {split!r} "
                f"(splits: {', '.join(self.split_names())}; 'all' selects every row)"
            )
        return sel.astype(np.int64)

    def index_of(self, ids: Iterable[str]) -> np.ndarray:
        lookup = {s: i for i, s in enumerate(self.ids.tolist())}
        out = []
        for s in ids:
            if s not in lookup:
                raise StoreError(f"dataset {self.name!r} has no image id {s!r}")
            out.append(lookup[s])
        return np.asarray(out, dtype=np.int64)

    # ---- encoders
    def encoders(self) -> list[str]:
        return sorted(self.group["encoders"].keys())

    def _encoder_group(self, key: str) -> h5py.Group:
        if key not in self.group["encoders"]:
            have = ", ".join(self.encoders()) or "none"
            raise StoreError(
                f"dataset {self.name!r} in {self.store.path} has no features from encoder {key!r} "
                f"(encoders: {have}). Build them with `featcache build --model ...`."
            )
        return self.group["encoders"][key]

    def encoder_info(self, key: str) -> dict:
        eg = self._encoder_group(key)
        info = {k: _attr(v) for k, v in eg.attrs.items()}
        info["shape"] = tuple(eg["features"].shape)
        return info

    def features(
        self, key: str, indices: np.ndarray | None = None, views: Sequence[str] = VIEWS
    ) -> np.ndarray:
        """Features ``(n, len(views), C)`` float32 for the given rows (all rows by default)."""
        d = self._encoder_group(key)["features"]
        bad = [v for v in views if v not in VIEWS]
        if bad:
            raise StoreError(f"unknown view(s) {bad}; stored views are {list(VIEWS)}")
        vi = [VIEWS.index(v) for v in views]
        arr = d[()] if indices is None else _take(d, np.asarray(indices))
        return np.ascontiguousarray(arr[:, vi, :])

    # ---- augmented views (featcache build --aug-views K)
    def _aug(self, key: str, name: str) -> h5py.Dataset:
        d = self._encoder_group(key).get(name)
        if not isinstance(d, h5py.Dataset):
            raise StoreError(
                f"dataset {self.name!r} in {self.store.path} has no augmented views of encoder {key!r}; add them with "
                f"`featcache build --dataset ... --cache {self.store.path} --aug-views K` (same --model)")
        return d

    def aug_views(self, key: str) -> int:
        """How many augmented views ``K`` encoder ``key`` has for every row (0: none)."""
        d = self._encoder_group(key).get(AUG_FEATURES)
        return int(d.shape[1]) if isinstance(d, h5py.Dataset) else 0

    def aug_features(self, key: str, indices: np.ndarray | None = None) -> np.ndarray:
        """Features of the augmented views ``(n, K, C)`` (the features' dtype, float32) for the given rows."""
        d = self._aug(key, AUG_FEATURES)
        return d[()] if indices is None else _take(d, np.asarray(indices))

    def aug_params(self, key: str, indices: np.ndarray | None = None) -> np.ndarray:
        """Parameter rows ``(n, K, len(featcache.views.PARAMS))`` float32 that made each view (``apply_params``)."""
        d = self._aug(key, AUG_PARAMS)
        return d[()] if indices is None else _take(d, np.asarray(indices))

    def aug_recipe(self, key: str) -> dict | None:
        """How the views were drawn, None without views: the recipe (``Recipe.to_dict()`` keys) plus ``seed``,
        ``views`` (K), ``image_size`` (the cached image size S the views were rendered from: maskfer must
        re-apply a row to ``images(S)`` for the noise to match) and ``input_size`` (the size the encoder's
        input was rendered at). ``Recipe.from_dict({k: v for k in recipe fields})`` rebuilds the recipe."""
        d = self._encoder_group(key).get(AUG_FEATURES)
        if not isinstance(d, h5py.Dataset):
            return None
        a = {k: _attr(v) for k, v in d.attrs.items()}
        return {**a.get("recipe", {}), "seed": int(a.get("seed", 0)), "views": int(d.shape[1]),
                "image_size": int(a.get("image_size", 0)), "input_size": int(a.get("input_size", 0))}

    # ---- images
    def image_sizes(self) -> list[int]:
        return sorted(int(k) for k in self.group["images"].keys())

    def images(self, size: int, indices: np.ndarray | None = None) -> np.ndarray:
        key = str(int(size))
        if key not in self.group["images"]:
            have = ", ".join(map(str, self.image_sizes())) or "none"
            raise StoreError(
                f"dataset {self.name!r} in {self.store.path} has no cached images of size {size} "
                f"(sizes: {have}). Rebuild with `featcache build --image-size {size}` or pass --root."
            )
        d = self.group["images"][key]
        return d[()] if indices is None else _take(d, np.asarray(indices))


def _take(d: h5py.Dataset, indices: np.ndarray) -> np.ndarray:
    """Fancy-index an HDF5 dataset with any order and repeats (h5py needs sorted unique)."""
    indices = indices.astype(np.int64).ravel()
    if indices.size == 0:
        return np.empty((0,) + d.shape[1:], dtype=d.dtype)
    uniq, inverse = np.unique(indices, return_inverse=True)
    if uniq[0] < 0 or uniq[-1] >= d.shape[0]:
        raise StoreError(f"row index out of range 0..{d.shape[0] - 1} in {d.name}")
    if uniq.size == uniq[-1] - uniq[0] + 1:  # contiguous: one slice read is much faster
        block = d[int(uniq[0]) : int(uniq[-1]) + 1]
    else:
        block = d[uniq]
    return block[inverse]
