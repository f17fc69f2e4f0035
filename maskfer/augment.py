"""Batched image augmentation on the training device: whole-batch tensor ops, no per-sample loops.

The augmentation itself (noise on the source pixels, resize, flip, random erasing) is
featcache.views: a parameter row per image, applied to the whole batch. A training batch
draws its rows from the epoch's generator (:func:`augment_batch`); with ``--views augmented``
the rows are the ones the store encoded (featcache build --aug-views), so the CNN sees exactly
the augmented face its cached feature came from. Either way the batch goes through the same
:func:`featcache.views.apply_params`, as the encoder's augmented views did at build time.

Order (as in the CAFE code): Gaussian noise on the 0-255 source pixels (p = 0.5, variance 30,
before the resize) -> resize -> normalise -> horizontal flip -> random erasing with scale
0.02-0.25 (value 0 on the normalised tensor = the ImageNet mean colour).
"""
from __future__ import annotations

import torch

from featcache.views import IMAGENET_MEAN, IMAGENET_STD, Recipe, apply_params, draw_params, resize01

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "to_float_nchw", "resize", "normalize", "prepare_images",
           "recipe_of", "augment_batch", "augment_with"]

resize = resize01


def to_float_nchw(images: torch.Tensor, layout: str = "auto") -> torch.Tensor:
    """(B, H, W, 3) or (B, 3, H, W), uint8 (0..255) or float (0..1) -> float32 (B, 3, H, W) in [0, 1].

    layout "auto" takes channels from whichever of dim 1 / dim 3 has size 3. It raises when
    both do (3-pixel-wide images) and then needs "nhwc" or "nchw".
    """
    if images.dim() != 4:
        raise ValueError(f"expected a 4-D image batch, got shape {tuple(images.shape)}")
    if layout == "auto":
        nchw, nhwc = images.shape[1] == 3, images.shape[3] == 3
        if nchw == nhwc:
            raise ValueError(f"cannot tell channels of shape {tuple(images.shape)}; pass layout='nhwc' or 'nchw'")
        layout = "nchw" if nchw else "nhwc"
    if layout == "nhwc":
        images = images.permute(0, 3, 1, 2)
    elif layout != "nchw":
        raise ValueError(f"layout must be 'auto', 'nhwc' or 'nchw', got {layout!r}")
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def normalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def prepare_images(images: torch.Tensor, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   layout: str = "auto") -> torch.Tensor:
    """Evaluation path: to float, resize, normalise; nothing random."""
    return normalize(resize(to_float_nchw(images, layout), size), mean, std)


def recipe_of(cfg) -> Recipe:
    """The augmentation a maskfer.config.TrainConfig asks for."""
    return Recipe(flip_p=0.5 if cfg.flip else 0.0, erase_p=cfg.erasing, erase_scale=(cfg.erase_min, cfg.erase_max),
                  noise_p=cfg.noise_p if cfg.noise_std > 0 else 0.0, noise_std=cfg.noise_std)


def augment_with(images: torch.Tensor, params: torch.Tensor, size: int, noise_std: float) -> torch.Tensor:
    """uint8 (B, H, W, 3) images augmented by the given parameter rows -> normalised (B, 3, size, size)."""
    return normalize(apply_params(images, params, size, noise_std))


def augment_batch(images: torch.Tensor, size: int, recipe: Recipe, *, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Training path: draw each image's parameter row from ``generator`` and apply it.
    Returns (normalised float images (B, 3, size, size), rows (B, len(featcache.views.PARAMS)))."""
    params = draw_params(images.shape[0], recipe, generator, device=images.device)
    return augment_with(images, params, size, recipe.noise_std), params
