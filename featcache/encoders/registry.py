"""The name registry, `create_encoder` and `fingerprint` (the Encoder record and shared helpers: base.py).

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
from typing import Callable

from featcache.encoders import hf_clip, plugin
from featcache.encoders.modes import check_mode, preprocess_mode, with_preprocess_mode
# Shared with the backends; re-exported here, where they were defined before base.py existed.
from featcache.encoders.base import (Encoder, EncoderError, UntrustedSpecError, freeze, json_clean,  # noqa: F401
                                     sha256_files, sha256_state_dict)

__all__ = ["Encoder", "EncoderError", "UntrustedSpecError", "register_encoder", "list_encoders", "create_encoder",
           "fingerprint"]


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
                   source: str | None = None, preprocess: str = "clip") -> Encoder:
    """Build the frozen encoder named by ``spec`` on ``device`` (module moved there, eval, no grads).

    ``trust_plugins=False`` is for specs read from a file someone else may have written (a store's
    encoder metadata, a run's config.json): a plug-in spec ("module:factory" or an entry-point name)
    then raises :class:`UntrustedSpecError` BEFORE anything is imported; ``source`` names that file
    and field in the message. Registered names and Hugging Face ids / local directories are data and
    load either way (transformers' ``trust_remote_code`` is always off).

    ``preprocess`` is the input mode (featcache/encoders/modes.py): ``"clip"``, the encoder's own
    preprocessing, or ``"official"``, the official CAFE input (squashed, ImageNet mean/std), recorded in
    ``metadata["preprocess"]``. To re-create the encoder of a store, pass
    ``preprocess=preprocess_mode(stored_metadata)``.
    """
    spec = os.fspath(spec)
    check_mode(preprocess)
    if not trust_plugins and spec not in _REGISTRY:
        plugin.refuse_untrusted(spec, source)
    if spec in _REGISTRY:
        enc = plugin.check_encoder(_REGISTRY[spec](device=device), spec, f"registered encoder {spec!r}")
    elif plugin.is_plugin_spec(spec):
        enc = plugin.load_plugin(spec)
    elif (factory := plugin.find_entry_point(spec)) is not None:
        enc = plugin.from_factory(factory, spec, name=spec, origin=f"entry point {spec!r}")
    else:
        enc = hf_clip.load_clip(spec, known=list_encoders())  # transformers is imported only in there
    return freeze(with_preprocess_mode(enc, preprocess), device)


class FingerprintMismatch(EncoderError):
    """An encoder recorded by a store or a run now loads as another one (other weights, processor or mode)."""


def create_recorded_encoder(spec: str | os.PathLike, expected: str, device: str = "cpu", *, recorded_by: str,
                            trust_plugins: bool = False, source: str | None = None, preprocess: str = "clip") -> Encoder:
    """:func:`create_encoder` for an encoder that ``recorded_by`` (a store, a run, a model) recorded with
    fingerprint ``expected``; FingerprintMismatch when it now loads with another, since its features would
    not be the ones the record was made with."""
    enc = create_encoder(spec, device, trust_plugins=trust_plugins, source=source, preprocess=preprocess)
    got = fingerprint(enc.metadata)
    if got != expected:
        raise FingerprintMismatch(f"encoder {os.fspath(spec)!r} now loads with another fingerprint ({got}) than "
                                  f"{recorded_by} recorded ({expected}); its features are not the ones "
                                  f"{recorded_by} was made with")
    return enc


# Processor keys that name a class rather than change pixels; the same settings saved by another
# transformers version (CLIPFeatureExtractor vs CLIPImageProcessor) must give the same fingerprint.
_PROCESSOR_NOISE = {"image_processor_type", "feature_extractor_type", "processor_class", "auto_map"}
FINGERPRINT_FIELDS = ("type", "revision", "processor", "dim", "architecture")


def fingerprint(metadata: dict) -> str:
    """First 16 hex of sha256 over the canonical JSON of the fields that decide the features.

    The spec/model string is left out on purpose: the same checkpoint at another path matches.
    The input mode (``metadata["preprocess"]``) is covered unless it is ``clip``, the default: a store
    built before modes existed (no such field) keeps its fingerprint, and an ``official`` one differs.
    """
    fields = {k: metadata.get(k) for k in FINGERPRINT_FIELDS}
    if preprocess_mode(metadata) != "clip":
        fields["preprocess"] = metadata["preprocess"]
    proc = fields["processor"]
    if isinstance(proc, dict):
        fields["processor"] = {k: v for k, v in proc.items() if k not in _PROCESSOR_NOISE and not k.startswith("_")}
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
