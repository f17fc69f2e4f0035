"""Face alignment: rotate a detected face level by its eyes and crop a square around it.

FER training sets are upright, roughly centred square face crops (FER2013/FERPlus, RAF-DB's aligned
set); the crop is built to look like them: the eye line made horizontal, a square of the detector's
box size plus ``margin`` on each side, centred on the box. One affine resampling from the original
photo, so rotating and scaling lose no more detail than a plain resize.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from maskfer.faces import Face

DEFAULT_MARGIN = 0.2     # of the box side, added around it (FER crops include forehead and chin)
DEFAULT_CROP = 224       # output side; the predictor resizes it to what the encoder and the CNN take


def eye_angle(face: Face) -> float:
    """Angle (radians, image coordinates, y down) of the line from the image-left eye to the image-right
    eye; 0 when the detector gave no keypoints."""
    if len(face.keypoints) < 2:
        return 0.0
    a, b = face.keypoints[0], face.keypoints[1]
    left, right = (a, b) if a[0] <= b[0] else (b, a)
    return math.atan2(float(right[1] - left[1]), float(right[0] - left[0]))


def crop_transform(face: Face, size: int, margin: float) -> tuple[float, ...]:
    """PIL AFFINE coefficients mapping output pixels of the aligned crop to input image coordinates."""
    x0, y0, x1, y1 = face.box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    t = eye_angle(face)
    s = side / size
    a, b, d, e = s * math.cos(t), -s * math.sin(t), s * math.sin(t), s * math.cos(t)
    return (a, b, cx - (a + b) * size / 2, d, e, cy - (d + e) * size / 2)


def align_face(image: np.ndarray, face: Face, size: int = DEFAULT_CROP, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """The aligned square crop (size, size, 3) uint8 of ``face`` in the RGB uint8 ``image``; outside the
    image is black, as a crop at the border of a FER photo would be padded."""
    if face.keypoints is None or len(face.keypoints) == 0:
        x0, y0, x1, y1 = face.box
        if (x0, y0) == (0, 0) and (x1, y1) == (image.shape[1], image.shape[0]):  # --detect none: untouched
            return image
    src = Image.fromarray(image)
    return np.asarray(src.transform((size, size), Image.AFFINE, crop_transform(face, size, margin),
                                    resample=Image.BILINEAR))
