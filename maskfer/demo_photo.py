"""The demo's last step: a generated group photo through face detection, alignment and a trained model.

The photo pastes one real portrait three times on a generated background: Grace Hopper's (US Navy, public
domain), which matplotlib ships as sample data (installed with the ``report`` extra), so it works offline.
One copy is smaller, one rotated 15 degrees, one mirrored. BlazeFace is trained on real faces and does
not find the demo's cartoon faces reliably, hence a real face here. The demo's models learned cartoon
expressions: what they say about a real face shows the path (detect -> align -> classify -> annotate),
not accuracy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from maskfer.annotate import annotate
from maskfer.export import export_model
from maskfer.predictor import Predictor

# the portrait's face region in grace_hopper.jpg (512x600), with room around it; where and how each copy goes
_FACE = (120, 80, 410, 390)
_COPIES = [  # x, y, side, rotation (degrees, counter-clockwise), mirrored
    (70, 150, 220, 0, False),
    (400, 110, 260, 15, False),
    (730, 190, 170, 0, True),
]


def portrait() -> Image.Image | None:
    """matplotlib's grace_hopper.jpg, or None without matplotlib."""
    try:
        from matplotlib import cbook
    except ImportError:
        return None
    return Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")


def paste_faces(faces: list[Image.Image], places, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """(RGB uint8 540x960 photo, the pasted squares): each face resized to a square and pasted on a generated
    background at its place ``(x, y, side, rotation in degrees counter-clockwise, mirrored)``."""
    rng = np.random.default_rng(seed)
    bg = (rng.normal(0, 1, (540 // 12, 960 // 12, 3)) * 25 + np.array([120, 135, 125])).clip(0, 255)
    canvas = Image.fromarray(bg.astype(np.uint8)).resize((960, 540), Image.BICUBIC)
    squares = []
    for face, (x, y, s, rot, mirror) in zip(faces, places):
        im = face.convert("RGB").resize((s, s), Image.BICUBIC)
        im = ImageOps.mirror(im) if mirror else im
        mask = Image.new("L", (s, s), 255)
        if rot:
            im, mask = im.rotate(rot, resample=Image.BICUBIC), mask.rotate(rot, resample=Image.BICUBIC)
        canvas.paste(im, (x, y), mask)
        squares.append((x, y, x + s, y + s))
    return np.asarray(canvas), squares


def group_photo(face: Image.Image, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """The demo's photo: three copies of ``face``'s face region (:func:`paste_faces`)."""
    return paste_faces([face.crop(_FACE)] * len(_COPIES), _COPIES, seed)


def photo_step(run: Path, out: Path, device: str = "auto", log=print) -> dict | None:
    """Export ``run`` as a model folder (``out/model-<run name>``, maskfer export), load it as a user would
    (Predictor.from_pretrained) and detect, align and classify the faces of the group photo; writes
    ``out/group_photo.png`` and ``out/group_photo.annotated.png``. None (and a note) when the portrait or the
    detector is missing."""
    face = portrait()
    if face is None:
        log("DEMO photo step skipped: matplotlib (the report extra) ships the portrait it uses; "
            "bash scripts/setup.sh installs it")
        return None
    photo, squares = group_photo(face)
    out = Path(out)
    Image.fromarray(photo).save(out / "group_photo.png")
    model_dir = export_model(run, out / f"model-{Path(run).name}", log=log)
    try:
        predictor = Predictor.from_pretrained(model_dir, device=device, detect="blazeface")
    except Exception as e:  # noqa: BLE001 - the detect extra missing: the demo's table still stands
        log(f"DEMO photo step skipped: {e}")
        return None
    rows = predictor.predict(photo)
    found = [r for r in rows if r.get("face") is not None]
    annotate(photo, rows).save(out / "group_photo.annotated.png")
    log(f"DEMO photo: {len(found)} face(s) found in {out / 'group_photo.png'} (3 pasted: one smaller, one rotated "
        f"15 degrees, one mirrored), annotated in {out / 'group_photo.annotated.png'}")
    for r in found:
        log(f"  face {r['face']}: box {[round(v) for v in r['box']]}, detector score {r['score']:.2f}, "
            f"{Path(run).name}: {r['prediction']} ({r['probabilities'][r['prediction']]:.2f})")
    log("  (a real face; the demo's models learned cartoon expressions, so these labels show the path, not accuracy)")
    return {"found": len(found), "pasted": squares, "rows": rows, "model": str(model_dir),
            "annotated": str(out / "group_photo.annotated.png")}
