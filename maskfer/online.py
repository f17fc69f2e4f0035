"""--online-encoder: recompute the frozen encoder's features from each augmented batch.

This is what the original CAFE code did every step. It exists to measure what the cache
saves and to check that cached features (with the flipped view) stand in for it.
"""
from __future__ import annotations

import torch

from featcache.encoders import create_encoder, fingerprint
from featcache.encoders.batched import tensor_preprocess


class OnlineEncoder:
    def __init__(self, enc_info: dict, device: torch.device, trust_plugins: bool = False, source: str | None = None):
        """``enc_info``: the store's encoder metadata. Its spec is imported as a plug-in only with
        ``trust_plugins`` (--trust-plugins); ``source`` names the store and key for the refusal message."""
        spec = enc_info.get("spec") or enc_info["metadata"]["model"]
        enc = create_encoder(spec, device=str(device), trust_plugins=trust_plugins,
                             source=source or f"the feature store's encoder {enc_info.get('key', '?')!r} (attribute 'spec')")
        if fingerprint(enc.metadata) != enc_info["fingerprint"]:
            raise RuntimeError(
                f"--online-encoder: encoder {spec!r} now loads with fingerprint {fingerprint(enc.metadata)}, "
                f"but the store's features came from {enc_info['fingerprint']}; they are not comparable"
            )
        self.module, self.prep = enc.module, tensor_preprocess(enc)

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        return self.module(self.prep(images01)).float()
