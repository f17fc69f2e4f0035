"""The "hf-clip" encoder: any CLIP checkpoint in transformers format (hub id or local directory).

Stored feature = the PROJECTED image embedding (``image_embeds``), raw: not L2-normalised, so
downstream code decides on normalisation and nothing is lost.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

from featcache.encoders.base import Encoder, EncoderError, json_clean, sha256_files

# Fields of CLIPVisionConfig that decide the network (not paths, versions or output flags).
_ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                "num_attention_heads", "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps")
_OFFLINE_MSG = ("cannot load CLIP model {spec!r}: not in the local Hugging Face cache and the hub is unreachable "
                "(HF_HUB_OFFLINE=1 or no network). Pass a local directory saved with save_pretrained, "
                "or run once online.")


class ClipImageEmbedder(torch.nn.Module):
    """pixels[B,3,H,W] -> image_embeds[B,projection_dim] (projected, not normalised)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).image_embeds


class ClipPreprocess:
    """Picklable (DataLoader workers): holds the checkpoint's own PIL image processor."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0].float()

    def __repr__(self) -> str:
        return f"ClipPreprocess({type(self.processor).__name__})"


def short_name(spec: str) -> str:
    """Store key: "openai/clip-vit-base-patch32" -> "clip-vit-base-patch32"; a directory -> its name."""
    p = Path(spec).expanduser()
    if p.is_dir():
        p = p.resolve()
        # A hub snapshot dir (.../models--org--name/snapshots/<hash>) is named after the repo, not the hash.
        if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
            return p.parent.parent.name.split("--")[-1]
        return p.name
    return spec.rstrip("/").rsplit("/", 1)[-1]


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a separator is meant as a directory.
    return spec.startswith((".", "/", "~", "\\")) or spec.count("/") > 1 or "\\" in spec


def load_clip(spec: str, known: list[str] = ()) -> Encoder:
    from transformers import CLIPVisionModelWithProjection

    local = Path(spec).expanduser()
    if _looks_like_path(spec) and not local.is_dir():
        raise EncoderError(f"cannot load CLIP model {spec!r}: no such directory")
    src = str(local) if local.is_dir() else spec
    try:
        with _quiet():
            model, info = CLIPVisionModelWithProjection.from_pretrained(
                src, config=_vision_config(spec, src), output_loading_info=True)
        processor = _load_processor(src)
    except OSError as e:
        if not local.is_dir() and _is_offline_error(e):
            hint = ""
            if "/" not in spec and known:
                hint = f" ({spec!r} is also not a registered encoder: {', '.join(known)}.)"
            raise EncoderError(_OFFLINE_MSG.format(spec=spec) + hint) from e
        raise EncoderError(f"cannot load CLIP model {spec!r}: {e}") from e
    except (ValueError, RuntimeError, KeyError) as e:  # corrupt or mismatched weights, odd configs
        if isinstance(e, EncoderError):
            raise
        raise EncoderError(f"cannot load CLIP model {spec!r}: {type(e).__name__}: {e}") from e
    # A checkpoint without a visual projection would load with a random one: refuse, never guess.
    bad = sorted(info.get("missing_keys", ())) + sorted(info.get("mismatched_keys", ()) or ())
    if bad:
        raise EncoderError(f"cannot load CLIP model {spec!r}: weights missing or mismatched for "
                           f"{len(bad)} tensor(s), e.g. {bad[:3]}; is it a CLIP checkpoint with a visual projection?")
    model = model.float().eval().requires_grad_(False)  # float: fp16 checkpoints would clash with fp32 pixels
    cfg = model.config
    dim = int(model.visual_projection.out_features)
    proc = json_clean(processor.to_dict())
    proc["backend"] = "pil"  # the torchvision backend resizes differently: part of what decides the pixels
    metadata = {
        "type": "hf-clip",
        "model": spec,
        "spec": spec,
        "revision": _revision(spec, local),
        "processor": proc,
        "dim": dim,
        "architecture": json_clean({"class": "CLIPVisionModelWithProjection",
                                    **{k: getattr(cfg, k, None) for k in _ARCH_FIELDS}}),
        # Outside the fingerprint (the image features do not depend on them): where --method zero-shot finds
        # this checkpoint's text tower (featcache.encoders.text), also when the spec was a relative path.
        "local_path": str(local.resolve()) if local.is_dir() else None,
        "text_tower": "text_projection.weight" in set(info.get("unexpected_keys") or ()),
    }
    return Encoder(name=short_name(spec), module=ClipImageEmbedder(model), preprocess=ClipPreprocess(processor),
                   dim=dim, metadata=metadata)


def _vision_config(spec: str, src: str):
    """The vision config to build, also from a full CLIPModel checkpoint (text + vision, most hub repos).

    CLIPModel sizes visual_projection by the TOP-LEVEL projection_dim; some converted repos leave a
    stale default (512) in vision_config.projection_dim, so the top-level value must win.
    """
    from transformers import AutoConfig

    # trust_remote_code=False, never None: None makes transformers PROMPT on a terminal to run a repo's own code.
    cfg = AutoConfig.from_pretrained(src, trust_remote_code=False)
    if cfg.model_type == "clip":
        vcfg = cfg.vision_config
        vcfg.projection_dim = cfg.projection_dim
        return vcfg
    if cfg.model_type == "clip_vision_model":
        return cfg
    raise EncoderError(f"cannot load CLIP model {spec!r}: its config is a {cfg.model_type!r} model, not CLIP "
                       "(wrap other encoders as a plug-in, see docs/encoders.md)")


def _load_processor(src: str):
    import transformers
    from transformers import AutoImageProcessor

    # transformers 5 picks the torchvision-backed processor by default; torchvision is not usable here.
    if int(transformers.__version__.split(".")[0]) >= 5:
        try:
            return AutoImageProcessor.from_pretrained(src, backend="pil", trust_remote_code=False)
        except TypeError:
            pass
    return AutoImageProcessor.from_pretrained(src, use_fast=False, trust_remote_code=False)


def _is_offline_error(e: OSError) -> bool:
    from huggingface_hub import constants

    msg = str(e).lower()
    return (bool(getattr(constants, "HF_HUB_OFFLINE", False)) or os.environ.get("HF_HUB_OFFLINE") == "1"
            or "couldn't connect" in msg or "offline" in msg or "cached files" in msg)


def _revision(spec: str, local: Path) -> str:
    """Hub commit hash when loaded from the hub cache, else sha256 of the local weight file(s)."""
    if local.is_dir():
        return "sha256:" + sha256_files(_weight_files(local))
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, "config.json")
    if isinstance(cached, str):
        m = re.search(r"[\\/]snapshots[\\/]([0-9a-f]{40})[\\/]", cached)
        if m:
            return m.group(1)
        return "sha256:" + sha256_files(_weight_files(Path(cached).parent))
    return "unknown"


def _weight_files(d: Path) -> list[Path]:
    # transformers prefers safetensors when both exist; hash what it actually loads.
    files = sorted(d.glob("*.safetensors")) or sorted(d.glob("pytorch_model*.bin"))
    if not files:
        raise EncoderError(f"no model.safetensors / pytorch_model.bin in {d}")
    return files


@contextlib.contextmanager
def _quiet():
    """Silence the load report (a full CLIPModel lists every unused text tensor) and progress bars."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()
