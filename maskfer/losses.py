"""The batched training losses of the engine: K models' objectives computed at once.

``stacked_cafe_loss`` is CAFE's ``CE + lam * sep + beta * div`` for K stacked models (outputs
(B, K, ...)); ``maskfer.model.cafe_loss`` is its readable one-model specification and the test
oracle (tests/test_parallel.py and tests/test_official_loss.py check them equal). The pooling
mode (``LossSpec.groups``: "official", the paper's code, or "balanced"; see maskfer.separation)
is shared by the models of a group; the drop is always drawn over the mask groups.
``stacked_ce`` is the plain cross-entropy of the other epoch-trained methods. Per-model
settings are (K,) tensors: no Python loop over models, samples, channels or classes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from maskfer.config import TrainConfig
from maskfer.separation import ChannelGroups, channel_groups, check_grouping, pool_divisor, pooled, pooled_keep


@dataclass
class LossSpec:
    """Per-model loss settings of the models being trained, and the group's drop draw.

    ``drops`` are effective counts (0 where a model has no separation loss). The draw is made
    for the whole group (``draw_drops``, ``draw_sample``: K_group entries) and ``slots`` picks
    the trained models' positions in it, so a sub-group catching up draws exactly what the
    full group draws.
    """

    lam: list[float]
    beta: list[float]
    drops: list[int]
    sample: list[bool]
    use_sep: list[bool]
    use_div: list[bool]
    draw_drops: list[int]
    draw_sample: list[bool]
    slots: list[int]
    groups: str = "official"

    def __post_init__(self) -> None:
        check_grouping(self.groups)

    @classmethod
    def from_configs(cls, cfgs: list[TrainConfig], slots: list[int] | None = None) -> "LossSpec":
        """``cfgs``: the whole group; ``slots``: the positions being trained (default: all).

        The pooling mode is ``cfg.groups`` ("official" when a config has no such field); it is a
        shared setting, so configurations that disagree are refused.
        """
        slots = list(range(len(cfgs))) if slots is None else list(slots)
        modes = {getattr(c, "groups", "official") for c in cfgs}
        if len(modes) > 1:
            raise ValueError(f"the models of one group must share the pooling mode, got groups {sorted(modes)}")
        groups = check_grouping(modes.pop())
        cafe = cfgs[0].method_spec.loss == "cafe"
        eff = [c.drop if cafe and c.separation else 0 for c in cfgs]
        smp = [c.drop_mode == "sample" for c in cfgs]
        return cls(lam=[cfgs[i].lam if cfgs[i].separation else 0.0 for i in slots],
                   beta=[cfgs[i].beta if cfgs[i].diverse else 0.0 for i in slots],
                   drops=[eff[i] for i in slots], sample=[smp[i] for i in slots],
                   use_sep=[cafe and cfgs[i].separation for i in slots],
                   use_div=[cafe and cfgs[i].diverse for i in slots],
                   draw_drops=eff, draw_sample=smp, slots=slots, groups=groups)

    @property
    def k(self) -> int:
        return len(self.slots)

    def tensors(self, device, dtype=torch.float32) -> dict[str, torch.Tensor]:
        key = (str(device), dtype)
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = {
                "lam": torch.tensor(self.lam, dtype=dtype, device=device),
                "beta": torch.tensor(self.beta, dtype=dtype, device=device),
                "use_sep": torch.tensor(self.use_sep, device=device),
                "use_div": torch.tensor(self.use_div, device=device),
                "sample": torch.tensor(self.sample, device=device),
                "drops": torch.tensor(self.drops, device=device),
                "slots": torch.tensor(self.slots, device=device),
            }
        return cache[key]


def per_model_keep(rows: int, groups: ChannelGroups, drops: list[int], generator: torch.Generator | None = None,
                   device=None, dtype: torch.dtype = torch.float32, slots: list[int] | None = None,
                   equal_path: bool | None = None, tensors: dict | None = None) -> torch.Tensor:
    """0/1 keep mask (rows, K, L, g_max) in grouped layout: exactly ``drops[k]`` zeros among
    each group's real slots for model k, a uniformly random subset per row and model.

    Scores are i.i.d. uniform, drawn as (rows, K_draw, L, g_max) with K_draw = len(drops); the
    d_k lowest-scoring real slots of each group are dropped (padding scores are pushed above
    every uniform, so padding is never chosen). ``slots`` keeps only those models' draws (for a
    sub-group; ``drops`` is then the whole group's list). Padding slots get keep 0 where
    d_k > 0, as in :func:`maskfer.separation.separation_losses` (a dropped channel's 0 is
    already in the group), and 1 where d_k = 0 (they repeat a kept channel). With one model
    this consumes the generator and returns exactly what separation's drop draws.
    ``equal_path`` (default: all drops equal) selects the one-topk path; the general path
    takes the sorted ``topk(max d)`` and drops its first d_k. ``tensors`` may hold "slots" and
    "drops" (the sub-group's counts) already on ``device``, so a training step copies nothing
    from the host (on CUDA such a copy would wait for the queued work).
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if max(drops) >= min(groups.sizes) or min(drops) < 0:
        raise ValueError(f"drops {drops} must be in [0, {min(groups.sizes) - 1}] for {groups.num_channels} "
                         f"channels in {groups.num_classes} groups")
    _, valid, _ = groups.tensors_on(device)
    scores = torch.rand(rows, len(drops), groups.num_classes, groups.max_size, generator=generator, device=device)
    tensors = tensors or {}
    if slots is not None:
        idx = tensors["slots"] if "slots" in tensors else torch.as_tensor(slots, device=device)
        scores = scores.index_select(1, idx)
        drops = [drops[i] for i in slots]
    k = len(drops)
    if not groups.equal_sizes:
        scores = scores.masked_fill(~valid, 2.0)
    d_t = tensors["drops"] if "drops" in tensors else torch.tensor(drops, device=device)
    base = torch.where(valid, True, (d_t == 0).view(k, 1, 1)).to(dtype)        # (K, L, g_max)
    keep = base.expand(rows, -1, -1, -1).clone()
    d_max = max(drops)
    if d_max == 0:
        return keep
    if equal_path if equal_path is not None else len(set(drops)) == 1:
        picked = scores.topk(d_max, dim=3, largest=False, sorted=False).indices
        return keep.scatter_(3, picked, 0.0)
    picked = scores.topk(d_max, dim=3, largest=False, sorted=True).indices      # ascending: rank 0..d_max-1
    drop_rank = torch.arange(d_max, device=device).view(1, 1, 1, d_max) < d_t.view(1, k, 1, 1)
    values = (~drop_rank).to(dtype).expand(rows, k, groups.num_classes, d_max).contiguous()
    return keep.scatter_(3, picked, values)


def keep_to_channels(keep: torch.Tensor, groups: ChannelGroups) -> torch.Tensor:
    """(rows, K, L, g_max) grouped keep -> (rows, K, C) channel keep."""
    rows, k = keep.shape[:2]
    if groups.equal_sizes:
        return keep.reshape(rows, k, groups.num_channels)
    _, valid, _ = groups.tensors_on(keep.device)
    return keep[:, :, valid]


def stacked_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-model mean cross-entropy: logits (B, K, L), y (B,) -> (K,).

    One model: ``F.cross_entropy`` itself, whose forward sums in another order than ``mean``
    (the gradients are identical either way); so a K = 1 group logs the sequential losses bit for bit.
    """
    b, k, _ = logits.shape
    if k == 1:
        return F.cross_entropy(logits[:, 0], y).unsqueeze(0)
    logp = F.log_softmax(logits, dim=2)
    return -logp.gather(2, y.view(b, 1, 1).expand(b, k, 1)).squeeze(2).mean(0)


def stacked_cafe_loss(out: dict[str, torch.Tensor], y: torch.Tensor, spec: LossSpec,
                      generator: torch.Generator | None = None, training: bool = True,
                      keep: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-model CAFE objectives ``CE + lam_k * sep_k + beta_k * div_k`` -> totals (K,) and parts.

    Model k's total equals ``maskfer.model.cafe_loss`` with its own settings (and ``spec.groups``)
    on its slice of ``out`` given the same drop mask. A "batch" model (``sample`` False) uses one
    pattern for the whole batch. ``keep`` overrides the drawn mask, whenever given: a 0/1 mask in
    mask-group layout (rows, K, L, g_max) or in channel layout (rows, K, C), rows = B or 1.
    parts: "ce", "total" and, when any model uses them, "sep" / "div" (each (K,), detached;
    a model that does not use a part has its value computed but weighted 0).
    """
    logits = out["logits"]
    ce = stacked_ce(logits, y)
    total, parts = ce, {"ce": ce.detach()}
    use_sep, use_div = any(spec.use_sep), any(spec.use_div)
    masked = out.get("masked")
    drawn = None
    if keep is None and training and masked is not None and max(spec.draw_drops) > 0:
        # drawn even when the models trained now use no separation loss: a sub-group catching up must consume
        # the generator as the whole group does, or every later batch of the epoch gets other augmentations
        b, k, c = masked.shape
        t = spec.tensors(masked.device, masked.dtype)
        groups = channel_groups(c, logits.shape[2])
        rows = b if any(spec.draw_sample) else 1
        drawn = per_model_keep(rows, groups, spec.draw_drops, generator, masked.device, masked.dtype,
                               slots=None if spec.slots == list(range(len(spec.draw_drops))) else spec.slots,
                               equal_path=len(set(spec.draw_drops)) == 1, tensors=t)
        if rows > 1 and not all(spec.sample):  # "batch" models share row 0's pattern
            drawn = torch.where(t["sample"].view(1, k, 1, 1), drawn, drawn[:1])
    if use_sep or use_div:
        b, k, c = masked.shape
        t = spec.tensors(masked.device, masked.dtype)
        mode = spec.groups
        groups = channel_groups(c, logits.shape[2])
        windows = pooled(masked, groups, mode)                                    # (B, K, L, P)
        if use_sep:
            if keep is not None:
                keep = (pooled(keep.to(masked.dtype), groups, mode) if keep.dim() == 3
                        else pooled_keep(keep, groups, mode))
            elif drawn is not None:
                keep = pooled_keep(drawn, groups, mode)
            sep_logits = (windows * keep).amax(dim=3) if keep is not None else windows.amax(dim=3)
            sep = stacked_ce(sep_logits, y)
            total = total + t["lam"] * sep
            parts["sep"] = sep.detach()
        if use_div:
            div = 1.0 - (windows.amax(dim=3) / pool_divisor(groups, mode, masked.device, masked.dtype)).mean(dim=(0, 2))
            total = total + t["beta"] * div
            parts["div"] = div.detach()
    parts["total"] = total.detach()
    return total, parts
