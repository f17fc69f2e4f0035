"""Batched augmentation: shapes, flip mask, erasing geometry and determinism."""
import pytest
import torch

from featcache.views import PARAMS, Recipe, apply_params, draw_params
from maskfer.augment import IMAGENET_MEAN, IMAGENET_STD, augment_batch, prepare_images, to_float_nchw


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


R = Recipe()  # the official recipe


def test_augment_shapes_resize_and_normalisation():
    x, params = augment_batch(_uint8_batch(), 32, Recipe(erase_p=0.0), generator=torch.Generator().manual_seed(0))
    assert x.shape == (6, 3, 32, 32) and params.shape == (6, len(PARAMS))
    grey = torch.full((1, 16, 16, 3), 128, dtype=torch.uint8)
    out = prepare_images(grey, 16)
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[0, :, 5, 5], expected, atol=1e-6)


def test_flip_rows_match_the_flipped_images():
    images = _uint8_batch(16, 12)
    x, params = augment_batch(images, 12, Recipe(erase_p=0.0, noise_p=0.0), generator=torch.Generator().manual_seed(1))
    flip = params[:, 0] > 0.5
    assert 0 < flip.sum() < 16
    plain = prepare_images(images, 12)
    assert torch.equal(x[flip], plain[flip].flip(-1)) and torch.equal(x[~flip], plain[~flip])


def test_erasing_area_fraction_rate_and_fill():
    s, b = 64, 400
    images = torch.full((b, s, s, 3), 255, dtype=torch.uint8)
    x, params = augment_batch(images, s, Recipe(erase_p=0.5, noise_p=0.0), generator=torch.Generator().manual_seed(2))
    erased = (x.abs() < 1e-6).all(1)  # the ImageNet-mean fill normalises to 0 (torchvision's value=0), white does not
    frac = erased.float().mean(dim=(1, 2))
    hit = frac > 0
    assert 0.4 < hit.float().mean() < 0.6  # p = 0.5 (a few draws find no fitting rectangle)
    assert torch.equal(hit, params[:, 3] > 0)
    # target area in [0.02, 0.25] of the image (the official scale); rounding moves it by < one row + column
    slack = 2 * s / s**2
    assert frac[hit].min() >= 0.02 - slack and frac[hit].max() <= 0.25 + slack
    rows, cols = erased.any(2).sum(1), erased.any(1).sum(1)  # one axis-aligned rectangle each
    assert torch.equal(rows * cols, erased.sum((1, 2)))
    aspect = rows[hit].float() / cols[hit].float()
    assert aspect.min() > 0.2 and aspect.max() < 5.0


def test_seeded_generator_is_deterministic_and_noise_is_on_the_source_pixels():
    images = _uint8_batch()
    a = augment_batch(images, 24, R, generator=torch.Generator().manual_seed(7))
    b = augment_batch(images, 24, R, generator=torch.Generator().manual_seed(7))
    c = augment_batch(images, 24, R, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    grey = torch.full((400, 8, 8, 3), 128, dtype=torch.uint8)
    rows = draw_params(400, Recipe(flip_p=0, erase_p=0, noise_p=0.5), torch.Generator().manual_seed(0))
    noisy = rows[:, 5] >= 0
    assert 0.4 < noisy.float().mean() < 0.6
    out = apply_params(grey, rows, 8, Recipe().noise_std) * 255
    assert torch.equal(out[~noisy], torch.full_like(out[~noisy], 128.0))
    # variance 30 on 0-255 pixels, then rounded down to integers as the official astype(uint8)
    d = out[noisy] - 128
    assert torch.equal(d, d.round()) and 4.5 < d.std() < 6.5 and -1.5 < d.mean() < -0.2
