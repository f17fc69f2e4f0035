"""--online-encoder: recompute the frozen encoder's features from every augmented batch, and at evaluation.

This is what the official CAFE code computes every step: the encoder sees the same augmented face
as the mask CNN. Here each image's augmentation parameters (featcache.views) are applied to its
cached image at the encoder's input size, then the store's preprocessing (--preprocess mode,
recorded in the encoder metadata) and the encoder: what featcache build --aug-views stores. The cache's --views augmented stores exactly
these features for K parameter rows per image.
"""
from __future__ import annotations

import torch

from featcache.encoders import create_recorded_encoder, preprocess_mode
from featcache.encoders.batched import input_size, tensor_preprocess
from featcache.views import apply_params, resize01


class OnlineEncoder:
    def __init__(self, enc_info: dict, device: torch.device, trust_plugins: bool = False, source: str | None = None):
        """``enc_info``: the store's encoder metadata. Its spec is imported as a plug-in only with
        ``trust_plugins`` (--trust-plugins); ``source`` names the store and key for the refusal message."""
        spec = enc_info.get("spec") or enc_info["metadata"]["model"]
        # the store's input mode (featcache build --preprocess) is part of the features
        enc = create_recorded_encoder(
            spec, enc_info["fingerprint"], str(device), recorded_by="the feature store (--online-encoder)",
            trust_plugins=trust_plugins, preprocess=preprocess_mode(enc_info.get("metadata") or {}),
            source=source or f"the feature store's encoder {enc_info.get('key', '?')!r} (attribute 'spec')")
        meta = enc.metadata
        self.module, self.prep, self.size = enc.module, tensor_preprocess(meta), input_size(meta)

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] (B, 3, H, W) -> features (B, C)."""
        return self.module(self.prep(images01)).float()

    @torch.no_grad()
    def encode(self, images: torch.Tensor, params: torch.Tensor | None = None, noise_std: float = 0.0) -> torch.Tensor:
        """uint8 (B, H, W, 3) cached images, augmented by parameter rows when given -> features (B, C)."""
        if params is None:  # evaluation: the plain image, rendered as the augmented ones are
            return self(resize01(images.permute(0, 3, 1, 2).float() / 255.0, self.size))
        # rendered at the encoder's input size, as featcache build --aug-views renders the stored views
        return self(apply_params(images, params, self.size, noise_std))
