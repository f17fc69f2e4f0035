"""Batched tensor preprocessing equivalent to an encoder's own per-image preprocessing.

Used when features are computed from augmented batches on the device: `featcache build
--aug-views`, maskfer's --online-encoder and predict, where a per-image PIL round trip would be a
Python loop over samples. From the settings the encoder recorded in its metadata it reproduces

* mode ``official`` (``metadata["preprocess"]``, featcache/encoders/modes.py): squash to S x S
  (bilinear, antialiased) + ImageNet mean/std;
* a transformers image processor (CLIP) or EfficientNet-Lite: resize the shortest side (bicubic,
  antialiased) + centre crop + mean/std;
* the FER2013 CNNs' grayscale input: OpenCV's gray weights, squash to S x S (bilinear; antialiased
  for ``pil-bilinear``, not for ``cv2-linear``), mean/std, the gray plane in all three channels.

Resampling differs from PIL's (and gray rounding from OpenCV's uint8) in the last bits, so these
features match the per-image path closely, not bit for bit.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from featcache.encoders.base import Encoder, EncoderError
from featcache.encoders.modes import preprocess_mode

__all__ = ["tensor_preprocess", "input_size"]

_GRAY = (0.299, 0.587, 0.114)  # OpenCV BGR2GRAY weights on R, G, B


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    sd = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / sd


def _settings(meta: dict) -> dict:
    """What the batched path needs: ``kind`` ("squash", "crop" or "gray") and its sizes and statistics."""
    name = meta.get("model")
    if preprocess_mode(meta) == "official":
        p = meta["preprocess"]
        return {"kind": "squash", "size": int(p["size"]), "mean": list(p["mean"]), "std": list(p["std"])}
    if preprocess_mode(meta) != "clip":
        raise EncoderError(f"encoder {name!r} records preprocessing mode {preprocess_mode(meta)!r}, "
                           "which this featcache does not know")
    p = meta.get("processor") or {}
    if "image_mean" in p:  # a transformers image processor
        size = p.get("size") or {}
        short = size.get("shortest_edge") or size.get("height")
        crop = p.get("crop_size") or {"height": short, "width": short}
        return {"kind": "crop", "short": int(short), "crop": (int(crop["height"]), int(crop["width"])),
                "mean": list(p["image_mean"]), "std": list(p["image_std"])}
    if "mean" in p and "resize_shortest_edge" in p:
        c = int(p["center_crop"])
        return {"kind": "crop", "short": int(p["resize_shortest_edge"]), "crop": (c, c),
                "mean": list(p["mean"]), "std": list(p["std"])}
    if "grayscale" in p and "resize" in p:
        h, w = (int(v) for v in p["resize"])
        return {"kind": "gray", "size": (h, w), "antialias": p.get("resample") != "cv2-linear",
                "mean": float(p["mean"]), "std": float(p["std"])}
    raise EncoderError(f"encoder {name!r} records no processor settings usable for batched preprocessing "
                       "(a plug-in's own preprocess cannot be batched); --preprocess official can be, "
                       "where the encoder takes square RGB input")


def input_size(enc_or_meta: Encoder | dict) -> int:
    """The side of the square image the encoder's input is made from: the official mode's S, a CLIP
    processor's crop size (224 for ViT-B/32), EfficientNet's crop, a FER2013 CNN's input (48, 64).
    An augmented view is rendered at this size before :func:`tensor_preprocess`, so that the encoder's own
    resize is a no-op and the augmentation is applied at the resolution the encoder sees."""
    meta = enc_or_meta.metadata if isinstance(enc_or_meta, Encoder) else enc_or_meta
    s = _settings(meta)
    if s["kind"] == "squash":
        return s["size"]
    if s["kind"] == "crop":
        return max(s["crop"])
    return max(s["size"])


def tensor_preprocess(enc_or_meta: Encoder | dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(images01 (B, 3, H, W) float in [0, 1]) -> pixels`` ready for the encoder's module, in the encoder's
    preprocessing mode (``clip`` or ``official``, see featcache/encoders/modes.py)."""
    meta = enc_or_meta.metadata if isinstance(enc_or_meta, Encoder) else enc_or_meta
    s = _settings(meta)

    if s["kind"] == "squash":
        size = s["size"]

        def squash(x: torch.Tensor) -> torch.Tensor:
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            return _normalise(x, s["mean"], s["std"])

        return squash

    if s["kind"] == "gray":
        (gh, gw), aa = s["size"], s["antialias"]

        def gray(x: torch.Tensor) -> torch.Tensor:
            w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            g = (x * w).sum(1, keepdim=True)
            if g.shape[-2:] != (gh, gw):
                g = F.interpolate(g, size=(gh, gw), mode="bilinear", align_corners=False, antialias=aa)
            return ((g - s["mean"]) / s["std"]).expand(-1, 3, -1, -1)

        return gray

    short, (ch, cw) = s["short"], s["crop"]

    def run(x: torch.Tensor) -> torch.Tensor:
        # int(): under torch.jit.trace (the ONNX export) sizes are tensors, which round() refuses
        h, w = int(x.shape[-2]), int(x.shape[-1])
        r = short / min(h, w)
        nh, nw = max(ch, round(h * r)), max(cw, round(w * r))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
        top, left = (nh - ch) // 2, (nw - cw) // 2
        x = x[..., top:top + ch, left:left + cw]
        return _normalise(x, s["mean"], s["std"])

    return run
