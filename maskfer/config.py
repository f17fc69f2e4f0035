"""Training configuration: one dataclass, the paper's defaults, validation, and identity.

The defaults are CAFE's (ECCV 2024): Adam 2e-4, weight decay 1e-4, ExponentialLR 0.9 per
epoch, 60 epochs, batch 32, 224 px, flip + random erasing, lambda 1.5, beta 5, drop 10.
Every field can be set from the CLI and is a possible sweep axis.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

METHODS = ("cafe", "baseline", "linear-probe")


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    cache: str = ""                   # feature store path
    train: str = ""                   # DATASET[:SPLIT]; split defaults to "train"
    test: list[str] = field(default_factory=list)  # DATASET[:SPLIT] evaluated after training
    method: str = "cafe"              # cafe | baseline | linear-probe
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

    def validate(self) -> "TrainConfig":
        if self.method not in METHODS:
            raise ConfigError(f"--method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.drop_mode not in ("sample", "batch"):
            raise ConfigError(f"--drop-mode must be 'sample' or 'batch', not {self.drop_mode!r}")
        from maskfer.backbones import list_backbones

        if self.backbone not in list_backbones():
            raise ConfigError(f"--backbone must be one of {', '.join(list_backbones())}, not {self.backbone!r}")
        if self.mask_map not in ("auto", "linear"):
            raise ConfigError(f"--mask-map must be auto or linear, not {self.mask_map!r}")
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.lr <= 0 or not 0 < self.gamma <= 1:
            raise ConfigError("--lr must be > 0 and --gamma in (0, 1]")
        if self.drop < 0 or not 0 <= self.erasing <= 1 or self.noise_std < 0:
            raise ConfigError("--drop and --noise-std must be >= 0, --erasing in [0, 1]")
        if self.pretrained:
            from pathlib import Path

            from maskfer.backbones import is_remote_pretrained

            if not is_remote_pretrained(self.pretrained) and not Path(self.pretrained).is_file():
                raise ConfigError(f"--pretrained {self.pretrained}: no such file (or use imagenet, a URL or hf://...)")
        if not self.train:
            raise ConfigError("--train DATASET[:SPLIT] is required")
        return self

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


def split_spec(spec: str, default: str) -> tuple[str, str]:
    """'ferplus:val' -> ('ferplus', 'val'); 'muxspace' -> ('muxspace', default)."""
    name, _, split = spec.partition(":")
    return name, (split or default)
