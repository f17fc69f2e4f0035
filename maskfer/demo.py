"""`maskfer demo`: the whole pipeline on generated data, runnable offline on a fresh machine.

Two generated "domains" of cartoon faces whose mouth, brows and eyes encode the seven
expressions; domain B changes colours, face size, position and adds noise, so a model
trained on A and tested on B shows the cross-dataset setting in miniature. It runs
featcache build -> maskfer train -> cross-dataset eval, the same code as real use.
This is a DEMO: with the tiny random encoder used offline the numbers only show that the
pipeline works; they say nothing about CAFE.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from featcache import open_store
from featcache.build import build_store
from featcache.encoders import EncoderError
from featcache.encoders.random_clip import save_random_clip
from featcache.taxonomy import CLASSES
from maskfer.config import TrainConfig
from maskfer.train import train

DOMAINS = {
    "demo-a": {"bg": (235, 225, 210), "skin": (240, 200, 160), "ink": (40, 30, 30), "scale": 1.0, "noise": 0.0},
    "demo-b": {"bg": (60, 80, 110), "skin": (150, 110, 80), "ink": (250, 250, 240), "scale": 0.8, "noise": 18.0},
}


def _face(cls: str, dom: dict, rng: np.random.Generator, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), dom["bg"])
    d = ImageDraw.Draw(img)
    s = size * dom["scale"] * rng.uniform(0.85, 1.05)
    cx, cy = size / 2 + rng.uniform(-3, 3), size / 2 + rng.uniform(-3, 3)
    r = s * 0.42
    d.ellipse([cx - r, cy - r * 1.1, cx + r, cy + r * 1.1], fill=dom["skin"])
    ink, w = dom["ink"], max(1, round(s / 28))
    eye_y, eye_dx = cy - r * 0.25, r * 0.4
    eye_r = r * (0.16 if cls in ("surprise", "fear") else 0.09)
    for sx in (-1, 1):
        ex = cx + sx * eye_dx
        d.ellipse([ex - eye_r, eye_y - eye_r, ex + eye_r, eye_y + eye_r], fill=ink)
        by = eye_y - r * (0.42 if cls in ("surprise", "fear") else 0.3)
        tilt = {"anger": 0.18, "sadness": -0.15, "fear": -0.1}.get(cls, 0.0) * r
        d.line([ex - sx * r * 0.22, by + tilt, ex + sx * r * 0.22, by - tilt], fill=ink, width=w)
    my, mw = cy + r * 0.45, r * 0.45
    if cls == "happiness":
        d.arc([cx - mw, my - mw * 0.7, cx + mw, my + mw * 0.5], 20, 160, fill=ink, width=w + 1)
    elif cls == "sadness":
        d.arc([cx - mw, my, cx + mw, my + mw * 0.9], 200, 340, fill=ink, width=w + 1)
    elif cls == "surprise":
        d.ellipse([cx - mw * 0.35, my - mw * 0.4, cx + mw * 0.35, my + mw * 0.4], outline=ink, width=w + 1)
    elif cls == "fear":
        pts = [(cx - mw + k * mw / 3, my + (mw * 0.12 if k % 2 else -mw * 0.12)) for k in range(7)]
        d.line(pts, fill=ink, width=w)
    elif cls == "disgust":
        d.line([cx - mw, my + mw * 0.2, cx, my - mw * 0.1, cx + mw, my - mw * 0.35], fill=ink, width=w + 1)
    elif cls == "anger":
        d.rectangle([cx - mw * 0.7, my - mw * 0.15, cx + mw * 0.7, my + mw * 0.15], fill=ink)
    else:  # neutral
        d.line([cx - mw * 0.7, my, cx + mw * 0.7, my], fill=ink, width=w)
    img = img.rotate(rng.uniform(-8, 8), resample=Image.BILINEAR, fillcolor=dom["bg"])
    if dom["noise"]:
        arr = np.asarray(img, dtype=np.float32) + rng.normal(0, dom["noise"], (size, size, 3))
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    return img


def make_demo_dataset(root: Path, domain: str, per_class: dict[str, int], seed: int = 0) -> Path:
    """Writes <root>/<split>/<class>/<k>.png (the data_manifests/demo.toml layout)."""
    rng = np.random.default_rng(seed + (0 if domain == "demo-a" else 1000))
    for split, n in per_class.items():
        for cls in CLASSES:
            folder = Path(root) / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                _face(cls, DOMAINS[domain], rng).save(folder / f"{k:04d}.png")
    return Path(root)


def tiny_clip(path: Path, projection_dim: int = 64) -> Path:
    """A tiny RANDOM CLIP vision tower saved like a hub checkpoint (offline stand-in)."""
    if (path / "config.json").exists():
        return path
    return save_random_clip(path, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                            image_size=64, patch_size=16, projection_dim=projection_dim)


def drop_for(dim: int, num_classes: int = len(CLASSES)) -> int:
    """The paper's 10-of-73 channel drop, scaled to another feature dimension."""
    return max(1, math.floor(10 * (dim // num_classes) / 73))


def run_demo(out: Path, model: str = "openai/clip-vit-base-patch32", epochs: int = 5, image_size: int = 48,
             per_class: tuple[int, int] = (40, 15), progress: bool = True, log=print) -> list[dict]:
    """Generate data -> featcache build -> maskfer train (cafe and linear probe) -> cross-domain table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for dom in DOMAINS:
        root = out / "data" / dom
        if not root.exists():
            make_demo_dataset(root, dom, {"train": per_class[0], "test": per_class[1]})
    store = out / "features.h5"
    spec, real = model, True
    for dom in DOMAINS:
        kw = dict(name=dom, image_size=image_size, workers=0, progress=progress, log=log)
        try:
            r = build_store(store, "demo", out / "data" / dom, model=spec, **kw)
        except EncoderError as e:  # raised while loading the model, before anything is written
            if not real:
                raise
            log(f"DEMO: the real encoder {model!r} is not reachable ({str(e).splitlines()[0][:160]}...).")
            log("DEMO: using a tiny RANDOM CLIP instead; the numbers below only show that the pipeline runs.")
            spec, real = str(tiny_clip(out / "tiny-clip")), False
            r = build_store(store, "demo", out / "data" / dom, model=spec, **kw)
        log(f"featcache: {dom}: {r.rows} images in {store}" + (" (already built)" if r.up_to_date else ""))
    with open_store(store) as s:
        dim = int(s.dataset("demo-a").encoder_info(r.encoder_key)["dim"])
    results = []
    for method in ("linear-probe", "cafe"):
        cfg = TrainConfig(cache=str(store), train="demo-a", test=["demo-a", "demo-b"], method=method,
                          epochs=epochs, image_size=image_size, drop=drop_for(dim))
        log(f"maskfer: training {method} on demo-a "
            + ("(L-BFGS to convergence)" if method == "linear-probe" else
               f"({epochs} epochs, {image_size}px, drop {cfg.drop})"))
        summary = train(cfg, out / "runs" / method, progress=progress, log=log)
        summary["results"]["label"] += "" if real else " [tiny random CLIP]"
        results.append(summary["results"])
    return results
