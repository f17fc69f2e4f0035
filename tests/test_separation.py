"""The vectorised separation kernels against the per-group reference, and their invariants.

Both pooling modes ("official": windows of C // L from channel 0, the remainder never pooled,
divisor C // L; "balanced": the mask groups themselves) are checked against the loops."""
import pytest
import torch
import torch.nn.functional as F

from maskfer.separation import (
    GROUPINGS,
    channel_groups,
    diverse_loss,
    pooled,
    pooled_keep,
    random_drop_mask,
    reference_diverse_loss,
    reference_drop_mask,
    reference_group_bounds,
    reference_pool_bounds,
    reference_separation_logits,
    separation_logits,
    separation_losses,
)

# (C, L, drop): the paper's case, mobilenet-sized, small, tiny; divisible and not.
SHAPES = [(512, 7, 10), (1280, 7, 10), (64, 7, 3), (10, 3, 1), (12, 3, 2), (49, 7, 2), (511, 7, 10)]


@pytest.mark.parametrize("c,l,drop", SHAPES)
def test_groups_cover_every_channel_once(c, l, drop):
    groups = channel_groups(c, l)
    assert sum(groups.sizes) == c
    assert list(groups.sizes[:-1]) == [c // l] * (l - 1)
    real = groups.index[groups.valid]
    assert sorted(real.tolist()) == list(range(c))
    assert torch.bincount(groups.group_of, minlength=l).tolist() == list(groups.sizes)
    # Padding slots repeat a channel of their own group (so they cannot change a group max).
    assert (groups.group_of[groups.index] == torch.arange(l)[:, None]).all()
    assert [(s, s + n) for s, n in zip(groups.starts, groups.sizes)] == reference_group_bounds(c, l)


def test_paper_group_sizes():
    assert channel_groups(512, 7).sizes == (73,) * 6 + (74,)
    assert channel_groups(512, 7).window == 73
    assert reference_pool_bounds(512, 7, "official") == [(73 * k, 73 * (k + 1)) for k in range(7)]  # 511 left out
    assert reference_pool_bounds(512, 7, "balanced")[-1] == (438, 512)


@pytest.mark.parametrize("c,l,drop", SHAPES)
@pytest.mark.parametrize("groups", GROUPINGS)
def test_pooled_windows_are_views_of_the_right_channels(c, l, drop, groups):
    cg = channel_groups(c, l)
    x = torch.arange(c, dtype=torch.float64).expand(3, c)
    windows = pooled(x, cg, groups)
    bounds = reference_pool_bounds(c, l, groups)
    for k, (s, e) in enumerate(bounds):
        assert set(windows[0, k].tolist()) == set(range(s, e))
    if groups == "official" or cg.equal_sizes:
        assert windows.shape == (3, l, c // l) and windows.data_ptr() == x.data_ptr()  # no copy
    # The keep mask in mask-group layout sliced to the windows is the keep of the windows' channels.
    keep = random_drop_mask(3, c, l, drop, generator=torch.Generator().manual_seed(c))
    kg = torch.stack([torch.stack([keep[:, s + (j if j < e - s else 0)] for j in range(cg.max_size)], 1)
                      for s, e in reference_group_bounds(c, l)], 1)  # padding repeats the first channel, as the gather
    assert torch.equal(pooled_keep(kg, cg, groups) * windows, pooled(keep * x, cg, groups))


def test_unknown_grouping_is_refused():
    with pytest.raises(ValueError, match="groups must be one of"):
        separation_losses(torch.randn(2, 14), torch.tensor([0, 1]), 7, groups="paper")
    with pytest.raises(ValueError, match="groups must be one of"):
        diverse_loss(torch.randn(2, 14), 7, groups="")


@pytest.mark.parametrize("c,l,drop", SHAPES)
@pytest.mark.parametrize("per_sample", [True, False])
def test_drop_mask_exact_count_per_group(c, l, drop, per_sample):
    keep = random_drop_mask(5, c, l, drop, per_sample=per_sample, generator=torch.Generator().manual_seed(1))
    assert keep.shape == ((5, c) if per_sample else (1, c))
    assert set(keep.unique().tolist()) <= {0.0, 1.0}
    dropped = torch.zeros(keep.shape[0], l).index_add_(1, channel_groups(c, l).group_of, 1 - keep)
    assert (dropped == drop).all()


def test_per_sample_patterns_differ_per_batch_shared():
    gen = torch.Generator().manual_seed(0)
    keep = random_drop_mask(8, 512, 7, 10, per_sample=True, generator=gen)
    assert len({tuple(row.tolist()) for row in keep}) == 8
    shared = random_drop_mask(8, 512, 7, 10, per_sample=False, generator=gen)
    assert shared.shape == (1, 512)
    x = torch.randn(8, 512)
    assert torch.equal(separation_logits(x, 7, shared), separation_logits(x, 7, shared.expand(8, -1)))


def test_drop_mask_is_seeded_and_uniform():
    a = random_drop_mask(4, 64, 7, 3, generator=torch.Generator().manual_seed(3))
    b = random_drop_mask(4, 64, 7, 3, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # Every channel, padding neighbours included, is dropped at about drop / size of its group.
    many = random_drop_mask(4000, 10, 3, 1, generator=torch.Generator().manual_seed(4))
    rate = 1 - many.mean(0)
    expected = torch.tensor([1 / 3] * 6 + [1 / 4] * 4)
    assert torch.allclose(rate, expected, atol=0.04)


def test_drop_too_large_is_refused():
    with pytest.raises(ValueError, match="drop=9"):
        random_drop_mask(2, 64, 7, 9)


@pytest.mark.parametrize("c,l,drop", SHAPES)
@pytest.mark.parametrize("groups", GROUPINGS)
def test_fast_equals_reference_forward_and_backward(c, l, drop, groups):
    gen = torch.Generator().manual_seed(c + l)
    x = torch.randn(6, c, generator=gen, dtype=torch.float64)
    keep = reference_drop_mask(6, c, l, drop, generator=gen).double()
    y = torch.randint(0, l, (6,), generator=gen)
    for mask in (None, keep):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        fast = separation_logits(xa, l, mask, groups)
        ref = reference_separation_logits(xb, l, mask, groups)
        assert torch.allclose(fast, ref)
        div_fast, div_ref = diverse_loss(xa, l, groups), reference_diverse_loss(xb, l, groups)
        assert torch.allclose(div_fast, div_ref)
        (F.cross_entropy(fast, y) + 5 * div_fast).backward()
        (F.cross_entropy(ref, y) + 5 * div_ref).backward()
        assert torch.allclose(xa.grad, xb.grad)


@pytest.mark.parametrize("c,l,drop", SHAPES)
@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("groups", GROUPINGS)
def test_fused_losses_equal_reference_given_their_mask(c, l, drop, per_sample, groups):
    # Mostly negative features, so dropped zeros often win: checks that padding slots (set to 0
    # in the grouped drop mask) never change a group's max or gradient.
    gen = torch.Generator().manual_seed(c * l)
    x = (torch.randn(8, c, generator=gen, dtype=torch.float64) - 1.5).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = torch.randint(0, l, (8,), generator=gen)
    out = separation_losses(x, y, l, drop=drop, per_sample=per_sample, generator=gen, groups=groups)
    keep = out.keep
    assert keep.shape == ((8, c) if per_sample else (1, c))
    dropped = torch.zeros(keep.shape[0], l, dtype=keep.dtype).index_add_(1, channel_groups(c, l).group_of, 1 - keep)
    assert (dropped == drop).all()
    ref_logits = reference_separation_logits(x_ref, l, keep, groups)
    ref_sep, ref_div = F.cross_entropy(ref_logits, y), reference_diverse_loss(x_ref, l, groups)
    assert torch.allclose(out.sep_logits, ref_logits)
    assert torch.allclose(out.sep_loss, ref_sep) and torch.allclose(out.div_loss, ref_div)
    (1.5 * out.sep_loss + 5 * out.div_loss).backward()
    (1.5 * ref_sep + 5 * ref_div).backward()
    assert torch.allclose(x.grad, x_ref.grad)
    # The same mask given as keep= reproduces the draw exactly, training or not.
    for training in (True, False):
        again = separation_losses(x.detach(), y, l, drop=drop, training=training, groups=groups, keep=keep)
        assert torch.equal(again.sep_logits, out.sep_logits) and torch.equal(again.keep, keep)


@pytest.mark.parametrize("groups", GROUPINGS)
def test_separation_losses_uses_drop_only_in_training(groups):
    x, y = torch.randn(4, 512), torch.randint(0, 7, (4,))
    train = separation_losses(x, y, 7, drop=10, training=True, generator=torch.Generator().manual_seed(0),
                              groups=groups)
    assert train.keep is not None and train.keep.shape == (4, 512)
    assert torch.allclose(train.sep_logits, reference_separation_logits(x, 7, train.keep, groups))
    evaluation = separation_losses(x, y, 7, drop=10, training=False, groups=groups)
    assert evaluation.keep is None
    assert torch.equal(evaluation.sep_logits, reference_separation_logits(x, 7, None, groups))


def test_given_keep_shape_is_checked():
    x, y = torch.randn(4, 512), torch.randint(0, 7, (4,))
    with pytest.raises(ValueError, match="keep must be"):
        separation_losses(x, y, 7, keep=torch.ones(3, 512))
    with pytest.raises(ValueError, match="keep must be"):
        separation_losses(x, y, 7, keep=torch.ones(4, 511))


def test_dropped_zero_can_win_like_the_original():
    # Documented behaviour of multiplying by a 0/1 mask: an all-negative group's max becomes 0.
    x = -torch.ones(1, 10)
    keep = torch.ones(1, 10)
    keep[0, 0] = 0
    for groups in GROUPINGS:
        assert separation_logits(x, 3, keep, groups)[0].tolist() == [0.0, -1.0, -1.0]
    # The never-pooled remainder channel: dropping it changes nothing when official, but does when balanced.
    keep = torch.ones(1, 10)
    keep[0, 9] = 0
    assert separation_logits(x, 3, keep, "official")[0].tolist() == [-1.0, -1.0, -1.0]
    assert separation_logits(x, 3, keep, "balanced")[0].tolist() == [-1.0, -1.0, 0.0]


def test_diverse_loss_hand_made_values():
    # 512/7: groups of 73 (x6) and 74. Group max m everywhere -> 1 - mean(m / g_k).
    for groups in GROUPINGS:
        x = torch.zeros(2, 512)
        assert diverse_loss(x, 7, groups).item() == pytest.approx(1.0)
        x[:, 0] = 73.0  # group 0 reaches its size: contributes 1, others 0
        assert diverse_loss(x, 7, groups).item() == pytest.approx(1 - 1 / 7)
    full = torch.cat([torch.full((1, 438), 73.0), torch.full((1, 74), 74.0)], dim=1)
    assert diverse_loss(full, 7, "balanced").item() == pytest.approx(0.0, abs=1e-6)
    # official: every window is divided by 73, so the last window (max 74) gives 74/73
    assert diverse_loss(full, 7, "official").item() == pytest.approx(1 - (6 + 74 / 73) / 7, abs=1e-6)
    # official: channel 511 is in no window
    x = torch.zeros(1, 512)
    x[0, 511] = 1000.0
    assert diverse_loss(x, 7, "official").item() == 1.0
    assert diverse_loss(x, 7, "balanced").item() == pytest.approx(1 - 1000 / 74 / 7)
    # 10/3: sizes 3, 3, 4; maxima 1, 2, 3 -> 1 - (1/3 + 2/3 + 3/4) / 3
    x = torch.tensor([[1.0, 0, 0, 0, 2, 0, 0, 0, 0, 3]])
    assert diverse_loss(x, 3, "balanced").item() == pytest.approx(1 - (1 / 3 + 2 / 3 + 3 / 4) / 3)
    # official 10/3: windows 0-2, 3-5, 6-8 of width 3; channel 9 is never pooled -> maxima 1, 2, 0
    assert diverse_loss(x, 3, "official").item() == pytest.approx(1 - (1 / 3 + 2 / 3 + 0) / 3)


def test_diverse_loss_bounds_for_sigmoid_masked_features():
    gen = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 5.0):
        feats = scale * torch.randn(16, 512, generator=gen).abs()
        masked = torch.sigmoid(torch.randn(16, 512, generator=gen)) * feats
        value = diverse_loss(masked, 7).item()
        assert 0.0 <= value < 1.0
    # Features in [lo, hi] bound the loss by [1 - hi/g_min, 1 - lo/g_max].
    x = torch.empty(8, 512).uniform_(-2.0, 3.0, generator=gen)
    assert 1 - 3.0 / 73 <= diverse_loss(x, 7, "balanced").item() <= 1 + 2.0 / 74
    assert 1 - 3.0 / 73 <= diverse_loss(x, 7, "official").item() <= 1 + 2.0 / 73


def test_groups_refuse_fewer_channels_than_classes():
    with pytest.raises(ValueError):
        channel_groups(5, 7)
