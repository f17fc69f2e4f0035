"""Channel separation, channel drop and the diverse loss of CAFE, as batched tensor kernels.

CAFE (ECCV 2024) borrows the Mutual-Channel loss (MC-loss, Chang et al. 2020) and applies it
to the masked CLIP feature vector ``x = sigmoid(M) * F`` of shape (B, C):

* **Groups.** The C channels are split into L contiguous groups, one per class. The base
  size is ``g = C // L``; the LAST group also takes the remainder (512, 7 -> 6 x 73 + 74).
  Every channel belongs to exactly one group. (The original code max-pools with a fixed
  window of 73 and so never looks at channel 511; we do.)
* **Channel drop.** During training, ``drop`` channels of every group are chosen at random
  and multiplied by 0, exactly as the original multiplies by a 0/1 mask. A zeroed channel
  is *not* excluded from the max: if all kept channels of a group are negative, the dropped
  channel's 0 wins. That is the original's behaviour, kept on purpose. By default every
  sample draws its own pattern; ``per_sample=False`` shares one pattern across the batch
  (what the original does).
* **Separation logits.** The max over each group's (dropped) channels -> (B, L); the
  separation loss is ``CE(sep_logits, y)``.
* **Diverse loss** (see :func:`diverse_loss` for the exact formula and why).

Implementation: a precomputed (L, g_max) gather index turns the unequal groups into a padded
(B, L, g_max) tensor. Padded slots repeat a channel *of the same group*, so they can never
change a group's max and need no -inf fill; ``valid`` marks the real slots. The drop mask is
drawn directly in that layout: uniform scores, padding scores pushed out of reach, and
``topk`` picks each group's ``drop`` slots. When L divides C the index is skipped and a free
``view`` is used instead. There are no Python loops over samples, channels or classes, and
the device comes from the input.

The ``reference_*`` functions at the bottom loop over groups with plain slicing. They exist
only so tests and ``benchmarks/separation_kernels.py`` can check the fast kernels against
an obviously correct version.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "ChannelGroups",
    "channel_groups",
    "random_drop_mask",
    "separation_logits",
    "diverse_loss",
    "separation_losses",
    "SeparationLosses",
    "reference_group_bounds",
    "reference_drop_mask",
    "reference_separation_logits",
    "reference_diverse_loss",
]


@dataclass(frozen=True)
class ChannelGroups:
    """How C channels are split into L contiguous groups, with gather tensors for the kernels.

    ``sizes[k]`` is group k's channel count, ``starts[k]`` its first channel. ``index`` (L, g_max)
    lists each group's channels, padded by repeating the group's first channel; ``valid``
    (L, g_max) is False on the padding. ``group_of`` (C,) gives each channel's group.
    """

    num_channels: int
    num_classes: int
    sizes: tuple[int, ...]
    starts: tuple[int, ...]
    index: torch.Tensor
    valid: torch.Tensor
    group_of: torch.Tensor
    _device_cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def max_size(self) -> int:
        return max(self.sizes)

    @property
    def equal_sizes(self) -> bool:
        return len(set(self.sizes)) == 1

    def tensors_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flat index, valid, sizes as float) on ``device``; cached so a step copies nothing."""
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = (
                self.index.reshape(-1).to(device),
                self.valid.to(device),
                torch.tensor(self.sizes, dtype=torch.float32, device=device),
            )
        return self._device_cache[key]


@functools.lru_cache(maxsize=64)
def channel_groups(num_channels: int, num_classes: int) -> ChannelGroups:
    """Split ``num_channels`` into ``num_classes`` contiguous groups; the last takes the remainder."""
    if num_classes < 1 or num_channels < num_classes:
        raise ValueError(
            f"cannot split {num_channels} channels into {num_classes} groups: "
            "need at least one channel per class"
        )
    base = num_channels // num_classes
    sizes = [base] * (num_classes - 1) + [num_channels - base * (num_classes - 1)]
    starts = [k * base for k in range(num_classes)]
    g_max = max(sizes)
    slot = torch.arange(g_max)
    size_t = torch.tensor(sizes)
    start_t = torch.tensor(starts)
    valid = slot[None, :] < size_t[:, None]
    # Padding repeats the group's own first channel: a duplicate cannot change the group max.
    index = torch.where(valid, start_t[:, None] + slot[None, :], start_t[:, None])
    group_of = torch.repeat_interleave(torch.arange(num_classes), size_t)
    return ChannelGroups(num_channels, num_classes, tuple(sizes), tuple(starts), index, valid, group_of)


