"""CAFE's loss against an independent reference of the published code, and tests that catch a wrong recipe.

The reference below is written from the description of ``ours_CAFE.py`` (``Mask(nb_batch)`` and
``supervisor(x, targets, cnum=73)``), with plain torch ops on (B, 512) tensors and no maskfer code:

* ONE 0/1 pattern for the whole batch, built group by group from a seeded ``random.Random``
  shuffle of [1] * 63 + [0] * 10 (the 7th group [1] * 64 + [0] * 10): mask groups 6 x 73 + 74,
  so channel 511 can be dropped;
* ``F.max_pool1d`` with window = stride = 73 over the channels: 7 windows on channels 0..510,
  channel 511 is never pooled;
* diverse ``loss_2 = 1 - mean(window max) / 73`` on the UN-dropped features, separation
  ``loss_1 = CE(window max of x * mask, y)``; total ``CE + 5 * loss_2 + 1.5 * loss_1``.

maskfer's ``cafe_loss(groups="official", per_sample_drop=False, keep=<that mask>)`` and
``stacked_cafe_loss`` with 1 and 3 stacked models must equal it (float64, to 1e-6).
"""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from maskfer.config import TrainConfig
from maskfer.losses import LossSpec, stacked_cafe_loss
from maskfer.model import cafe_loss
from maskfer.separation import GROUPINGS, random_drop_mask

