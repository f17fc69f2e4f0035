"""Plug-in encoders: "module.path:factory" specs and "featcache.encoders" entry points.

A factory is called with no arguments and returns either an ``Encoder`` or a
``(module, preprocess)`` tuple; a tuple is wrapped here (dim probed by one forward pass).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import re

import torch
from PIL import Image

from featcache.encoders.base import (Encoder, EncoderError, UntrustedSpecError, freeze, json_clean,
                                      sha256_state_dict)

ENTRY_POINT_GROUP = "featcache.encoders"
# "pkg.mod:factory" or "pkg.mod:Class.method"; the strict pattern keeps "C:\\models\\clip" a path.
_PLUGIN_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_PROBE_SIZE = 224  # the blank probe image; preprocess decides the size the module really sees


def is_plugin_spec(spec: str) -> bool:
    return bool(_PLUGIN_RE.match(spec))


def find_entry_point(name: str):
    """The loaded factory of the entry point ``name`` in our group, or None."""
    for ep in _entry_points():
        if ep.name == name:
            try:
                return ep.load()
            except Exception as e:
                raise EncoderError(f"entry point {name!r} ({ep.value}) in group {ENTRY_POINT_GROUP!r} "
                                   f"failed to load: {type(e).__name__}: {e}") from e
    return None


def _entry_points():
    # Separate function so tests can stand in a fake entry point without installing a distribution.
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


TRUST_HINT = "pass --trust-plugins (trust_plugins=True in Python) to allow it, if you trust whoever wrote that file"


def refuse_untrusted(spec: str, source: str | None) -> None:
    """Raise UntrustedSpecError if ``spec`` would import code; import nothing to find out.

    Entry points are matched by name from the installed distributions' metadata, never loaded.
    """
    if is_plugin_spec(spec):
        mod_name, attr = spec.split(":", 1)
        what = f"the encoder plug-in {spec!r}, which would import module {mod_name!r} and call {attr!r}"
    else:
        ep = next((e for e in _entry_points() if e.name == spec), None)
        if ep is None:
            return
        what = (f"the encoder {spec!r}, an installed {ENTRY_POINT_GROUP!r} entry point that would import and "
                f"call {ep.value!r}")
    raise UntrustedSpecError(f"{source or 'a stored encoder spec'} names {what}; not loaded, because a spec read "
                             f"from a store or run directory may not run code: {TRUST_HINT}")


def load_plugin(spec: str) -> Encoder:
    mod_name, attr = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:
        raise EncoderError(f"encoder plug-in {spec!r}: cannot import module {mod_name!r} "
                           f"({type(e).__name__}: {e}). Is it on PYTHONPATH / installed?") from e
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise EncoderError(f"encoder plug-in {spec!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return from_factory(obj, spec, name=attr.rsplit(".", 1)[-1], origin=f"encoder plug-in {spec!r}")


def from_factory(factory, spec: str, name: str, origin: str) -> Encoder:
    if not callable(factory):
        raise EncoderError(f"{origin}: {type(factory).__name__} object is not callable; "
                           "expected a factory function returning an Encoder or (module, preprocess)")
    out = factory()
    if isinstance(out, Encoder):
        enc = check_encoder(out, spec, origin)
        dim = probe_dim(freeze(enc), origin)
        if dim != enc.dim:
            raise EncoderError(f"{origin}: Encoder.dim is {enc.dim} but the module returns {dim} features")
        return enc
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.nn.Module) and callable(out[1]):
        return wrap_tuple(out[0], out[1], spec, name, origin)
    raise EncoderError(f"{origin}: factory returned {_describe(out)}; expected an Encoder or a "
                       "(torch.nn.Module, preprocess callable) tuple")


def wrap_tuple(module: torch.nn.Module, preprocess, spec: str, name: str, origin: str) -> Encoder:
    enc = Encoder(name=name, module=module, preprocess=preprocess, dim=0, metadata={})
    enc.dim = probe_dim(freeze(enc), origin)
    cls = type(module)
    enc.metadata = json_clean({
        "type": "plugin",
        "model": spec,
        "spec": spec,
        # No weight file to point at: the parameters themselves identify the weights.
        "revision": "state_dict-sha256:" + sha256_state_dict(module),
        "processor": {"callable": _qualname(preprocess), "settings": _settings(preprocess)},
        "dim": enc.dim,
        "architecture": {"class": f"{cls.__module__}.{cls.__qualname__}"},
    })
    return enc


def check_encoder(enc, spec: str, origin: str) -> Encoder:
    """Validate an Encoder built by someone else, so a broken plug-in fails here and not mid-build."""
    if not isinstance(enc, Encoder):
        raise EncoderError(f"{origin}: returned {_describe(enc)}; expected an Encoder")
    if not isinstance(enc.module, torch.nn.Module) or not callable(enc.preprocess):
        raise EncoderError(f"{origin}: Encoder.module must be a torch.nn.Module and Encoder.preprocess callable")
    md = dict(enc.metadata or {})
    md.setdefault("type", "plugin")
    md.setdefault("model", spec)
    md.setdefault("spec", spec)
    md.setdefault("dim", enc.dim)
    try:
        json.dumps(md)
    except TypeError as e:
        raise EncoderError(f"{origin}: Encoder.metadata must be JSON-able ({e})") from e
    enc.metadata = md
    return enc


def probe_dim(enc: Encoder, origin: str) -> int:
    """Feature width from one forward pass on a preprocessed blank image."""
    try:
        x = enc.preprocess(Image.new("RGB", (_PROBE_SIZE, _PROBE_SIZE), (128, 128, 128)))
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise EncoderError(f"{origin}: preprocess must return a CHW float tensor, got {_describe(x)}")
        with torch.inference_mode():
            y = enc.module(x.unsqueeze(0).float())
    except EncoderError:
        raise
    except Exception as e:
        raise EncoderError(f"{origin}: probing the encoder on a blank image failed: {type(e).__name__}: {e}") from e
    if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != 1:
        raise EncoderError(f"{origin}: module must return features of shape (B, C), got {_describe(y)}")
    return int(y.shape[1])


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, tuple):
        return f"a tuple of ({', '.join(type(v).__name__ for v in x)})"
    return f"{type(x).__name__} {x!r:.80}"


def _settings(obj) -> dict:
    """The JSON-able attributes of a preprocess object (size, mean, ...): they change the pixels."""
    out = {}
    for k, v in sorted(getattr(obj, "__dict__", {}).items()):
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def _qualname(obj) -> str:
    t = obj if callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', type(t).__name__)}"