def _grouped(x: torch.Tensor, groups: ChannelGroups) -> torch.Tensor:
    """(B, C) -> (B, L, g_max); a free view when the groups are equal, else one gather."""
    b = x.shape[0]
    if groups.equal_sizes:
        return x.view(b, groups.num_classes, groups.max_size)
    flat_index, _, _ = groups.tensors_on(x.device)
    return x.index_select(1, flat_index).view(b, groups.num_classes, groups.max_size)


def _check_features(x: torch.Tensor, num_classes: int) -> ChannelGroups:
    if x.dim() != 2:
        raise ValueError(f"expected masked features of shape (B, C), got {tuple(x.shape)}")
    return channel_groups(x.shape[1], num_classes)


def _check_drop(drop: int, groups: ChannelGroups) -> None:
    if drop < 0 or drop >= min(groups.sizes):
        raise ValueError(
            f"drop={drop} must be in [0, {min(groups.sizes) - 1}] for {groups.num_channels} channels in "
            f"{groups.num_classes} groups (smallest group has {min(groups.sizes)} channels, at least one must stay)"
        )


def _grouped_keep(rows: int, groups: ChannelGroups, drop: int, generator, device, dtype) -> torch.Tensor:
    """(rows, L, g_max) 0/1: exactly ``drop`` zeros among each group's real slots, and 0 on padding.

    Each group's zeros are a uniformly random subset: the ``drop`` smallest of i.i.d. uniform
    scores (topk indices, so the count is exact even if two scores tie); padding scores are
    set above every uniform so padding is never picked.
    Padding slots get 0 rather than 1: they duplicate a real channel, which may itself be dropped,
    and with drop >= 1 every group already holds a 0 from a dropped channel, so a padding 0
    can never change the group max.
    """
    _, valid, _ = groups.tensors_on(device)
    scores = torch.rand(rows, groups.num_classes, groups.max_size, generator=generator, device=device)
    if not groups.equal_sizes:
        scores = scores.masked_fill(~valid, 2.0)
    slots = scores.topk(drop, dim=2, largest=False, sorted=False).indices
    keep = valid.to(dtype).expand(rows, -1, -1).clone()
    return keep.scatter_(2, slots, 0.0)


def _channel_keep(keep_grouped: torch.Tensor, groups: ChannelGroups) -> torch.Tensor:
    """(rows, L, g_max) -> (rows, C): real slots listed row-major are exactly channels 0..C-1."""
    if groups.equal_sizes:
        return keep_grouped.reshape(keep_grouped.shape[0], groups.num_channels)
    _, valid, _ = groups.tensors_on(keep_grouped.device)
    return keep_grouped[:, valid]


