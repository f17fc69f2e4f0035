"""featcache.views: the augmentation as data. Parameter rows are a pure function of (seed, image id, view),
their rates follow the recipe, and apply_params puts each effect where the row says at any size."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from featcache.views import (IMAGENET_MEAN, OFFICIAL, PARAMS, Recipe, apply_params, draw_params, hash_normal,
                             image_keys, view_params)

IDS = [f"train/{c}/img_{i:05d}.png" for c in ("happy", "sad", "angry") for i in range(40)]
NO_EFFECT = [0.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # no flip, no erase, no noise


def rows(*r) -> torch.Tensor:
    return torch.tensor(r, dtype=torch.float32).view(-1, len(PARAMS))


def test_rows_are_deterministic_and_depend_on_seed_id_and_view():
    a = view_params(image_keys(IDS), range(0, 4), OFFICIAL, seed=0)
    assert a.shape == (len(IDS), 4, len(PARAMS)) and a.dtype == torch.float32
    assert torch.equal(a, view_params(image_keys(list(IDS)), range(0, 4), OFFICIAL, seed=0))
    other_seed = view_params(image_keys(IDS), range(0, 4), OFFICIAL, seed=1)
    assert (a != other_seed).any(dim=2).float().mean() > 0.9        # another seed draws other rows
    assert (a[:, 0] != a[:, 1]).any(dim=1).float().mean() > 0.9    # views of one image differ
    assert (a[0] != a[1]).any(dim=1).all()                          # images differ


def test_a_subset_in_another_order_regenerates_the_same_rows():
    full = view_params(image_keys(IDS), range(0, 6), OFFICIAL, seed=3)
    pick = [77, 5, 5, 119, 0]                                       # any order, repeats
    sub = view_params(image_keys([IDS[i] for i in pick]), range(2, 5), OFFICIAL, seed=3)
    assert torch.equal(sub, full[pick][:, 2:5])
    one = view_params(image_keys([IDS[42]]), range(5, 6), OFFICIAL, seed=3)   # one image, one later view
    assert torch.equal(one[0, 0], full[42, 5])


def test_rates_follow_the_recipe():
    ids = [f"x/{i}.jpg" for i in range(25000)]
    p = view_params(image_keys(ids), range(0, 2), OFFICIAL, seed=0).view(-1, len(PARAMS)).double()
    flip, top, left, h, w, seed = p.unbind(1)
    erased = h > 0
    assert abs(flip.mean().item() - 0.5) < 0.01
    assert abs(erased.double().mean().item() - 0.5) < 0.01
    assert abs((seed >= 0).double().mean().item() - 0.5) < 0.01
    area = (h * w)[erased]
    assert abs(area.mean().item() - 0.135) < 0.002                  # uniform scale 0.02-0.25: mean 0.135
    assert area.min() >= 0.02 - 1e-6 and area.max() <= 0.25 + 1e-6
    ratio = (h / w)[erased]
    assert ratio.min() >= 0.3 - 1e-4 and ratio.max() <= 3.3 + 1e-3
    assert ((top + h)[erased] <= 1 + 1e-6).all() and ((left + w)[erased] <= 1 + 1e-6).all()
    assert (top[~erased] == 0).all() and (w[~erased] == 0).all()
    # another recipe: the rates move with it
    q = view_params(image_keys(ids), range(0, 1), Recipe(flip_p=0.2, erase_p=0.0, noise_p=0.9), 0).view(-1, 6)
    assert abs(q[:, 0].mean().item() - 0.2) < 0.015 and (q[:, 3] == 0).all()
    assert abs((q[:, 5] >= 0).float().mean().item() - 0.9) < 0.015
    # the training batches draw from the same rules
    d = draw_params(20000, OFFICIAL, torch.Generator().manual_seed(0))
    assert abs(d[:, 0].mean().item() - 0.5) < 0.015 and abs((d[:, 3] > 0).float().mean().item() - 0.5) < 0.015


def test_noise_field_is_the_same_for_the_same_seed_whatever_the_batch():
    rng = np.random.default_rng(0)
    imgs = torch.from_numpy(rng.integers(40, 216, size=(3, 20, 20, 3), dtype=np.uint8))
    noisy = rows([0, 0, 0, 0, 0, 12345.0])
    alone = apply_params(imgs[:1], noisy, 20, OFFICIAL.noise_std)
    batch = apply_params(imgs[[2, 0, 1]], torch.cat([rows([0, 0, 0, 0, 0, 7.0]), noisy, rows(NO_EFFECT)]), 20,
                         OFFICIAL.noise_std)
    assert torch.equal(alone[0], batch[1])
    clean = apply_params(imgs[:1], rows(NO_EFFECT), 20, OFFICIAL.noise_std)
    delta = (alone - clean) * 255.0   # at the source size: the noise, floored to uint8 steps
    assert abs(delta.std().item() - math.sqrt(30.0)) < 0.4 and abs(delta.mean().item() + 0.5) < 0.3
    assert torch.equal(clean[0], imgs[0].permute(2, 0, 1).float() / 255)  # no effect: the image itself
    other = apply_params(imgs[:1], rows([0, 0, 0, 0, 0, 12346.0]), 20, OFFICIAL.noise_std)
    assert not torch.equal(other, alone)
    z = hash_normal(torch.tensor([5, 9, 5]), (3, 4, 4))
    assert torch.equal(z[0], z[2]) and torch.equal(z[0], hash_normal(torch.tensor([5]), (3, 4, 4))[0])
    assert not torch.equal(z[0], z[1])


@pytest.mark.parametrize("size", [32, 64])
def test_erase_box_lands_where_the_relative_coords_say(size):
    white = torch.full((1, 10, 10, 3), 255, dtype=torch.uint8)
    out = apply_params(white, rows([0, 0.25, 0.5, 0.25, 0.375, -1]), size, OFFICIAL.noise_std)[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1)
    t, l, h, w = size // 4, size // 2, size // 4, size * 3 // 8
    box = torch.zeros(size, size, dtype=torch.bool)
    box[t:t + h, l:l + w] = True
    assert torch.allclose(out[:, box], mean.expand(3, int(box.sum())))
    assert torch.equal(out[:, ~box], torch.ones(3, int((~box).sum())))


def test_flip_mirrors_after_the_resize_and_before_the_erase():
    img = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    img[:, :, :2] = 255                                              # a white bar on the left
    plain = apply_params(img, rows(NO_EFFECT), 16, 0.0)[0]
    flipped = apply_params(img, rows([1, 0, 0, 0, 0, -1]), 16, 0.0)[0]
    assert torch.equal(flipped, plain.flip(-1)) and flipped[:, :, -1].min() == 1 and flipped[:, :, 0].max() == 0
    erased = apply_params(img, rows([1, 0, 0, 1, 0.25, -1]), 16, 0.0)[0]   # erase the LEFT quarter after flipping
    assert torch.allclose(erased[:, :, :4], torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, 16, 4))
    assert torch.equal(erased[:, :, 4:], flipped[:, :, 4:])
