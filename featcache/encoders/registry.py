"""The Encoder record, the name registry, `create_encoder` and `fingerprint`.

Resolution order of a spec (see docs/encoders.md):
1. a registered name ("efficientnet-lite0");
2. "module.path:factory", a plug-in factory imported by path;
3. an entry point named `spec` in the group "featcache.encoders";
4. anything else: a Hugging Face hub id or a local directory -> the "hf-clip" encoder.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Encoder", "EncoderError", "UntrustedSpecError", "register_encoder", "list_encoders", "create_encoder",
           "fingerprint"]


class EncoderError(RuntimeError):
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


_REGISTRY: dict[str, Callable[..., Encoder]] = {}


def register_encoder(name: str):
    """Decorator: register ``fn(device="cpu") -> Encoder`` under ``name`` (timm-style)."""

    def deco(fn):
        old = _REGISTRY.get(name)
        # Re-registering the same function (module reloaded) is harmless; two different ones is a bug.
        if old is not None and getattr(old, "__qualname__", None) != getattr(fn, "__qualname__", None):
            raise ValueError(f"encoder name {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_encoders() -> list[str]:
    return sorted(_REGISTRY)


def create_encoder(spec: str | os.PathLike, device: str = "cpu", *, trust_plugins: bool = True,
                   source: str | None = None) -> Encoder:
    """Build the frozen encoder named by ``spec`` on ``device`` (module moved there, eval, no grads).

    ``trust_plugins=False`` is for specs read from a file someone else may have written (a store's
    encoder metadata, a run's config.json): a plug-in spec ("module:factory" or an entry-point name)
    then raises :class:`UntrustedSpecError` BEFORE anything is imported; ``source`` names that file
    and field in the message. Registered names and Hugging Face ids / local directories are data and
    load either way (transformers' ``trust_remote_code`` is always off).
    """
    from featcache.encoders import plugin  # local: plugin imports this module

    spec = os.fspath(spec)
    if not trust_plugins and spec not in _REGISTRY:
        plugin.refuse_untrusted(spec, source)
    if spec in _REGISTRY:
        enc = plugin.check_encoder(_REGISTRY[spec](device=device), spec, f"registered encoder {spec!r}")
    elif plugin.is_plugin_spec(spec):
        enc = plugin.load_plugin(spec)
    elif (factory := plugin.find_entry_point(spec)) is not None:
        enc = plugin.from_factory(factory, spec, name=spec, origin=f"entry point {spec!r}")
    else:
        from featcache.encoders.hf_clip import load_clip  # transformers is imported only here

        enc = load_clip(spec, known=list_encoders())
    return freeze(enc, device)


def freeze(enc: Encoder, device: str = "cpu") -> Encoder:
    """Put the module on ``device`` in eval mode without gradients: features are a pure function of pixels."""
    enc.module.to(torch.device(device))
    enc.module.eval()
    enc.module.requires_grad_(False)
    return enc


# Processor keys that name a class rather than change pixels; the same settings saved by another
# transformers version (CLIPFeatureExtractor vs CLIPImageProcessor) must give the same fingerprint.
_PROCESSOR_NOISE = {"image_processor_type", "feature_extractor_type", "processor_class", "auto_map"}
FINGERPRINT_FIELDS = ("type", "revision", "processor", "dim", "architecture")


def fingerprint(metadata: dict) -> str:
    """First 16 hex of sha256 over the canonical JSON of the fields that decide the features.

    The spec/model string is left out on purpose: the same checkpoint at another path matches.
    """
    fields = {k: metadata.get(k) for k in FINGERPRINT_FIELDS}
    proc = fields["processor"]
    if isinstance(proc, dict):
        fields["processor"] = {k: v for k, v in proc.items() if k not in _PROCESSOR_NOISE and not k.startswith("_")}
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
