"""Randomly initialised CLIP checkpoints saved like hub ones: offline tests, the demo, benchmarks.

`create_encoder(path)` loads them through exactly the code path of openai/clip-vit-base-patch32.
With `VIT_B32` the compute equals the real ViT-B/32 (weights are random, so features mean nothing).
"""
from __future__ import annotations

from pathlib import Path

VIT_B32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               image_size=224, patch_size=32, projection_dim=512)


def save_clip_processor(path: str | Path, size: int) -> None:
    """A CLIP image processor (shortest edge `size`, centre crop, bicubic, CLIP mean/std), PIL backend."""
    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Proc
    except ImportError:  # transformers 4.x: the slow processor is the PIL one
        from transformers import CLIPImageProcessor as Proc
    Proc(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(path)


def save_random_clip(path: str | Path, seed: int = 0, **arch) -> Path:
    """Save a random CLIPVisionModelWithProjection (`arch`: CLIPVisionConfig fields) + its processor."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    path = Path(path)
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = CLIPVisionConfig(**arch)
    CLIPVisionModelWithProjection(config).save_pretrained(path)
    save_clip_processor(path, config.image_size)
    return path
