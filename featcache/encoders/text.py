"""The text tower of a store's CLIP checkpoint: prompts -> projected text embeddings (CLIP zero-shot).

The checkpoint is found from the encoder metadata a store records (hf_clip.py): the local directory
(``local_path``, else the spec as given) or the hub id at the recorded commit, loaded offline-safe as the
image tower was. A local checkpoint must still hash to the recorded revision: text embeddings of
another checkpoint would not live in the stored image embeddings' space.

Embeddings are returned raw (``text_projection`` output, not L2-normalised), as the image features are
stored; the caller normalises both.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featcache.encoders.base import EncoderError, sha256_files
from featcache.encoders.hf_clip import _OFFLINE_MSG, _is_offline_error, _looks_like_path, _quiet, _weight_files

__all__ = ["TextTowerError", "TextTower", "load_text_tower", "encode_text"]

_NEEDS = ("zero-shot needs a CLIP checkpoint with its text tower (a full CLIPModel repo, e.g. "
          "openai/clip-vit-base-patch32)")


class TextTowerError(EncoderError):
    """The store's encoder has no usable text tower; the message names the encoder and what zero-shot needs."""


@dataclass
class TextTower:
    model: torch.nn.Module        # transformers CLIPModel, frozen, eval
    tokenizer: object
    logit_scale: float            # exp(logit_scale) of the checkpoint: CLIP's softmax temperature
    source: str                   # what was loaded (directory or hub id @ revision), for messages

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 256) -> np.ndarray:
        """(n, projection_dim) float32 projected text embeddings, not normalised, one per prompt."""
        out = []
        dev = next(self.model.parameters()).device
        for s in range(0, len(prompts), batch_size):
            tok = self.tokenizer(list(prompts[s:s + batch_size]), padding=True, truncation=True, return_tensors="pt")
            # text_model + text_projection = get_text_features, whose return type changed in transformers 5
            pooled = self.model.text_model(input_ids=tok["input_ids"].to(dev),
                                           attention_mask=tok["attention_mask"].to(dev)).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.text_projection.out_features), np.float32)


def _describe(metadata: dict, name: str | None) -> str:
    what = metadata.get("model") or metadata.get("spec") or "?"
    return f"encoder {name!r} ({metadata.get('type', '?')} {what!r})" if name else \
        f"encoder {what!r} ({metadata.get('type', '?')})"


def load_text_tower(metadata: dict, device: str | torch.device = "cpu", name: str | None = None) -> TextTower:
    """The text tower of the checkpoint that made a store's features (``metadata``: the encoder metadata the store
    records; ``name``: its store key, for messages). TextTowerError when the encoder is not a CLIP checkpoint
    with a text tower, or the checkpoint cannot be found as it was."""
    from transformers import AutoConfig, AutoTokenizer, CLIPModel

    who = _describe(metadata, name)
    if metadata.get("type") != "hf-clip":
        raise TextTowerError(f"{who} has no text tower: {_NEEDS}")
    if metadata.get("text_tower") is False:  # recorded at build time (stores built before say nothing)
        raise TextTowerError(f"{who} is a vision-only CLIP checkpoint: {_NEEDS}")
    spec, revision = metadata.get("local_path") or metadata.get("model") or "", metadata.get("revision")
    local = Path(spec).expanduser()
    kw = {"trust_remote_code": False}
    if local.is_dir():
        src = str(local)
        now = "sha256:" + sha256_files(_weight_files(local)) if revision and revision.startswith("sha256:") else None
        if now is not None and now != revision:
            raise TextTowerError(f"{who}: the checkpoint in {src} has changed since the store was built (weights "
                                 f"{now[:19]}..., recorded {revision[:19]}...); its text tower would not match the "
                                 "stored image features. Rebuild the store, or restore that checkpoint")
    elif _looks_like_path(spec):
        raise TextTowerError(f"{who}: its checkpoint directory {spec!r} is not there any more; {_NEEDS}, at the "
                             "path the store was built from")
    else:
        src = spec
        if revision and revision != "unknown" and not revision.startswith("sha256:"):
            kw["revision"] = revision  # the hub commit the image features came from
    where = src + (f" @ {kw['revision']}" if "revision" in kw else "")
    try:
        cfg = AutoConfig.from_pretrained(src, **kw)
        if cfg.model_type != "clip":
            raise TextTowerError(f"{who} is a {cfg.model_type!r} checkpoint ({where}) without a text tower: {_NEEDS}")
        with _quiet():
            model, info = CLIPModel.from_pretrained(src, output_loading_info=True, **kw)
        tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    except TextTowerError:
        raise
    except OSError as e:
        if not local.is_dir() and _is_offline_error(e):
            raise TextTowerError(_OFFLINE_MSG.format(spec=where) + f" ({who}'s text tower)") from e
        raise TextTowerError(f"{who}: cannot load the text tower or tokenizer of {where}: {e}") from e
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise TextTowerError(f"{who}: cannot load the text tower or tokenizer of {where}: {type(e).__name__}: {e}") \
            from e
    missing = sorted(k for k in info.get("missing_keys", ()) if k.startswith(("text_model.", "text_projection",
                                                                             "logit_scale")))
    if missing:  # a vision-only checkpoint saved under a full CLIP config would load a RANDOM text tower
        raise TextTowerError(f"{who}: {where} has no weights for {len(missing)} text-tower tensor(s), e.g. "
                             f"{missing[:2]}: {_NEEDS}")
    # transformers 5 builds an EMPTY tokenizer (two special tokens) from a directory without tokenizer files:
    # every prompt would become the same tokens. A byte-level CLIP BPE has at least the 256 byte tokens.
    if len(tokenizer) < 256:
        raise TextTowerError(f"{who}: {where} has no tokenizer files (vocab.json and merges.txt, or tokenizer.json; "
                             f"what loaded has {len(tokenizer)} tokens): {_NEEDS}, saved with its tokenizer")
    if len(tokenizer) > model.config.text_config.vocab_size:
        raise TextTowerError(f"{who}: the tokenizer of {where} has {len(tokenizer)} tokens, its text tower embeds "
                             f"{model.config.text_config.vocab_size}: they are not one checkpoint's")
    model = model.float().eval().requires_grad_(False).to(torch.device(device))
    if metadata.get("dim") is not None and model.text_projection.out_features != int(metadata["dim"]):
        raise TextTowerError(f"{who}: the text tower of {where} projects to {model.text_projection.out_features} "
                             f"dimensions, the stored image features have {metadata['dim']}")
    return TextTower(model, tokenizer, float(model.logit_scale.exp()), where)


def encode_text(metadata: dict, prompts: list[str], device: str | torch.device = "cpu",
                name: str | None = None) -> np.ndarray:
    """Projected text embeddings (len(prompts), dim) of the store's CLIP checkpoint (see :func:`load_text_tower`)."""
    return load_text_tower(metadata, device, name).encode(prompts)
