"""Training/evaluation data read through featcache's store API only.

Features (n, 2, C) for a split are small (4 KiB per image at C=512) and live in memory.
Images come from the store's image cache (in memory when they fit, else read per batch
from HDF5) or, when the store has none, are decoded from the dataset root through the
manifest the store recorded.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featcache import StoreError, open_store
from featcache.errors import FerError
from featcache.images import load_image, resize_uint8
from featcache.manifests import list_items, manifest_from_record
from featcache.store import DatasetView
from maskfer.config import split_spec

IN_MEMORY_LIMIT = 4 * 1024**3  # bytes of cached images we are willing to hold in RAM


class DataError(FerError):
    pass


class ImageBank:
    """uint8 images (B, S, S, 3) for store rows."""

    size: int

    def get(self, rows: np.ndarray) -> torch.Tensor:
        raise NotImplementedError


class MemoryBank(ImageBank):
    def __init__(self, images: np.ndarray):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.size = int(images.shape[1])
        self.rows: dict[int, int] | None = None

    def get(self, rows: np.ndarray) -> torch.Tensor:
        return self.images[torch.as_tensor(rows, dtype=torch.long)]


class StoreBank(ImageBank):
    def __init__(self, ds: DatasetView, size: int):
        self.ds, self.size = ds, size

    def get(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.ds.images(self.size, rows))


class RootBank(ImageBank):
    """Decodes from the dataset root (no image cache in the store); threads overlap file I/O."""

    def __init__(self, paths: list[Path], boxes: list, size: int, workers: int):
        self.paths, self.boxes, self.size = paths, boxes, size
        self.pool = ThreadPoolExecutor(max(1, workers)) if workers else None

    def _one(self, i: int) -> np.ndarray:
        return resize_uint8(load_image(self.paths[i], self.boxes[i]), self.size)

    def get(self, rows: np.ndarray) -> torch.Tensor:
        rows = [int(r) for r in rows]
        imgs = list(self.pool.map(self._one, rows)) if self.pool else [self._one(r) for r in rows]
        return torch.from_numpy(np.stack(imgs))


@dataclass
class SplitData:
    name: str               # "ferplus:train"
    dataset: str
    split: str
    rows: np.ndarray        # store rows of this split
    ids: np.ndarray
    labels: torch.Tensor    # (n,) long
    feats: torch.Tensor     # (n, 2, C) float32: original and flipped view
    bank: ImageBank | None  # indexed by store row
    views: "AugViews | None" = None  # the store's augmented views (--views augmented), else None

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, keep: np.ndarray, name: str) -> "SplitData":
        t = torch.from_numpy(np.flatnonzero(keep))
        views = None if self.views is None else AugViews(self.views.feats[t], self.views.params[t], self.views.recipe)
        return SplitData(name, self.dataset, self.split, self.rows[keep], self.ids[keep], self.labels[t],
                         self.feats[t], self.bank, views)


@dataclass
class AugViews:
    """K augmented views per row (featcache build --aug-views): their features and the parameter rows
    (featcache.views.PARAMS) that re-create each view's augmentation on the cached image."""
    feats: torch.Tensor     # (n, K, C) float32
    params: torch.Tensor    # (n, K, len(PARAMS)) float32
    recipe: dict            # featcache.views.Recipe.to_dict() + "seed": what drew the rows

    @property
    def k(self) -> int:
        return self.feats.shape[1]


HOLDOUT_SEED = 20240  # fixed, independent of the run seed: every run of a sweep holds out the same rows


def parse_holdout(val_split: str | None) -> float | None:
    """'holdout:0.1' -> 0.1 (a fraction of the training split held out for validation); else None."""
    if not val_split or not val_split.startswith("holdout:"):
        return None
    try:
        frac = float(val_split.split(":", 1)[1])
    except ValueError:
        frac = -1.0
    if not 0 < frac < 1:
        raise DataError(f"--val-split {val_split!r}: expected holdout:FRACTION with 0 < FRACTION < 1, e.g. holdout:0.1")
    return frac


def holdout_split(data: SplitData, fraction: float) -> tuple[SplitData, SplitData]:
    """Stratified: the same fraction of every class goes to validation (at least one where a class has 2+)."""
    labels = data.labels.numpy()
    rng = np.random.default_rng(HOLDOUT_SEED)
    val = np.zeros(len(labels), dtype=bool)
    order = rng.permutation(len(labels))
    for c in np.unique(labels):  # a handful of classes, not samples: fine outside the training step
        members = order[labels[order] == c]
        k = int(round(fraction * len(members)))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        val[members[:k]] = True
    if not val.any() or val.all():
        raise DataError(f"{data.name}: holding out {fraction:.0%} leaves an empty training or validation set")
    return data.subset(~val, data.name), data.subset(val, f"{data.name}[holdout {fraction:g}]")