C, L, CNUM, DROP = 512, 7, 73, 10
TOL = dict(rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ the independent reference
def official_mask(rng: random.Random) -> torch.Tensor:
    """(1, 512) float64: per group, a shuffled list of ones and 10 zeros (63 + 10, the 7th 64 + 10)."""
    pattern = []
    for group in range(7):
        ones = 64 if group == 6 else 63
        part = [1.0] * ones + [0.0] * 10
        rng.shuffle(part)
        pattern.extend(part)
    return torch.tensor(pattern, dtype=torch.float64).unsqueeze(0)


def official_parts(logits, x, y, mask):
    """(total, ce, loss_1 = separation CE, loss_2 = diverse) of the published recipe."""
    windows = F.max_pool1d(x.unsqueeze(1), CNUM, CNUM).squeeze(1)              # (B, 7), channels 0..510
    loss_2 = 1.0 - windows.mean() / CNUM
    dropped = F.max_pool1d((x * mask).unsqueeze(1), CNUM, CNUM).squeeze(1)     # (B, 7)
    loss_1 = F.cross_entropy(dropped, y)
    ce = F.cross_entropy(logits, y)
    return ce + 5 * loss_2 + 1.5 * loss_1, ce, loss_1, loss_2


def mask_seed(channel_511_dropped: bool) -> int:
    """The first ``random.Random`` seed whose pattern drops (or keeps) channel 511."""
    return next(s for s in range(1000) if (official_mask(random.Random(s))[0, 511] == 0) == channel_511_dropped)


def make_inputs(seed: int, b: int = 8):
    """float64 logits (B, 7), masked features (B, 512), labels; rows built so that drop, the divisor
    and the never-pooled channel 511 all change the loss when handled wrongly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, C, generator=g, dtype=torch.float64)
    x[0, 146:219] = -x[0, 146:219].abs() - 0.1   # window 2 all negative: a dropped 0 is its max
    x[1] = -x[1].abs() - 0.1                     # every channel negative
    x[2, 438:511] = -x[2, 438:511].abs() - 0.1   # last window negative, channel 511 huge: never pooled
    x[2, 511] = 50.0
    x[3, 511] = 20.0                             # channel 511 the largest of its row
    x[4, 438:512] = -x[4, 438:512].abs() - 0.1   # last mask group all negative, 511 included
    logits = torch.randn(b, L, generator=g, dtype=torch.float64)
    y = torch.randint(0, L, (b,), generator=g)
    return logits, x, y


def test_the_reference_mask_is_the_official_pattern():
    for s in (mask_seed(True), mask_seed(False), 7):
        m = official_mask(random.Random(s))[0]
        zeros = [int((m[a:e] == 0).sum()) for a, e in [(73 * k, 73 * (k + 1)) for k in range(6)] + [(438, 512)]]
        assert m.shape == (512,) and zeros == [10] * 7
    assert official_mask(random.Random(mask_seed(True)))[0, 511] == 0


def _batch_cfgs(k: int) -> list[TrainConfig]:
    cfgs = [TrainConfig(train="x", drop_mode="batch", seed=i) for i in range(k)]
    for c in cfgs:
        c.groups = "official"   # the shared setting (also the default of a config without the field)
    return cfgs


# ------------------------------------------------------------------ equality with the reference
@pytest.mark.parametrize("dropped_511", [True, False])
@pytest.mark.parametrize("rows", ["one", "batch"])
def test_cafe_loss_equals_the_official_reference(dropped_511, rows):
    logits, x, y = make_inputs(0)
    mask = official_mask(random.Random(mask_seed(dropped_511)))
    keep = mask if rows == "one" else mask.expand(x.shape[0], -1)   # Mask(nb_batch) repeats the row B times
    lg, xa = logits.clone().requires_grad_(), x.clone().requires_grad_()
    total, parts = cafe_loss({"logits": lg, "masked": xa}, y, lam=1.5, beta=5.0, drop=DROP, per_sample_drop=False,
                             groups="official", keep=keep)
    lr, xr = logits.clone().requires_grad_(), x.clone().requires_grad_()
    ref, ce, loss_1, loss_2 = official_parts(lr, xr, y, mask)
    torch.testing.assert_close(total, ref, **TOL)
    for key, value in (("ce", ce), ("sep", loss_1), ("div", loss_2), ("total", ref)):
        torch.testing.assert_close(parts[key], value.detach(), **TOL)
    total.backward()
    ref.backward()
    torch.testing.assert_close(xa.grad, xr.grad, **TOL)
    torch.testing.assert_close(lg.grad, lr.grad, **TOL)
    assert xa.grad[:, 511].abs().max() == 0   # channel 511 never reaches the loss
    # The defaults are the paper's recipe: lam 1.5, beta 5, drop 10, official groups.
    assert torch.equal(cafe_loss({"logits": logits, "masked": x}, y, per_sample_drop=False, keep=keep)[0],
                       total.detach())


@pytest.mark.parametrize("dropped_511", [True, False])
def test_one_stacked_model_equals_the_official_reference(dropped_511):
    logits, x, y = make_inputs(1)
    mask = official_mask(random.Random(mask_seed(dropped_511)))
    spec = LossSpec.from_configs(_batch_cfgs(1))
    assert (spec.lam, spec.beta, spec.drops, spec.sample, spec.groups) == ([1.5], [5.0], [10], [False], "official")
    lg, xa = logits.clone().unsqueeze(1).requires_grad_(), x.clone().unsqueeze(1).requires_grad_()
    totals, parts = stacked_cafe_loss({"logits": lg, "masked": xa}, y, spec, keep=mask.unsqueeze(1))
    lr, xr = logits.clone().requires_grad_(), x.clone().requires_grad_()
    ref, ce, loss_1, loss_2 = official_parts(lr, xr, y, mask)
    torch.testing.assert_close(totals[0], ref, **TOL)
    for key, value in (("ce", ce), ("sep", loss_1), ("div", loss_2)):
        torch.testing.assert_close(parts[key][0], value.detach(), **TOL)
    totals.sum().backward()
    ref.backward()
    torch.testing.assert_close(xa.grad[:, 0], xr.grad, **TOL)
    torch.testing.assert_close(lg.grad[:, 0], lr.grad, **TOL)


def test_three_stacked_models_equal_the_official_reference():
    inputs = [make_inputs(s) for s in (2, 3, 4)]
    y = inputs[0][2]
    logits = torch.stack([i[0] for i in inputs], 1)
    x = torch.stack([i[1] for i in inputs], 1)
    masks = [official_mask(random.Random(s)) for s in (mask_seed(True), mask_seed(False), 11)]
    keep = torch.stack(masks, 1)                                                     # (1, 3, 512)
    lg, xa = logits.clone().requires_grad_(), x.clone().requires_grad_()
    totals, parts = stacked_cafe_loss({"logits": lg, "masked": xa}, y, LossSpec.from_configs(_batch_cfgs(3)), keep=keep)
    totals.sum().backward()
    for k in range(3):
        lr, xr = logits[:, k].clone().requires_grad_(), x[:, k].clone().requires_grad_()
        ref, ce, loss_1, loss_2 = official_parts(lr, xr, y, masks[k])
        torch.testing.assert_close(totals[k], ref.detach(), **TOL)
        for key, value in (("ce", ce), ("sep", loss_1), ("div", loss_2)):
            torch.testing.assert_close(parts[key][k], value.detach(), **TOL)
        ref.backward()
        torch.testing.assert_close(xa.grad[:, k], xr.grad, **TOL)
        torch.testing.assert_close(lg.grad[:, k], lr.grad, **TOL)


def test_the_drawn_batch_mask_is_official_and_gives_the_reference_loss():
    logits, x, y = make_inputs(5)
    gen = lambda: torch.Generator().manual_seed(42)  # noqa: E731
    mask = random_drop_mask(x.shape[0], C, L, DROP, per_sample=False, generator=gen(), dtype=torch.float64)
    assert mask.shape == (1, C)
    assert [int((mask[0, a:e] == 0).sum()) for a, e in [(73 * k, 73 * (k + 1)) for k in range(6)] + [(438, 512)]] \
        == [10] * 7
    ref = official_parts(logits, x, y, mask)[0]
    total, _ = cafe_loss({"logits": logits, "masked": x}, y, per_sample_drop=False, generator=gen())
    torch.testing.assert_close(total, ref, **TOL)
    totals, _ = stacked_cafe_loss({"logits": logits.unsqueeze(1), "masked": x.unsqueeze(1)}, y,
                                  LossSpec.from_configs(_batch_cfgs(1)), generator=gen())
    torch.testing.assert_close(totals[0], ref, **TOL)
    # Channel 511 is a member of the last mask group: drawn patterns drop it at rate 10/74.
    rate = 1 - random_drop_mask(4000, C, L, DROP, generator=torch.Generator().manual_seed(0))[:, 511].mean()
    assert abs(float(rate) - 10 / 74) < 5 * math.sqrt(10 / 74 * 64 / 74 / 4000)


# ------------------------------------------------------------------ tests that catch a wrong recipe
def _spec(modes: list[str], groups: str = "official") -> LossSpec:
    cfgs = [TrainConfig(train="x", drop_mode=m, seed=i) for i, m in enumerate(modes)]
    for c in cfgs:
        c.groups = groups
    return LossSpec.from_configs(cfgs)


@pytest.mark.parametrize("groups", GROUPINGS)
@pytest.mark.parametrize("mode", ["sample", "batch"])
def test_training_applies_the_drop(groups, mode):
    """All features negative: every pooling window holds a dropped channel's 0, so with the drop the
    separation logits are all 0 and the separation CE is exactly log 7; without it, it is not."""
    b = 6
    g = torch.Generator().manual_seed(0)
    x = -torch.rand(b, C, generator=g, dtype=torch.float64) - 0.1
    logits, y = torch.randn(b, L, generator=g, dtype=torch.float64), torch.arange(b) % L
    undropped = F.cross_entropy(F.max_pool1d(x.unsqueeze(1), CNUM, CNUM).squeeze(1), y) if groups == "official" \
        else None
    for seed in range(3):
        _, parts = cafe_loss({"logits": logits, "masked": x}, y, per_sample_drop=mode == "sample", groups=groups,
                             generator=torch.Generator().manual_seed(seed), training=True)
        assert parts["sep"].item() == pytest.approx(math.log(L), abs=1e-12)
        _, sparts = stacked_cafe_loss({"logits": logits.unsqueeze(1).expand(b, 2, L),
                                       "masked": x.unsqueeze(1).expand(b, 2, C)}, y, _spec([mode, "sample"], groups),
                                      generator=torch.Generator().manual_seed(seed), training=True)
        torch.testing.assert_close(sparts["sep"], torch.full((2,), math.log(L), dtype=torch.float64))
    _, parts = cafe_loss({"logits": logits, "masked": x}, y, groups=groups, training=False)
    assert abs(parts["sep"].item() - math.log(L)) > 1e-3  # the true (negative) maxima: no 0 wins
    if undropped is not None:
        torch.testing.assert_close(parts["sep"], undropped)


@pytest.mark.parametrize("groups", GROUPINGS)
def test_the_diverse_loss_sees_the_undropped_features(groups):
    b = 6
    g = torch.Generator().manual_seed(1)
    x = -torch.rand(b, C, generator=g, dtype=torch.float64) - 0.1
    logits, y = torch.randn(b, L, generator=g, dtype=torch.float64), torch.arange(b) % L
    windows = F.max_pool1d(x.unsqueeze(1), CNUM, CNUM).squeeze(1)
    expected = 1 - windows.mean() / CNUM if groups == "official" else None
    for mode in ("sample", "batch"):
        _, parts = cafe_loss({"logits": logits, "masked": x}, y, per_sample_drop=mode == "sample", groups=groups,
                             generator=torch.Generator().manual_seed(3))
        _, eval_parts = cafe_loss({"logits": logits, "masked": x}, y, groups=groups, training=False)
        assert parts["div"].item() > 1.0  # negative maxima; on dropped features every max would be 0 -> exactly 1
        torch.testing.assert_close(parts["div"], eval_parts["div"], rtol=0, atol=0)
        if expected is not None:
            torch.testing.assert_close(parts["div"], expected)
        _, sparts = stacked_cafe_loss({"logits": logits.unsqueeze(1), "masked": x.unsqueeze(1)}, y,
                                      _spec([mode], groups), generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(sparts["div"][0], eval_parts["div"], rtol=0, atol=0)


def _two_valued_inputs(b: int):
    """All channels -1 but channel 0 (= 5), every label 0: a sample's separation CE is
    ``a = CE([5, 0, .., 0], 0)`` when channel 0 is kept and ``log 7`` when it is dropped."""
    x = -torch.ones(b, C, dtype=torch.float64)
    x[:, 0] = 5.0
    kept = F.cross_entropy(torch.tensor([[5.0] + [0.0] * (L - 1)], dtype=torch.float64), torch.tensor([0])).item()
    return x, torch.zeros(b, dtype=torch.long), kept, math.log(L)


@pytest.mark.parametrize("groups", GROUPINGS)
def test_drop_mode_batch_is_one_pattern_and_sample_one_per_sample(groups):
    """One pattern for the batch: every sample has the same separation CE, so the mean is one of the two
    values. One pattern per sample: channel 0 is dropped in about 10/73 of the samples, so the mean lies
    strictly between (all 256 samples alike has probability < 1e-16)."""
    b = 256
    x, y, a, bad = _two_valued_inputs(b)
    logits = torch.zeros(b, L, dtype=torch.float64)
    p = DROP / CNUM
    for seed in range(4):
        gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
        _, batch = cafe_loss({"logits": logits, "masked": x}, y, per_sample_drop=False, groups=groups, generator=gen())
        assert min(abs(batch["sep"].item() - a), abs(batch["sep"].item() - bad)) < 1e-12
        _, sample = cafe_loss({"logits": logits, "masked": x}, y, per_sample_drop=True, groups=groups, generator=gen())
        frac = (sample["sep"].item() - a) / (bad - a)  # the fraction of samples whose channel 0 was dropped
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / b)
        # A group mixing both modes (and a group of batch models only): each model follows its own mode.
        for modes in (["batch", "sample", "batch"], ["batch", "batch"], ["sample"]):
            k = len(modes)
            _, parts = stacked_cafe_loss({"logits": logits.unsqueeze(1).expand(b, k, L),
                                          "masked": x.unsqueeze(1).expand(b, k, C)}, y, _spec(modes, groups),
                                         generator=gen())
            for j, mode in enumerate(modes):
                v = parts["sep"][j].item()
                if mode == "batch":
                    assert min(abs(v - a), abs(v - bad)) < 1e-12, (modes, j)
                else:
                    assert abs((v - a) / (bad - a) - p) < 5 * math.sqrt(p * (1 - p) / b), (modes, j)


def test_official_windows_never_pool_the_last_channel_but_balanced_groups_do():
    logits, x, y = make_inputs(6)
    mask = official_mask(random.Random(mask_seed(False)))  # channel 511 kept
    moved = x.clone()
    moved[:, 511] = 1e3
    for fn in (lambda f: cafe_loss({"logits": logits, "masked": f}, y, groups="official", keep=mask)[1],
               lambda f: {k: v[0] for k, v in stacked_cafe_loss(
                   {"logits": logits.unsqueeze(1), "masked": f.unsqueeze(1)}, y, _spec(["batch"]),
                   keep=mask.unsqueeze(1))[1].items()}):
        base, big = fn(x), fn(moved)
        assert all(torch.equal(base[k], big[k]) for k in ("sep", "div", "total"))
    base = cafe_loss({"logits": logits, "masked": x}, y, groups="balanced", keep=mask)[1]
    big = cafe_loss({"logits": logits, "masked": moved}, y, groups="balanced", keep=mask)[1]
    assert big["div"] < base["div"] - 1 and not torch.equal(big["sep"], base["sep"])
