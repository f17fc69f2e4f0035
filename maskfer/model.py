"""CAFE's mask model, its loss, and the two baselines the paper compares against.

MaskModel: a CNN looks at the face and outputs a mask vector M of the cached feature's
dimension C; ``sigmoid(M) * F`` keeps the expression-related part of the frozen CLIP feature
F, and a linear layer classifies it. The CNN is trained; F comes from the feature cache.

All models share ``forward(images, feats) -> dict`` with at least ``"logits"``, so one
training loop drives any of them (a model ignores the input it does not use).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import create_backbone
from .separation import diverse_loss, separation_losses

__all__ = ["FeatureNorm", "MaskMapping", "MaskModel", "cafe_loss", "BaselineModel", "LinearProbe", "ZeroShotHead",
           "ARCHITECTURES", "create_model"]


class FeatureNorm(nn.Module):
    """Per-channel standardization of the cached features with training-set statistics.

    Off (the paper): identity, no buffers, so checkpoints of runs without it are unchanged.
    On: ``(F - mean) / std`` with ``mean``/``std`` buffers set once from the training split and saved in
    the checkpoint, so evaluation and prediction apply exactly what training saw. Encoders differ in
    feature scale by orders of magnitude (CLIP's projection vs. a ReLU6 CNN's pooled activations), and
    one learning rate cannot suit them all; standardized features make the recipe's rate mean the same.
    """

    def __init__(self, dim: int, enabled: bool = False):
        super().__init__()
        self.enabled = bool(enabled)
        if self.enabled:
            self.register_buffer("mean", torch.zeros(dim))
            self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def set_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.mean) / self.std if self.enabled else feats


def feature_stats(feats: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over every row (and view) of (n, [V,] C) features, computed in float64 and
    returned in the features' dtype."""
    x = feats.reshape(-1, feats.shape[-1]).double()
    return x.mean(0).to(feats.dtype), x.std(0, unbiased=False).clamp_min(eps).to(feats.dtype)


class MaskMapping(nn.Module):
    """Map the backbone's pooled vector (B, D) to a mask of the feature dimension (B, C).

    mode "auto": identity when D == C; when D > C the paper's "mean over sliding windows",
    i.e. ``adaptive_avg_pool1d`` over the channel axis (D % C == 0 gives exactly the mean of
    consecutive non-overlapping windows of D / C channels; otherwise window i spans channels
    floor(i*D/C) .. ceil((i+1)*D/C) - 1, so neighbours may share one); when D < C a learned linear map
    (pooling cannot create channels). mode "linear": always the learned linear map.
    """

    def __init__(self, in_dim: int, out_dim: int, mode: str = "auto"):
        super().__init__()
        if mode not in ("auto", "linear"):
            raise ValueError(f"mask_map must be 'auto' or 'linear', got {mode!r}")
        self.in_dim, self.out_dim = in_dim, out_dim
        if mode == "linear" or in_dim < out_dim:
            self.kind = "linear"
            self.linear = nn.Linear(in_dim, out_dim)
        else:
            self.kind = "identity" if in_dim == out_dim else "pool"

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.kind == "identity":
            return v
        if self.kind == "pool":
            return F.adaptive_avg_pool1d(v.unsqueeze(1), self.out_dim).squeeze(1)
        return self.linear(v)

    def extra_repr(self) -> str:
        return f"{self.in_dim} -> {self.out_dim}, kind={self.kind}"


