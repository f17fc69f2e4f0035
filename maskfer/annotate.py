"""Draw prediction rows (maskfer.predictor) on their image: a box, the keypoints and the expression per face."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from featcache.images import load_image

_COLOURS = [(230, 60, 60), (60, 160, 230), (60, 200, 90), (240, 180, 40), (180, 90, 220), (40, 210, 200)]


def annotate(image: np.ndarray, rows: list[dict]) -> Image.Image:
    """A copy of the RGB uint8 ``image`` with each face's box, keypoints and "expression p" label."""
    img = Image.fromarray(image).convert("RGB")
    d = ImageDraw.Draw(img)
    w = max(2, round(max(img.size) / 300))
    for r in rows:
        if r.get("face") is None or "box" not in r:
            continue
        c = _COLOURS[r["face"] % len(_COLOURS)]
        x0, y0, x1, y1 = r["box"]
        d.rectangle([x0, y0, x1, y1], outline=c, width=w)
        for x, y in (r.get("keypoints") or {}).values():
            d.ellipse([x - w, y - w, x + w, y + w], fill=c)
        label = f"{r['face']}: {r['prediction']} {r['probabilities'][r['prediction']]:.2f}"
        tw = d.textlength(label)
        ty = y0 - 14 if y0 >= 14 else y1 + 2
        d.rectangle([x0, ty, x0 + tw + 4, ty + 13], fill=c)
        d.text((x0 + 2, ty + 1), label, fill=(255, 255, 255))
    return img


def write_annotated(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """For each image file among ``rows`` (not videos), ``out_dir/<name>`` annotated; the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_input: dict[str, list[dict]] = {}
    for r in rows:
        if "frame" not in r and "error" not in r and isinstance(r["input"], str):
            by_input.setdefault(r["input"], []).append(r)
    written = []
    for src, rs in by_input.items():
        dest = out_dir / (Path(src).stem + ".annotated.png")
        annotate(np.asarray(load_image(src)), rs).save(dest)
        written.append(dest)
    return written
