"""What the encoder registry and its backends share: the Encoder record, the errors, freezing and hashing.

The registry (``registry.py``) imports its backends (``plugin.py``, ``hf_clip.py``); the backends import
this module, never the registry, so the import graph has no cycle.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable

import torch

from featcache.errors import FerError

__all__ = ["Encoder", "EncoderError", "UntrustedSpecError", "freeze", "sha256_files", "sha256_state_dict",
           "json_clean"]


class EncoderError(FerError, RuntimeError):  # RuntimeError: its only base before FerError; kept for callers
    """An encoder spec could not be turned into a working encoder; the message says why."""


class UntrustedSpecError(EncoderError):
    """A spec read from a store or run directory names a plug-in (code to import); refused before importing it."""


@dataclass
class Encoder:
    name: str                    # default store key, e.g. "clip-vit-base-patch32"
    module: torch.nn.Module      # frozen, eval(); forward(pixels[B,3,H,W] float) -> features[B,C]
    preprocess: Callable         # picklable; RGB PIL image -> float CHW tensor
    dim: int
    metadata: dict               # JSON-able: type, model, revision, processor, dim, architecture, spec


def freeze(enc: Encoder, device: str = "cpu") -> Encoder:
    """Put the module on ``device`` in eval mode without gradients: features are a pure function of pixels."""
    enc.module.to(torch.device(device))
    enc.module.eval()
    enc.module.requires_grad_(False)
    return enc


def sha256_files(paths) -> str:
    """sha256 over the files' names and bytes (1 MiB chunks, so a 600 MB checkpoint never sits in memory)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: os.path.basename(p)):
        h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def sha256_state_dict(module: torch.nn.Module) -> str:
    """Content hash of a module's parameters and buffers, for plug-ins that have no weight file."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}:{t.dtype}:{tuple(v.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def json_clean(obj):
    """JSON round trip: tuples -> lists, so stored metadata equals what is read back."""
    return json.loads(json.dumps(obj, default=str))
