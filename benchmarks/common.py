"""Helpers the benchmark scripts share (each script puts benchmarks/ on sys.path by being run from it)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# the random-init CLIP vision towers the benchmarks build: ViT-B/32's shapes, and a tiny one at 224 px
B32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
           patch_size=32, image_size=224, projection_dim=512)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            patch_size=32, image_size=224, projection_dim=512)


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages (the machine is shared: a benchmark says under what load it ran)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def make_images(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """n images in class folders (train/<class>/i.png), class-coloured stripes plus noise."""
    from featcache.taxonomy import CLASSES

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        label = i % len(CLASSES)
        d = root / "train" / CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(40, 230, 3)
        stripes = ((xx + yy * (label % 2)) // (3 + 2 * label)) % 2
        img = colour[None, None] * (0.7 + 0.3 * stripes[..., None]) + rng.normal(0, 12, (size, size, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:04d}.png")
    return root