class MaskModel(nn.Module):
    """CNN-predicted mask on frozen features: ``logits = fc(sigmoid(M(images)) * feats)``.

    ``use_sigmoid=False`` is the paper's ablation ``M * F``. forward returns
    ``{"logits" (B, L), "masked" (B, C), "mask" (B, C)}``; "mask" is the multiplier actually
    applied to the features (sigmoid(M), or M in the ablation).
    """

    def __init__(self, backbone_name: str = "resnet18", feat_dim: int = 512, num_classes: int = 7,
                 use_sigmoid: bool = True, mask_map: str = "auto", pretrained=None, feature_norm: bool = False):
        super().__init__()
        self.feat_norm = FeatureNorm(feat_dim, feature_norm)
        self.backbone = create_backbone(backbone_name, pretrained=pretrained)
        self.mask_map = MaskMapping(self.backbone.feature_dim, feat_dim, mask_map)
        self.fc = nn.Linear(feat_dim, num_classes)
        self.use_sigmoid = use_sigmoid
        self.feat_dim, self.num_classes = feat_dim, num_classes

    def forward(self, images: torch.Tensor, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        if feats.dim() != 2 or feats.shape[1] != self.feat_dim:
            raise ValueError(f"feats must be (B, {self.feat_dim}), got {tuple(feats.shape)}; "
                             "pick one view of (B, V, C) cached features first")
        m = self.mask_map(self.backbone(images))
        mask = torch.sigmoid(m) if self.use_sigmoid else m
        masked = mask * self.feat_norm(feats.to(mask.dtype))
        return {"logits": self.fc(masked), "masked": masked, "mask": mask}


def cafe_loss(out: dict[str, torch.Tensor], y: torch.Tensor, lam: float = 1.5, beta: float = 5.0,
              drop: int = 10, per_sample_drop: bool = True, use_sep: bool = True, use_div: bool = True,
              generator: torch.Generator | None = None, training: bool = True, groups: str = "official",
              keep: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CAFE's objective: ``CE(logits) + lam * CE(sep_logits) + beta * div`` (paper: lam 1.5, beta 5).

    Channel drop (``drop`` per mask group, see maskfer.separation) applies only when
    ``training`` is True; pass ``training=model.training`` so evaluation losses never drop.
    ``per_sample_drop`` True draws a pattern per sample; False ONE pattern for the whole batch
    (``--drop-mode batch``, the original ``Mask(nb_batch)``). ``groups`` ("official", the
    paper's code, or "balanced") picks the pooling windows of the separation logits and the
    diverse loss. ``keep`` (B or 1, C), a given 0/1 channel mask, replaces the random drop
    whenever given (as ``maskfer.losses.stacked_cafe_loss``'s ``keep``). The diverse loss
    always sees the un-dropped features.
    ``generator`` (optional, for reproducible drop patterns) must be on the features' device.
    Returns the total and a dict of detached parts ("ce", "sep", "div", "total"), kept as
    tensors so logging does not force a device sync every step.
    """
    ce = F.cross_entropy(out["logits"], y)
    total = ce
    parts = {"ce": ce.detach()}
    masked = out.get("masked")
    if (use_sep or use_div) and masked is None:
        raise ValueError("use_sep/use_div need out['masked']; baselines train with CE only")
    num_classes = out["logits"].shape[1]
    if use_sep:
        sep = separation_losses(masked, y, num_classes, drop=drop, per_sample=per_sample_drop,
                                training=training, generator=generator, groups=groups, keep=keep)
        total = total + lam * sep.sep_loss
        parts["sep"] = sep.sep_loss.detach()
        div = sep.div_loss
    elif use_div:
        div = diverse_loss(masked, num_classes, groups=groups)
    if use_div:
        total = total + beta * div
        parts["div"] = div.detach()
    parts["total"] = total.detach()
    return total, parts


class BaselineModel(nn.Module):
    """The paper's baseline: backbone + linear classifier on the images; features are unused."""

    def __init__(self, backbone_name: str = "resnet18", num_classes: int = 7, pretrained=None):
        super().__init__()
        self.backbone = create_backbone(backbone_name, pretrained=pretrained)
        self.fc = nn.Linear(self.backbone.feature_dim, num_classes)

    def forward(self, images: torch.Tensor, feats: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(self.backbone(images))}


class LinearProbe(nn.Module):
    """Logistic regression on the frozen features; images are unused (may be None)."""

    def __init__(self, feat_dim: int, num_classes: int = 7, feature_norm: bool = False):
        super().__init__()
        self.feat_norm = FeatureNorm(feat_dim, feature_norm)
        self.fc = nn.Linear(feat_dim, num_classes)

    def forward(self, images: torch.Tensor | None, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(self.feat_norm(feats))}


class ZeroShotHead(nn.Module):
    """CLIP's zero-shot classifier (maskfer.zero_shot): ``fc`` on the L2-normalised feature, its weights the
    class text embeddings times CLIP's logit scale and its bias 0, so the logits are CLIP's logits_per_image.
    Stored features are raw projections (featcache.encoders.hf_clip): the normalisation happens here, wherever
    the model runs. "masked" is the normalised feature, the representation the report's t-SNE shows."""

    def __init__(self, feat_dim: int, num_classes: int = 7):
        super().__init__()
        self.fc = nn.Linear(feat_dim, num_classes)

    def forward(self, images: torch.Tensor | None, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        unit = F.normalize(feats.float(), dim=-1)
        return {"logits": self.fc(unit), "masked": unit}


NUM_CLASSES = 7

# maskfer.methods.Method.architecture -> constructor(cfg, feat_dim); one entry per model family.
ARCHITECTURES = {
    "mask": lambda cfg, dim: MaskModel(cfg.backbone, dim, NUM_CLASSES, use_sigmoid=cfg.sigmoid, mask_map=cfg.mask_map,
                                       pretrained=cfg.pretrained, feature_norm=cfg.feature_norm == "standardize"),
    "end-to-end": lambda cfg, dim: BaselineModel(cfg.backbone, NUM_CLASSES, pretrained=cfg.pretrained),
    "linear": lambda cfg, dim: LinearProbe(dim, NUM_CLASSES, feature_norm=cfg.feature_norm == "standardize"),
    "zero-shot": lambda cfg, dim: ZeroShotHead(dim, NUM_CLASSES),
}


def create_model(cfg, feat_dim: int, feat_stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> nn.Module:
    """The model of ``cfg.method`` (a maskfer.config.TrainConfig). ``feat_stats`` (mean, std) initialise
    --feature-norm standardize; a checkpoint loaded afterwards carries its own."""
    model = ARCHITECTURES[cfg.method_spec.architecture](cfg, feat_dim)
    norm = getattr(model, "feat_norm", None)
    if norm is not None and norm.enabled and feat_stats is not None:
        norm.set_stats(*feat_stats)
    return model