def resolve_encoder(ds: DatasetView, key: str | None) -> str:
    keys = ds.encoders()
    if key is None:
        if len(keys) != 1:
            raise DataError(
                f"dataset {ds.name!r} in {ds.store.path} has {len(keys)} encoders ({', '.join(keys) or 'none'}); "
                "pick one with --encoder KEY" if keys else
                f"dataset {ds.name!r} in {ds.store.path} has no encoder features; run `featcache build` first"
            )
        return keys[0]
    if key not in keys:
        raise DataError(f"dataset {ds.name!r} in {ds.store.path} has no encoder {key!r} "
                        f"(it has: {', '.join(keys) or 'none'})")
    return key


@functools.lru_cache(maxsize=2)
def _memory_bank(store_path: str, inode: int, mtime_ns: int, dataset: str, size: int) -> MemoryBank:
    """One in-memory copy of a dataset's cached images per process: the train and validation splits,
    evaluation and every run of a sweep share it. Keyed by the file's inode and mtime, so a rebuilt
    store (builds replace the file) is read afresh."""
    return MemoryBank(open_store(store_path).dataset(dataset).images(size))


def _image_bank(ds: DatasetView, rows: np.ndarray, image_size: int, root: str | None, workers: int,
                prefer: int | None = None) -> ImageBank:
    sizes = ds.image_sizes()
    if sizes:
        # Prefer the smallest cached size that is at least the training size; resizing down is cheap. The
        # augmented views' source size comes first: their noise fields live on its grid.
        fitting = [s for s in sizes if s >= image_size]
        size = prefer if prefer in sizes else (min(fitting) if fitting else max(sizes))
        n_bytes = len(ds) * size * size * 3
        if n_bytes <= IN_MEMORY_LIMIT:
            st = os.stat(ds.store.path)
            return _memory_bank(str(Path(ds.store.path).resolve()), st.st_ino, st.st_mtime_ns, ds.name, size)
        return StoreBank(ds, size)
    root_dir = Path(root or ds.root)
    if not root_dir.exists():
        raise DataError(
            f"dataset {ds.name!r} has no cached images in {ds.store.path} and its root {root_dir} is not there: "
            "pass --root DATASET_DIR, or rebuild the store with `featcache build --image-size S`"
        )
    items = {it.id: it for it in list_items(manifest_from_record(ds.attrs["manifest"]), root_dir, on_error="skip").items}
    missing = [i for i in ds.ids if i not in items]
    if missing:
        raise DataError(f"{len(missing)} stored image(s) of {ds.name!r} are not under {root_dir} (first {missing[0]})")
    paths = [items[i].path for i in ds.ids]
    boxes = [items[i].box for i in ds.ids]
    return RootBank(paths, boxes, image_size, workers)


def resolve_split(ds: DatasetView, split: str) -> str:
    """A dataset without splits (muxspace, CK+) is all test data: 'test' means 'all' there."""
    if split == "test" and split not in ds.split_names() and ds.split_names() == ["all"]:
        return "all"
    return split


def check_test_sets(store_path: str, specs: list[str], encoder_key: str, fingerprint: str | None, dim: int,
                    need_images: bool, root: str | None = None, trained: str = "the run") -> None:
    """What evaluating on ``specs`` needs, checked without reading features or images, so that a wrong
    --test fails before training (or before the first test set is evaluated): each dataset and split exists
    and is not empty, holds the run's encoder with the same fingerprint and dimension, and has images
    (cached, or a dataset root) when the method needs them. Raises DataError naming the --test entry."""
    if not specs:
        return
    store = open_store(store_path)
    try:
        for spec in specs:
            name, split = split_spec(spec, "test")
            try:
                ds = store.dataset(name)
                split = resolve_split(ds, split)
                rows = ds.indices(split)
            except StoreError as e:
                raise DataError(f"--test {spec}: {e}") from None
            if rows.size == 0:
                raise DataError(f"--test {spec}: split {name}:{split} in {store_path} is empty")
            try:
                key = resolve_encoder(ds, encoder_key)
            except DataError as e:
                raise DataError(f"--test {spec}: {e}") from None
            info = ds.encoder_info(key)
            if info.get("fingerprint") != fingerprint or int(info["dim"]) != int(dim):
                raise DataError(
                    f"test set {spec} in {store_path} has encoder {key!r} features (dim {info['dim']}, fingerprint "
                    f"{info.get('fingerprint')}) but {trained} was trained on dim {dim} fingerprint {fingerprint}: "
                    "build the test set with the same --model")
            if need_images and not ds.image_sizes() and not Path(root or ds.root).exists():
                raise DataError(
                    f"--test {spec}: dataset {name!r} has no cached images in {store_path} and its root "
                    f"{root or ds.root} is not there: pass --root DATASET_DIR, or rebuild the store with "
                    "`featcache build --image-size S`")
    finally:
        store.close()


