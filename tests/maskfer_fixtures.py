"""Shared helpers for the maskfer tests: learnable fixture datasets, feature stores, small configs.

Not a test module. The stores are built once per pytest session (module-level cache keyed by
the tiny CLIP directory) because a build loads the encoder and encodes every image.

Datasets are ``folders`` layouts with split folders (``train/<class>/x.png``...). Each class has
its own colour and stripe pattern, so even a random tiny CLIP separates them and a model can
learn; every image carries a white bar on its LEFT edge, so a horizontal flip is visible in the
pixels. Two "domains" (``domA``, ``domB``) differ in brightness and noise; ``domB``'s test split
has no ``neutral`` image (a test set missing a class).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from featcache.taxonomy import CLASSES

IMG = 24          # written image size (px)
CACHE = 16        # cached image size in the store (featcache build --image-size)

# One distinct colour per class (CLASSES order: surprise fear disgust happiness sadness anger neutral).
COLOURS = np.array([[230, 40, 40], [40, 200, 40], [40, 60, 230], [230, 220, 40],
                    [200, 40, 220], [40, 210, 210], [128, 128, 128]], dtype=np.float32)


def class_image(label: int, domain: int, rng: np.random.Generator, size: int = IMG) -> np.ndarray:
    """(size, size, 3) uint8: the class colour, a class-dependent stripe period, noise, a left white bar."""
    yy, xx = np.mgrid[0:size, 0:size]
    period = 2 + label  # stripes whose spacing encodes the class
    stripes = ((xx + yy * (label % 2)) // period) % 2
    base = COLOURS[label] * (0.9 if domain == 0 else 0.6) + (0 if domain == 0 else 30)
    img = base[None, None, :] * (0.75 + 0.25 * stripes[..., None])
    img = img + rng.normal(0, 8 if domain == 0 else 20, size=img.shape)
    img[:, : max(2, size // 6)] = 255.0  # the flip marker: a white bar on the left edge only
    return np.clip(img, 0, 255).astype(np.uint8)


def make_colour_dataset(root: Path, per_class: dict[str, int], domain: int = 0, seed: int = 0,
                        skip_classes: dict[str, tuple[str, ...]] | None = None) -> Path:
    """``root/<split>/<class>/<split>_<class>_<i>.png`` for every split in ``per_class``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    skip_classes = skip_classes or {}
    for split, n in per_class.items():
        for label, cls in enumerate(CLASSES):
            if cls in skip_classes.get(split, ()):
                continue
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(class_image(label, domain, rng)).save(d / f"{split}_{cls}_{i:03d}.png")
    return root


def split_params(splits) -> dict[str, str]:
    return {f"split_dirs.{s}": s for s in splits}


def build(store: Path, name: str, root: Path, clip_dir: Path, splits, image_size: int | None = CACHE, **kw):
    from featcache.build import build_store

    return build_store(store, "folders", root, model=str(clip_dir), name=name, params=split_params(splits),
                       image_size=image_size, progress=False, workers=0, on_error="skip", log=lambda m: None, **kw)


_CACHE: dict = {}


def fixture_store(base: Path, clip_dir: Path) -> Path:
    """A store with domA (train 6/class, test 2/class) and domB (train 3/class, test 2/class, no neutral).

    Built once per session; callers must not modify it (copy it first: :func:`copy_store`).
    """
    key = ("store", str(clip_dir))
    if key not in _CACHE:
        base = Path(base)
        a = make_colour_dataset(base / "domA", {"train": 6, "test": 2}, domain=0, seed=1)
        b = make_colour_dataset(base / "domB", {"train": 3, "test": 2}, domain=1, seed=2,
                                skip_classes={"test": ("neutral",)})
        store = base / "features.h5"
        build(store, "domA", a, clip_dir, ("train", "test"))
        build(store, "domB", b, clip_dir, ("train", "test"))
        _CACHE[key] = store
    return _CACHE[key]


def copy_store(store: Path, dest: Path) -> Path:
    dest = Path(dest)
    shutil.copyfile(store, dest)
    return dest


def edit_store(path: Path, dataset: str, fn) -> None:
    """Open a store copy for writing with h5py and call ``fn(group)`` on the dataset's group."""
    with h5py.File(path, "a") as f:
        fn(f["datasets"][dataset])


def small_cfg(store: Path, **kw):
    """A TrainConfig sized for CPU tests: 16 px, 1 epoch, batch 16, drop 1 (16-d features: groups of 2)."""
    from maskfer.config import TrainConfig

    base = dict(cache=str(store), train="domA", epochs=1, batch_size=16, image_size=16, drop=1, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def quiet(*_a, **_k):
    return None


def trained_run(base: Path, store: Path, name: str, **cfg_kw) -> Path:
    """Train (once per session) a small run into ``base/name``; callers must not modify it."""
    key = ("run", name, str(store))
    if key not in _CACHE:
        from maskfer.train import train

        out = Path(base) / name
        train(small_cfg(store, **cfg_kw), out, progress=False, log=quiet)
        _CACHE[key] = out
    return _CACHE[key]


def metrics_without_speed(run: Path) -> list[dict]:
    from maskfer.rundir import read_metrics

    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(run)]


# ---------------------------------------------------------------- pytest fixtures (import them by name)
import pytest  # noqa: E402


@pytest.fixture
def fx_base(tmp_path_factory) -> Path:
    d = tmp_path_factory.getbasetemp() / "maskfer_fx"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture
def store(fx_base, tiny_clip_dir) -> Path:
    return fixture_store(fx_base, tiny_clip_dir)


def two_domain_store(base: Path, clip_dir: Path, a_splits: dict[str, int], b_splits: dict[str, int]) -> Path:
    """``base/features.h5`` with domA (domain 0, seed 1) and domB (domain 1, seed 2) of the given splits."""
    a = make_colour_dataset(base / "domA", a_splits, domain=0, seed=1)
    b = make_colour_dataset(base / "domB", b_splits, domain=1, seed=2)
    path = base / "features.h5"
    build(path, "domA", a, clip_dir, tuple(a_splits))
    build(path, "domB", b, clip_dir, tuple(b_splits))
    return path


def fake_hub_cache(cache: Path, checkpoint: Path, repo_id: str, commit: str, monkeypatch) -> None:
    """``checkpoint`` as the cached snapshot ``commit`` of hub repository ``repo_id`` (main -> commit) in a
    Hugging Face cache at ``cache``, which becomes the cache in use."""
    import shutil

    from huggingface_hub import constants

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
