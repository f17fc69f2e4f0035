"""`maskfer predict`: class probabilities for raw images with a trained run.

Runs the same frozen encoder the run was trained against (checked by fingerprint), then
the mask model. Unreadable images are reported per file and do not stop the others.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from featcache.build import encode_views
from featcache.devices import resolve_device
from featcache.encoders import create_encoder, fingerprint
from featcache.images import ImageError, load_image, resize_uint8
from featcache.taxonomy import CLASSES
from maskfer import rundir
from maskfer.augment import prepare_images
from maskfer.evaluate import EvalError, load_run

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def collect_images(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        elif p.exists():
            files.append(p)
        else:
            raise EvalError(f"{p}: no such file or folder")
    if not files:
        raise EvalError(f"no images found in {', '.join(inputs)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def predict(run: str | Path, inputs: list[str], device: str = "auto", batch_size: int = 32,
            trust_plugins: bool = False) -> list[dict]:
    """``trust_plugins`` (--trust-plugins): allow a plug-in encoder spec named in the run's config.json
    to be imported; off by default, since a run directory may come from anyone."""
    dev = resolve_device(device)
    model, cfg, stored = load_run(Path(run), dev)
    need_feats = cfg.method_spec.needs_features
    enc = None
    if need_feats:
        spec = stored["encoder"]["spec"]
        enc = create_encoder(spec, device=str(dev), trust_plugins=trust_plugins,
                             source=f"{Path(run) / rundir.CONFIG} (field encoder.spec)",
                             preprocess=stored["encoder"].get("preprocess") or "clip")
        if fingerprint(enc.metadata) != stored["encoder"]["fingerprint"]:
            raise EvalError(f"encoder {spec!r} now loads with another fingerprint than the run was trained on "
                            f"({fingerprint(enc.metadata)} vs {stored['encoder']['fingerprint']})")
    files = collect_images(inputs)
    # Training resized uint8 images of this size (the store's image cache) to cfg.image_size; do the same.
    source_size = stored.get("source_image_size") or cfg.image_size
    results: list[dict] = []
    for s in range(0, len(files), batch_size):
        chunk, pix, thumbs, ok_files = files[s:s + batch_size], [], [], []
        for f in chunk:
            try:
                img = load_image(f)
                p = enc.preprocess(img) if enc is not None else None
                t = resize_uint8(img, source_size)
            except ImageError as e:
                results.append({"path": str(f), "error": str(e)})
                continue
            except Exception as e:  # noqa: BLE001 - decodable, but the encoder's preprocessing rejects it
                results.append({"path": str(f), "error": f"{f}: preprocessing failed: {type(e).__name__}: {e}"})
                continue
            ok_files.append(f)
            if p is not None:
                pix.append(p)
            thumbs.append(t)
        if not ok_files:
            continue
        feats = (torch.from_numpy(encode_views(enc, torch.stack(pix), dev)[:, 0]).to(dev)
                 if enc is not None else None)
        x = prepare_images(torch.from_numpy(np.stack(thumbs)).to(dev), cfg.image_size) if cfg.method_spec.needs_images else None
        with torch.no_grad():
            probs = torch.softmax(model(x, feats)["logits"].float(), dim=1).cpu().numpy()
        for f, p in zip(ok_files, probs):
            results.append({"path": str(f), "prediction": CLASSES[int(p.argmax())],
                            "probabilities": {c: float(v) for c, v in zip(CLASSES, p)}})
    order = {str(f): i for i, f in enumerate(files)}
    return sorted(results, key=lambda r: order[r["path"]])
