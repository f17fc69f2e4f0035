"""Batched augmentation: shapes, flip mask, erasing geometry and determinism."""
import pytest
import torch

from maskfer.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment_batch,
    gaussian_noise,
    prepare_images,
    random_erasing,
    random_hflip,
    to_float_nchw,
)


def _uint8_batch(b=6, s=40, seed=0):
    return torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_layouts_and_dtypes():
    nhwc = _uint8_batch(2, 8)
    nchw = nhwc.permute(0, 3, 1, 2)
    a, b = to_float_nchw(nhwc), to_float_nchw(nchw)
    assert a.shape == (2, 3, 8, 8) and a.dtype == torch.float32 and torch.equal(a, b)
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(to_float_nchw(b), b)  # float input taken as [0, 1]
    with pytest.raises(ValueError, match="layout"):
        to_float_nchw(torch.zeros(1, 3, 5, 3))


def test_augment_shapes_resize_and_normalisation():
    x, flip = augment_batch(_uint8_batch(), 32, generator=torch.Generator().manual_seed(0), erase_p=0)
    assert x.shape == (6, 3, 32, 32) and flip.shape == (6,) and flip.dtype == torch.bool
    grey = torch.full((1, 16, 16, 3), 128, dtype=torch.uint8)
    out = prepare_images(grey, 16)
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[0, :, 5, 5], expected, atol=1e-6)


def test_flip_mask_matches_the_flipped_images():
    images = prepare_images(_uint8_batch(16, 12), 12)
    out, flip = random_hflip(images, 0.5, torch.Generator().manual_seed(1))
    assert 0 < flip.sum() < 16
    assert torch.equal(out[flip], images[flip].flip(-1))
    assert torch.equal(out[~flip], images[~flip])
    # the trainer's use: pick the cached view that matches
    feats = torch.randn(16, 2, 5)
    picked = feats[torch.arange(16), flip.long()]
    assert torch.equal(picked[flip], feats[flip, 1])


def test_erasing_area_fraction_and_rate():
    s, b = 64, 400
    images = torch.ones(b, 3, s, s)
    out, erased = random_erasing(images, p=0.5, generator=torch.Generator().manual_seed(2))
    frac = erased.float().mean(dim=(1, 2))
    hit = frac > 0
    assert 0.4 < hit.float().mean() < 0.6  # p = 0.5 (a few draws find no fitting rectangle)
    # target area in [0.02, 0.33] of the image; rounding h and w moves it by < one row + column
    slack = 2 * s / s**2
    assert frac[hit].min() >= 0.02 - slack and frac[hit].max() <= 0.33 + slack
    assert torch.equal(out == 0, erased.unsqueeze(1).expand_as(out))
    # each erased region is one axis-aligned rectangle: area == rows spanned x columns spanned
    rows, cols = erased.any(2).sum(1), erased.any(1).sum(1)
    assert torch.equal(rows * cols, erased.sum((1, 2)))
    aspect = rows[hit].float() / cols[hit].float()
    assert aspect.min() > 0.2 and aspect.max() < 5.0


def test_seeded_generator_is_deterministic_and_noise():
    images = _uint8_batch()
    kw = dict(noise_std=0.05)
    a = augment_batch(images, 24, generator=torch.Generator().manual_seed(7), **kw)
    b = augment_batch(images, 24, generator=torch.Generator().manual_seed(7), **kw)
    c = augment_batch(images, 24, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    x = torch.full((2, 3, 8, 8), 0.5)
    assert torch.equal(gaussian_noise(x, 0.0), x)
    noisy = gaussian_noise(x, 0.1, torch.Generator().manual_seed(0))
    assert 0.05 < (noisy - x).std() < 0.15 and noisy.min() >= 0 and noisy.max() <= 1
