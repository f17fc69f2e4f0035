"""Input preprocessing modes of an encoder (`featcache build --preprocess clip|official`).

* ``clip`` (the default): the encoder's own preprocessing (a CLIP checkpoint's image processor:
  resize the shortest side, centre crop, CLIP mean/std). Nothing is added to the metadata, so the
  fingerprints of stores built before modes existed are unchanged.
* ``official``: what the official CAFE code feeds CLIP, the same tensor as its ResNet input: the
  image squashed to S x S (torchvision ``Resize((S, S))`` on a PIL image = PIL bilinear, antialiased
  when shrinking; aspect ratio not kept, no crop), ``ToTensor`` (/255), ImageNet mean/std
  normalisation. S is the encoder's input size: 224 for CLIP ViT-B/32, B/16, L/14 (the official
  code's 224), the model's ``image_size`` for other CLIPs (a tiny test CLIP: 32). The mode and its
  settings are recorded in ``metadata["preprocess"]``, which the fingerprint then covers.

The batched, on-device twin of both modes is ``featcache.encoders.batched.tensor_preprocess``.
"""
from __future__ import annotations

import torch
from PIL import Image

from featcache.encoders.base import Encoder, EncoderError
from featcache.views import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["PREPROCESS_MODES", "OfficialPreprocess", "preprocess_mode", "with_preprocess_mode", "official_size"]

PREPROCESS_MODES = ("clip", "official")
_PROBE = 224  # blank probe image for plug-ins: their preprocess decides the size their module sees


class OfficialPreprocess:
    """Picklable: RGB PIL image -> squashed S x S (PIL bilinear) -> /255 -> ImageNet mean/std, float CHW."""

    def __init__(self, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size, self.mean, self.std = int(size), tuple(mean), tuple(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        x = x.permute(2, 0, 1).float().div_(255.0)
        return (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)

    def settings(self) -> dict:
        return {"mode": "official", "size": self.size,
                "resize": "squash to size x size, bilinear, antialiased (PIL BILINEAR; torchvision Resize((S, S)))",
                "rescale": "1/255", "mean": list(self.mean), "std": list(self.std)}

    def __repr__(self) -> str:
        return f"OfficialPreprocess({self.size})"


def preprocess_mode(metadata: dict) -> str:
    """The mode an encoder's metadata records: ``"clip"`` when it records none (every store built before modes)."""
    p = (metadata or {}).get("preprocess")
    return str(p.get("mode", "clip")) if isinstance(p, dict) else "clip"


def check_mode(mode: str) -> str:
    if mode not in PREPROCESS_MODES:
        raise EncoderError(f"unknown preprocessing mode {mode!r}: choose one of {', '.join(PREPROCESS_MODES)}")
    return mode


def official_size(enc: Encoder) -> int:
    """The square input size the official mode squashes to, or EncoderError where the mode cannot apply."""
    md = enc.metadata or {}
    name = md.get("model") or enc.name
    proc = md.get("processor") if isinstance(md.get("processor"), dict) else {}
    arch = md.get("architecture") if isinstance(md.get("architecture"), dict) else {}
    if md.get("type") == "fer2013-cnn" or "grayscale" in proc:
        raise EncoderError(
            f"--preprocess official feeds an encoder the official CAFE input (RGB, squashed, ImageNet mean/std); "
            f"encoder {name!r} takes {proc.get('resize', '?')} grayscale input normalised its own way, so that tensor "
            "is not an input it knows: use --preprocess clip (its own preprocessing)")
    if md.get("type") == "hf-clip" and arch.get("image_size"):
        return int(arch["image_size"])
    if md.get("type") == "efficientnet-lite" and arch.get("input_size"):
        return int(arch["input_size"])
    try:  # a plug-in: the size its own preprocessing produces
        from_blank = enc.preprocess(Image.new("RGB", (_PROBE, _PROBE), (128, 128, 128)))
    except Exception as e:  # noqa: BLE001 - any failure means the size cannot be told
        raise EncoderError(f"--preprocess official: cannot tell the input size of encoder {name!r} "
                           f"(its preprocess failed on a blank image: {type(e).__name__}: {e})") from e
    shape = tuple(getattr(from_blank, "shape", ()))
    if len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2]:
        raise EncoderError(f"--preprocess official needs an encoder that takes square RGB input; encoder {name!r} "
                           f"preprocesses a 224x224 image to shape {shape}: use --preprocess clip")
    return int(shape[1])


def with_preprocess_mode(enc: Encoder, mode: str) -> Encoder:
    """``enc`` with its per-image preprocessing and metadata switched to ``mode`` (``clip``: unchanged)."""
    if check_mode(mode) == "clip":
        return enc
    prep = OfficialPreprocess(official_size(enc))
    enc.preprocess = prep
    enc.metadata = {**enc.metadata, "preprocess": prep.settings()}
    return enc
