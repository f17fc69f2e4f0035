"""Batched tensor preprocessing equivalent to an encoder's own per-image preprocessing.

Used when features are recomputed from augmented batches on the device (maskfer's
--online-encoder and predict), where a per-image PIL round trip would be a Python loop over
samples. It reproduces resize-shortest-side + center-crop + normalise from the settings the
encoder recorded in its metadata; resampling differs from PIL's in the last bits, so online
features match cached ones closely, not bit for bit.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from featcache.encoders.base import Encoder, EncoderError


def _settings(meta: dict) -> tuple[int, tuple[int, int], list[float], list[float]]:
    p = meta.get("processor") or {}
    if "image_mean" in p:  # a transformers image processor
        size = p.get("size") or {}
        short = size.get("shortest_edge") or size.get("height")
        crop = p.get("crop_size") or {"height": short, "width": short}
        return int(short), (int(crop["height"]), int(crop["width"])), list(p["image_mean"]), list(p["image_std"])
    if "mean" in p and "resize_shortest_edge" in p:
        c = int(p["center_crop"])
        return int(p["resize_shortest_edge"]), (c, c), list(p["mean"]), list(p["std"])
    raise EncoderError(f"encoder {meta.get('model')!r} records no processor settings usable for batched preprocessing")


def tensor_preprocess(enc_or_meta: Encoder | dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(images01 (B, 3, H, W) float in [0, 1]) -> pixels`` ready for the encoder's module."""
    meta = enc_or_meta.metadata if isinstance(enc_or_meta, Encoder) else enc_or_meta
    short, (ch, cw), mean, std = _settings(meta)

    def run(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        s = short / min(h, w)
        nh, nw = max(ch, round(h * s)), max(cw, round(w * s))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
        top, left = (nh - ch) // 2, (nw - cw) // 2
        x = x[..., top:top + ch, left:left + cw]
        m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        sd = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - m) / sd

    return run