def random_drop_mask(
    batch_size: int,
    num_channels: int,
    num_classes: int,
    drop: int,
    per_sample: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A 0/1 keep mask over channels with exactly ``drop`` zeros in every group, uniformly placed.

    Shape (batch_size, C) when ``per_sample`` (each sample its own pattern), else (1, C)
    (one pattern broadcast over the batch). ``generator`` must live on ``device``.
    """
    groups = channel_groups(num_channels, num_classes)
    _check_drop(drop, groups)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    rows = batch_size if per_sample else 1
    if drop == 0:
        return torch.ones(rows, num_channels, dtype=dtype, device=device)
    return _channel_keep(_grouped_keep(rows, groups, drop, generator, device, dtype), groups)


def separation_logits(x: torch.Tensor, num_classes: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Max over each group's channels of ``x * keep`` -> (B, L). ``keep`` (B or 1, C) is a 0/1 mask."""
    groups = _check_features(x, num_classes)
    if keep is not None:
        x = x * keep
    return _grouped(x, groups).amax(dim=2)


def _diverse_from_grouped(grouped: torch.Tensor, groups: ChannelGroups) -> torch.Tensor:
    _, _, sizes = groups.tensors_on(grouped.device)
    return 1.0 - (grouped.amax(dim=2) / sizes.to(grouped.dtype)).mean()


def diverse_loss(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """CAFE's channel-diverse loss on masked features ``x`` (B, C), never with channel drop.

    Formula (g_k = size of group k, G_k its channels)::

        div = 1 - mean_{b, k} ( max_{c in G_k} x[b, c] / g_k )

    Why this form: it is CAFE's published code, ``1 - mean(sum(CCMP(x), spatial)) / cnum`` with
    cnum = 73. That is MC-loss's diversity term, in which a softmax over each channel's
    *spatial* positions precedes the cross-channel max. CAFE's features are vectors, so there
    is one spatial position; that softmax would be identically 1 and the original has none.
    A softmax across a group's channels would be a different loss, so we do not add one. The
    only change from the original is the divisor. The original uses a constant 73 because
    it never pools channel 511; we divide each group by its own size g_k. For 512/7 that is
    73 for groups 0-5 and 74 for the last group, which now includes channel 511.

    Bounds: the loss is not clipped. It lies in [0, 1) whenever every group max lies in
    (0, g_k], which holds for sigmoid-masked CLIP features of ordinary magnitude. In general
    it lies in [1 - max_k(hi/g_k), 1 - min_k(lo/g_k)] for features in [lo, hi]. Minimising it
    raises each group's strongest response.
    """
    groups = _check_features(x, num_classes)
    return _diverse_from_grouped(_grouped(x, groups), groups)


@dataclass
class SeparationLosses:
    sep_loss: torch.Tensor      # CE(sep_logits, y)
    div_loss: torch.Tensor      # see diverse_loss
    sep_logits: torch.Tensor    # (B, L), computed on the dropped features
    keep_grouped: torch.Tensor | None  # (B or 1, L, g_max) drop mask used; None when nothing was dropped
    groups: ChannelGroups

    @property
    def keep(self) -> torch.Tensor | None:
        """The drop mask used, as a 0/1 (B or 1, C) channel mask (None when nothing was dropped)."""
        return None if self.keep_grouped is None else _channel_keep(self.keep_grouped, self.groups)


def separation_losses(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    drop: int = 10,
    per_sample: bool = True,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> SeparationLosses:
    """Channel-separation CE (with random channel drop while training) and the diverse loss.

    Fused: one grouped copy of ``x`` serves both losses, and the drop mask is drawn directly
    in grouped layout. The result equals ``separation_logits(x, L, keep)`` and
    ``diverse_loss(x, L)`` (tests check it).
    """
    groups = _check_features(x, num_classes)
    grouped = _grouped(x, groups)
    keep = None
    if training and drop > 0:
        _check_drop(drop, groups)
        rows = x.shape[0] if per_sample else 1
        keep = _grouped_keep(rows, groups, drop, generator, x.device, x.dtype)
        logits = (grouped * keep).amax(dim=2)
    else:
        logits = grouped.amax(dim=2)
    return SeparationLosses(F.cross_entropy(logits, y), _diverse_from_grouped(grouped, groups), logits, keep, groups)


# ---------------------------------------------------------------------------------------
# Reference implementations: Python loops over groups, plain slicing. Tests and benchmark only.
# ---------------------------------------------------------------------------------------

def reference_group_bounds(num_channels: int, num_classes: int) -> list[tuple[int, int]]:
    """[(start, end)] per group: base size C // L, the last group takes the remainder."""
    base = num_channels // num_classes
    bounds = [(k * base, (k + 1) * base) for k in range(num_classes - 1)]
    bounds.append(((num_classes - 1) * base, num_channels))
    return bounds


def reference_drop_mask(
    batch_size: int, num_channels: int, num_classes: int, drop: int,
    per_sample: bool = True, generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Like the original ``Mask()``: per group, shuffle positions and zero the first ``drop``."""
    rows = batch_size if per_sample else 1
    keep = torch.ones(rows, num_channels, device=device)
    for start, end in reference_group_bounds(num_channels, num_classes):
        order = torch.rand(rows, end - start, generator=generator, device=device).argsort(dim=1)
        keep[:, start:end].scatter_(1, order[:, :drop], 0.0)
    return keep


def reference_separation_logits(x: torch.Tensor, num_classes: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    if keep is not None:
        x = x * keep
    columns = [x[:, s:e].max(dim=1).values for s, e in reference_group_bounds(x.shape[1], num_classes)]
    return torch.stack(columns, dim=1)


def reference_diverse_loss(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    terms = [x[:, s:e].max(dim=1).values / (e - s) for s, e in reference_group_bounds(x.shape[1], num_classes)]
    return 1.0 - torch.stack(terms, dim=1).mean()
