"""The Python API: expressions of the faces in photos, frames or videos, from a run or a packaged model.

    from maskfer import Predictor
    p = Predictor.from_pretrained("models/cafe-ferplus")      # a `maskfer export` folder or a hub id
    for face in p.predict(["group.jpg", pil_image, rgb_array]):
        print(face["input"], face["box"], face["prediction"])

Each face is found (maskfer.faces), aligned (maskfer.align) and classified by the same frozen encoder
the model was trained against (checked by fingerprint) and the trained model. ``detect="none"`` takes
every image as one pre-cropped face. `maskfer predict` is a thin wrapper over this module.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from featcache.devices import resolve_device
from featcache.encoders import create_recorded_encoder
from featcache.errors import FerError
from featcache.images import ImageError, load_image, resize_uint8
from featcache.taxonomy import CLASSES
from maskfer import rundir
from maskfer.align import DEFAULT_CROP, DEFAULT_MARGIN, align_face
from maskfer.augment import prepare_images
from maskfer.config import TrainConfig
from maskfer.evaluate import load_run
from maskfer.faces import create_detector
from maskfer.model import create_model
from maskfer.onnx_export import OnnxClassifier
from maskfer.video import read_frames

PACKAGE_FORMAT = "cafe-fer-model"
PACKAGE_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ONNX_FILE = "model.onnx"


class PredictorError(FerError):
    pass


def package_config(stored: dict) -> dict:
    """What a packaged model needs besides its weights, from a run's config.json (``stored``)."""
    cfg = stored["config"]
    return {
        "format": PACKAGE_FORMAT, "format_version": PACKAGE_VERSION,
        "classes": list(CLASSES), "method": cfg["method"],
        "image_size": cfg["image_size"],
        "source_image_size": stored.get("source_image_size") or cfg["image_size"],
        "feat_dim": int(stored["feat_dim"]),
        "encoder": {k: stored["encoder"].get(k) for k in ("spec", "key", "fingerprint", "preprocess")}
        | {"model_id": (stored["encoder"].get("metadata") or {}).get("model"),
           "revision": (stored["encoder"].get("metadata") or {}).get("revision")},
        "train_config": cfg, "config_hash": stored.get("config_hash"),
    }


def _config_from_package(pkg: dict, source: str) -> TrainConfig:
    if pkg.get("format") != PACKAGE_FORMAT:
        raise PredictorError(f"{source}: not a cafe-fer model (field 'format' is {pkg.get('format')!r}, "
                             f"expected {PACKAGE_FORMAT!r}); make one with `maskfer export RUN DIR`")
    if pkg.get("classes") != list(CLASSES):
        raise PredictorError(f"{source}: field 'classes' {pkg.get('classes')} is not this version's class order "
                             f"{list(CLASSES)}")
    # the weights are in the package: never fetch the run's --pretrained initialisation again
    return dataclasses.replace(TrainConfig.from_record(pkg["train_config"]), pretrained=None)


