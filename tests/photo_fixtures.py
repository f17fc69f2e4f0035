"""A group photo built from real faces pasted at known places, and a short video of it."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from maskfer.demo_photo import paste_faces

# Three muxspace faces (224 px crops) with their face boxes annotated by hand (brows/forehead line to chin,
# cheek to cheek) in the source's pixels.
FACES = {
    "AJ_Cook_0001.jpg": (25, 40, 200, 215),
    "Andreas_Vinciguerra_0001.jpg": (30, 50, 205, 224),
    "Christine_Gregoire_0004.jpg": (35, 45, 200, 224),
}
# where each is pasted on a 960x540 background: x, y, side, rotation in degrees (counter-clockwise)
PLACES = [(60, 120, 180, 0), (390, 170, 160, 15), (700, 90, 200, 0)]


def _known_box(ann, place) -> tuple[float, float, float, float]:
    """The annotated box after the paste: the face taken as the ellipse inscribed in the box, rotated with
    the paste; its axis-aligned bounds."""
    x, y, s, rot = place
    k = s / 224
    cx, cy = x + ((ann[0] + ann[2]) / 2) * k, y + ((ann[1] + ann[3]) / 2) * k
    # rotate the centre about the pasted square's centre (PIL rotates counter-clockwise on screen)
    t = math.radians(rot)
    dx, dy = cx - (x + s / 2), cy - (y + s / 2)
    cx, cy = x + s / 2 + dx * math.cos(t) + dy * math.sin(t), y + s / 2 - dx * math.sin(t) + dy * math.cos(t)
    a, b = (ann[2] - ann[0]) * k / 2, (ann[3] - ann[1]) * k / 2
    hw = math.sqrt((a * math.cos(t)) ** 2 + (b * math.sin(t)) ** 2)
    hh = math.sqrt((a * math.sin(t)) ** 2 + (b * math.cos(t)) ** 2)
    return (cx - hw, cy - hh, cx + hw, cy + hh)


def group_photo(muxspace_images: Path, seed: int = 0) -> tuple[np.ndarray, list[tuple[float, ...]]]:
    """(RGB uint8 540x960 photo, the three known face boxes, left to right)."""
    faces = [Image.open(muxspace_images / name) for name in FACES]
    photo, _ = paste_faces(faces, [(x, y, s, rot, False) for x, y, s, rot in PLACES], seed)
    return photo, [_known_box(ann, place) for ann, place in zip(FACES.values(), PLACES)]


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10) -> Path:
    """An MPEG-4 video of RGB uint8 frames (even sides), written with PyAV."""
    import av

    with av.open(str(path), "w") as out:
        st = out.add_stream("mpeg4", rate=fps)
        st.height, st.width = frames[0].shape[:2]
        st.pix_fmt = "yuv420p"
        st.options = {"qscale": "2"}
        for f in frames:
            out.mux(st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(st.encode())
    return path