def load_split(store_path: str, spec: str, default_split: str, encoder: str | None, need_images: bool,
               image_size: int, root: str | None = None, workers: int = 0, aug_views: bool = False
               ) -> tuple[SplitData, dict]:
    """Load one DATASET[:SPLIT]; returns the data and the encoder's store metadata. ``aug_views``: load the
    store's augmented views too (DataError when the dataset has none)."""
    name, split = split_spec(spec, default_split)
    store = open_store(store_path)
    ds = store.dataset(name)
    split = resolve_split(ds, split)
    try:
        rows = ds.indices(split)
    except StoreError as e:
        raise DataError(str(e)) from None
    if rows.size == 0:
        raise DataError(f"split {name}:{split} in {store_path} is empty (dataset {name!r} has {len(ds)} rows): "
                        f"pick another split with {name}:SPLIT or rebuild the dataset with `featcache build`")
    key = resolve_encoder(ds, encoder)
    info = ds.encoder_info(key)
    feats = ds.features(key, rows)
    bad = ~np.isfinite(feats).all(axis=(1, 2))
    if bad.any():
        raise DataError(
            f"{bad.sum()} feature rows of {name}:{split} (encoder {key}) contain NaN/inf, first id {ds.ids[rows][bad][0]!r}; "
            f"run `featcache verify {store_path}` and rebuild that dataset"
        )
    labels = ds.labels[rows]
    if ((labels < 0) | (labels >= len(ds.class_names))).any():
        bad_rows = np.flatnonzero((labels < 0) | (labels >= len(ds.class_names)))
        raise DataError(
            f"{len(bad_rows)} label(s) of {name}:{split} in {store_path} are outside the classes 0..{len(ds.class_names) - 1} "
            f"(first: id {ds.ids[rows][bad_rows[0]]!r}, label {labels[bad_rows[0]]}); the store is damaged: "
            f"run `featcache verify {store_path}` and rebuild dataset {name!r} with `featcache build`")
    views = _aug_views(ds, key, rows, store_path) if aug_views else None
    prefer = views.recipe.get("image_size") if views is not None else None
    bank = _image_bank(ds, rows, image_size, root, workers, prefer) if need_images else None
    data = SplitData(f"{name}:{split}", name, split, rows, ds.ids[rows], torch.from_numpy(labels),
                     torch.from_numpy(feats), bank, views)
    return data, {"key": key, **info}


def require_aug_views(ds: DatasetView, key: str, store_path: str) -> dict:
    """The recipe of the dataset's augmented views of encoder ``key`` (--views augmented); DataError without."""
    if ds.aug_views(key) == 0:
        raise DataError(f"--views augmented: dataset {ds.name!r} in {store_path} has no augmented views of encoder "
                        f"{key!r}; add them with `featcache build --dataset ... --cache {store_path} --aug-views K` "
                        "(the same --model), or train with --views clean")
    return ds.aug_recipe(key) or {}


def _aug_views(ds: DatasetView, key: str, rows: np.ndarray, store_path: str) -> AugViews:
    recipe = require_aug_views(ds, key, store_path)
    feats = ds.aug_features(key, rows)
    bad = ~np.isfinite(feats).all(axis=(1, 2))
    if bad.any():
        raise DataError(f"{bad.sum()} augmented-view rows of {ds.name} (encoder {key}) contain NaN/inf, first id "
                        f"{ds.ids[rows][bad][0]!r}; run `featcache verify {store_path}`")
    return AugViews(torch.from_numpy(feats).float(), torch.from_numpy(ds.aug_params(key, rows)).float(), recipe)