def _model_from_package(pkg: dict, state: dict, source: str) -> tuple[torch.nn.Module, TrainConfig]:
    cfg = _config_from_package(pkg, source)
    model = create_model(cfg, int(pkg["feat_dim"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise PredictorError(f"{source}: the weights do not fit the model its config.json describes "
                             f"({str(e).strip().splitlines()[-1].strip()})") from None
    return model.eval(), cfg


def _as_rgb(item, where: str) -> np.ndarray:
    """An input image as RGB uint8 (H, W, 3): a path, a PIL image or an array (H, W) / (H, W, 3|4)."""
    if isinstance(item, (str, Path)):
        return np.asarray(load_image(item))
    if isinstance(item, Image.Image):
        return np.asarray(item.convert("RGB"))
    if isinstance(item, np.ndarray):
        a = item
        if a.dtype != np.uint8:
            raise PredictorError(f"{where}: expected a uint8 array (0-255), got {a.dtype}")
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (3, 4):
            raise PredictorError(f"{where}: expected an (H, W, 3) RGB array, got shape {a.shape}")
        return np.ascontiguousarray(a[:, :, :3])
    raise PredictorError(f"{where}: expected a path, a PIL image or a numpy array, got {type(item).__name__}")


class Predictor:
    """A trained model with its frozen encoder and a face detector."""

    def __init__(self, model: torch.nn.Module | None, cfg: TrainConfig, package: dict, device: torch.device,
                 detect: str = "blazeface", trust_plugins: bool = False, source: str = "the model",
                 margin: float = DEFAULT_MARGIN, crop_size: int = DEFAULT_CROP, batch_size: int = 32,
                 onnx: OnnxClassifier | None = None):
        """``onnx``: classify with that exported graph (onnxruntime) instead of ``model`` and the encoder."""
        self.model = model.to(device).eval() if model is not None else None
        self.cfg, self.package, self.device, self.onnx = cfg, package, device, onnx
        self.detector = create_detector(detect)
        self.margin, self.crop_size, self.batch_size = margin, crop_size, batch_size
        self.source_size = int(package["source_image_size"])
        self.encoder = None
        if cfg.method_spec.needs_features and onnx is None:
            enc = package["encoder"]
            self.encoder = create_recorded_encoder(enc["spec"], enc["fingerprint"], str(device), recorded_by=source,
                                                   trust_plugins=trust_plugins, source=f"{source} (field encoder.spec)",
                                                   preprocess=enc.get("preprocess") or "clip")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_run(cls, run: str | Path, device: str = "auto", **kw) -> "Predictor":
        """The last checkpoint of a `maskfer train` run directory."""
        dev = resolve_device(device)
        model, cfg, stored = load_run(Path(run), dev)
        return cls(model, cfg, package_config(stored), dev, source=str(Path(run) / rundir.CONFIG), **kw)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device: str = "auto", revision: str | None = None,
                        backend: str = "torch", **kw) -> "Predictor":
        """A `maskfer export` folder, or a Hugging Face hub repository holding one (downloaded with
        huggingface_hub, cached, offline once cached). The encoder is loaded by its recorded id and checked
        by fingerprint. ``backend="onnx"``: run the folder's model.onnx (`maskfer export --format onnx`) with
        onnxruntime on the CPU instead; no torch model or encoder is loaded."""
        from safetensors.torch import load_file

        folder = resolve_package(name_or_path, revision)
        cfg_path = folder / CONFIG
        try:
            pkg = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise PredictorError(f"{folder}: no {CONFIG}; not a model made by `maskfer export`") from None
        except (OSError, json.JSONDecodeError) as e:
            raise PredictorError(f"{cfg_path}: cannot read it ({e})") from None
        if backend not in ("torch", "onnx"):
            raise PredictorError(f"unknown backend {backend!r}; known: torch, onnx")
        if backend == "onnx":
            cfg = _config_from_package(pkg, str(cfg_path))
            if not (folder / ONNX_FILE).is_file():
                raise PredictorError(f"{folder}: no {ONNX_FILE}; export it with `maskfer export RUN DIR --format onnx`")
            onnx = OnnxClassifier(folder / ONNX_FILE)
            if onnx.image_size != int(pkg["source_image_size"]) or onnx.classes != list(CLASSES):
                raise PredictorError(f"{folder / ONNX_FILE} does not match {cfg_path} (image size {onnx.image_size}, "
                                     f"classes {onnx.classes}); export both again")
            return cls(None, cfg, pkg, torch.device("cpu"), source=str(cfg_path), onnx=onnx, **kw)
        try:
            state = load_file(str(folder / WEIGHTS))
        except Exception as e:  # noqa: BLE001 - missing or damaged: the same to the user
            raise PredictorError(f"{folder / WEIGHTS}: cannot read the weights ({e})") from None
        dev = resolve_device(device)
        model, cfg = _model_from_package(pkg, state, str(cfg_path))
        return cls(model, cfg, pkg, dev, source=str(cfg_path), **kw)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def classify(self, faces: list[np.ndarray]) -> np.ndarray:
        """Class probabilities (N, 7) in CLASSES order of aligned face crops, RGB uint8 (H, W, 3); a crop is
        treated exactly as a training image (the encoder's own preprocessing; the CNN's input resized
        from the store's image size)."""
        out = []
        for s in range(0, len(faces), self.batch_size):
            pil = [Image.fromarray(f) for f in faces[s:s + self.batch_size]]
            if self.onnx is not None:  # the graph takes the crops at the store's image size and does the rest
                out.append(self.onnx.probabilities(np.stack([resize_uint8(p, self.source_size) for p in pil])))
                continue
            feats = x = None
            if self.encoder is not None:
                pix = torch.stack([self.encoder.preprocess(p) for p in pil]).to(self.device)
                feats = self.encoder.module(pix).float()
            if self.cfg.method_spec.needs_images:
                thumbs = torch.from_numpy(np.stack([resize_uint8(p, self.source_size) for p in pil]))
                x = prepare_images(thumbs.to(self.device), self.cfg.image_size)
            out.append(torch.softmax(self.model(x, feats)["logits"].float(), dim=1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), np.float32)

    def faces(self, image: np.ndarray) -> list[tuple[dict, np.ndarray]]:
        """(face record, aligned crop) for each face the detector finds in an RGB uint8 image."""
        return [(f.as_dict(), align_face(image, f, self.crop_size, self.margin)) for f in self.detector.detect(image)]

    def predict(self, images) -> list[dict]:
        """One dict per face of each image (paths, PIL images or RGB uint8 arrays; one or a list):
        ``input`` (the path, or the position in the list), ``face`` (its number in the image), ``box``
        [x0, y0, x1, y1] in pixels, ``score``, ``keypoints``, ``prediction``, ``probabilities``. An image
        without a face gives one row with ``face`` None and ``prediction`` None; an unreadable one a row
        with ``error``."""
        single = isinstance(images, (str, Path, Image.Image, np.ndarray))
        items = [images] if single else list(images)
        return list(self._rows(((str(it) if isinstance(it, (str, Path)) else i, it) for i, it in enumerate(items))))

    def predict_video(self, path: str | Path, every: int = 1) -> list[dict]:
        """One dict per face per sampled frame (every ``every``-th frame), with ``frame`` and ``time`` (s)."""
        return list(self._rows(((str(path), frame) for frame in read_frames(path, every)), source=str(path)))

    def _rows(self, items: Iterable[tuple], source: str | None = None) -> Iterator[dict]:
        """Detect and align per image, classify crops in batches across images, keep the input order. An
        error while reading ``items`` (a video that stops decoding) ends them with an error row for
        ``source``, after the rows already made."""
        pending: list[tuple[dict, np.ndarray]] = []

        def flush():
            probs = self.classify([c for _, c in pending])
            for (row, _), p in zip(pending, probs):
                row["prediction"] = CLASSES[int(p.argmax())]
                row["probabilities"] = {c: float(v) for c, v in zip(CLASSES, p)}
            pending.clear()

        ready: list[dict] = []
        items = iter(items)
        while True:
            try:
                key, item = next(items)
            except StopIteration:
                break
            except FerError as e:
                ready.append({"input": source, "error": str(e)})
                break
            base = {"input": key}
            if hasattr(item, "time"):  # a video frame
                base |= {"frame": item.index, "time": round(item.time, 4)}
                item = item.image
            try:
                rgb = _as_rgb(item, f"input {key}")
            except ImageError as e:
                ready.append(base | {"error": str(e)})
                continue
            found = self.faces(rgb)
            if not found:
                ready.append(base | {"face": None, "prediction": None, "note": "no face found"})
            for k, (rec, crop) in enumerate(found):
                row = base | {"face": k} | rec
                ready.append(row)
                pending.append((row, crop))
            if len(pending) >= self.batch_size:
                flush()
                yield from ready
                ready = []
        if pending:
            flush()
        yield from ready


def resolve_package(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local export folder as is; otherwise a hub repository id, fetched with huggingface_hub."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if p.exists() or str(name_or_path).startswith((".", "/")) or str(name_or_path).count("/") != 1:
        raise PredictorError(f"{name_or_path}: no such model folder (and not a hub id OWNER/NAME)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: one message naming the id
        raise PredictorError(f"cannot fetch model {name_or_path!r} from the Hugging Face hub "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
