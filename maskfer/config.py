"""Training configuration: one dataclass, the paper's defaults, validation, and identity.

The defaults are CAFE's (ECCV 2024): Adam 2e-4, weight decay 1e-4, ExponentialLR 0.9 per
epoch, 60 epochs, batch 32, 224 px, flip + random erasing, lambda 1.5, beta 5, drop 10.
Every field can be set from the CLI and is a possible sweep axis.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field

from maskfer.methods import get_method, method_names

METHODS = method_names()
FEATURE_NORMS = ("none", "standardize")


class ConfigError(ValueError):
    """A bad option value; ``field`` names the TrainConfig field when there is one."""

    def __init__(self, msg: str, field: str | None = None):
        super().__init__(msg)
        self.field = field


# Numeric options: (lower bound, lower inclusive, upper bound, upper inclusive); every value must be finite.
NUMERIC_RANGES = {
    "epochs": (1, True, None, True), "batch_size": (1, True, None, True), "image_size": (1, True, None, True),
    "lr": (0, False, None, True), "weight_decay": (0, True, None, True), "gamma": (0, False, 1, True),
    "lam": (0, True, None, True), "beta": (0, True, None, True), "drop": (0, True, None, True),
    "erasing": (0, True, 1, True), "noise_std": (0, True, None, True), "workers": (0, True, None, True),
}


def option_name(field: str) -> str:
    """TrainConfig field -> the CLI option that sets it (lam -> --lambda)."""
    return "--lambda" if field == "lam" else "--" + field.replace("_", "-")


def _range_text(lo, lo_inc, hi, hi_inc) -> str:
    if hi is None:
        return f">= {lo}" if lo_inc else f"> {lo}"
    return f"in {'[' if lo_inc else '('}{lo}, {hi}{']' if hi_inc else ')'}"


@dataclass
class TrainConfig:
    cache: str = ""                   # feature store path
    train: str = ""                   # DATASET[:SPLIT]; split defaults to "train"
    test: list[str] = field(default_factory=list)  # DATASET[:SPLIT] evaluated after training
    method: str = "cafe"              # cafe | baseline | linear-probe (converged, L-BFGS) | linear-head (FC on F, epoch loop)
    backbone: str = "resnet18"        # mask CNN (cafe) or end-to-end model (baseline)
    pretrained: str | None = None     # backbone init: torchvision-format file, or imagenet / URL / hf://… (online)
    encoder: str | None = None        # store encoder key; default: the dataset's only encoder
    epochs: int = 60
    batch_size: int = 32
    image_size: int = 224
    lr: float = 2e-4
    weight_decay: float = 1e-4
    gamma: float = 0.9                # ExponentialLR factor per epoch
    seed: int = 0
    lam: float = 1.5                  # weight of the channel-separation CE
    beta: float = 5.0                 # weight of the diverse loss
    drop: int = 10                    # channels dropped per class group (of 73 for C=512)
    drop_mode: str = "sample"         # sample | batch: one drop pattern per sample or per batch
    sigmoid: bool = True              # ablation: mask without sigmoid
    separation: bool = True           # ablation: no channel-separation loss
    diverse: bool = True              # ablation: no diverse loss
    mask_map: str = "auto"            # backbone width D -> C: auto (identity / mean over windows / linear) | linear
    feature_norm: str = "none"        # none (paper) | standardize: F per channel with training-split mean/std, kept in the run
    flip: bool = True
    erasing: float = 0.5              # random-erasing probability
    noise_std: float = 0.0            # Gaussian noise on normalised images; 0 = off
    balanced: bool = False            # class-balanced sampling (AffectNet needs it)
    online_encoder: bool = False      # recompute features from each augmented batch (slow; for comparison)
    val_split: str | None = None      # model selection: a split of the training dataset, or holdout:FRACTION of its train split
    device: str = "auto"
    workers: int = 0                  # decode workers when images come from the dataset root
    root: str | None = None           # dataset root override when the store has no cached images

    # Fields that do not change what is trained: a resumed run may differ in these.
    NON_IDENTITY = ("test", "device", "workers", "root", "cache")

    def validate(self, check_files: bool = True) -> "TrainConfig":
        """Raise ConfigError (with ``.field``) on a bad value. ``check_files=False`` skips what only matters
        to start training (the --pretrained file), for configs read back from a run directory."""
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}", field="method")
        if self.drop_mode not in ("sample", "batch"):
            raise ConfigError(f"--drop-mode must be 'sample' or 'batch', not {self.drop_mode!r}", field="drop_mode")
        from maskfer.backbones import list_backbones

        if self.backbone not in list_backbones():
            raise ConfigError(f"--backbone must be one of {', '.join(list_backbones())}, not {self.backbone!r}",
                              field="backbone")
        if self.feature_norm not in FEATURE_NORMS:
            raise ConfigError(f"--feature-norm must be one of {', '.join(FEATURE_NORMS)}, not {self.feature_norm!r}",
                              field="feature_norm")
        if self.mask_map not in ("auto", "linear"):
            raise ConfigError(f"--mask-map must be auto or linear, not {self.mask_map!r}", field="mask_map")
        for name, (lo, lo_inc, hi, hi_inc) in NUMERIC_RANGES.items():
            v = getattr(self, name)
            opt = option_name(name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{opt} must be a finite number, not {v!r}", field=name)
            if not ((v >= lo if lo_inc else v > lo) and (hi is None or (v <= hi if hi_inc else v < hi))):
                rng = _range_text(lo, lo_inc, hi, hi_inc)
                raise ConfigError(f"{opt} must be {rng}, not {v!r}" if hi is None else
                                  f"{opt} {rng} is required, not {v!r}", field=name)
        if self.pretrained and check_files:
            from pathlib import Path

            from maskfer.backbones import is_remote_pretrained

            if not is_remote_pretrained(self.pretrained) and not Path(self.pretrained).is_file():
                raise ConfigError(f"--pretrained {self.pretrained}: no such file (or use imagenet, a URL or hf://...)",
                                  field="pretrained")
        if not self.train:
            raise ConfigError("--train DATASET[:SPLIT] is required", field="train")
        return self

    @property
    def method_spec(self):
        """The registered maskfer.methods.Method of ``method``."""
        return get_method(self.method)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config option(s): {', '.join(unknown)}")
        return cls(**d)

    def identity(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k not in self.NON_IDENTITY}

    def identity_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


def check_types(d: dict) -> None:
    """Raise ConfigError (with ``.field``) unless each value of ``d`` (decoded JSON) has its field's type:
    int (not bool), float (an int is fine), bool, str, list of str, or None where the field is optional."""
    hints = typing.get_type_hints(TrainConfig)
    for name, v in d.items():
        tp = hints.get(name)
        if tp is None:
            continue
        args = typing.get_args(tp) if typing.get_origin(tp) is not list else ()
        if type(None) in args and v is None:
            continue
        base = next((a for a in args if a is not type(None)), tp) if args else tp
        if typing.get_origin(base) is list:
            ok, want = isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"
        elif base is bool:
            ok, want = isinstance(v, bool), "true or false"
        elif base is int:
            ok, want = isinstance(v, int) and not isinstance(v, bool), "an integer"
        elif base is float:
            ok, want = isinstance(v, (int, float)) and not isinstance(v, bool), "a number"
        else:
            ok, want = isinstance(v, str), "a string"
        if not ok:
            raise ConfigError(f"{name} must be {want}{' or null' if type(None) in args else ''}, not {v!r}",
                              field=name)


def split_spec(spec: str, default: str) -> tuple[str, str]:
    """'ferplus:val' -> ('ferplus', 'val'); 'muxspace' -> ('muxspace', default)."""
    name, _, split = spec.partition(":")
    return name, (split or default)
