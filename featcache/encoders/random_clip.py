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


# The tiny full CLIP's text tower: real CLIP's 77-token context, a vocabulary of single bytes (see
# save_byte_tokenizer), and the special tokens' ids where that vocabulary puts them.
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513)


def save_byte_tokenizer(path: str | Path, max_length: int = 77) -> None:
    """A CLIP tokenizer with no merges: every byte is a token (with and without ``</w>``), plus the two
    special tokens, ids 512 and 513. Saved as hub CLIP repos are (vocab.json, merges.txt and the
    tokenizer's own files), so AutoTokenizer loads it as it loads openai/clip-vit-base-patch32's."""
    import json

    from transformers import CLIPTokenizer
    try:
        from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode
    except ImportError:  # transformers 5 keeps it with the slow -> fast converters
        from transformers.convert_slow_tokenizer import bytes_to_unicode

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": i + 256 for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=max_length).save_pretrained(path)


def save_random_full_clip(path: str | Path, seed: int = 0, projection_dim: int = 16, text: dict | None = None,
                          **vision) -> Path:
    """Save a random full CLIPModel (text and vision towers), its tokenizer (save_byte_tokenizer) and its image
    processor, laid out as hub CLIP repos are. ``vision``: CLIPVisionConfig fields; ``text``: CLIPTextConfig
    fields [default TINY_TEXT, which the byte tokenizer fits]."""
    import torch
    from transformers import CLIPConfig, CLIPModel
    from transformers.utils import logging as hf_logging

    path = Path(path)
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=dict(text or TINY_TEXT), vision_config=vision, projection_dim=projection_dim)
    CLIPModel(config).save_pretrained(path)
    save_clip_processor(path, config.vision_config.image_size)
    save_byte_tokenizer(path, config.text_config.max_position_embeddings)
    return path
