"""Small CNN backbones in plain torch, with torchvision's exact module and parameter names.

torchvision cannot be imported in this project, but its checkpoint format is everywhere:
ImageNet weights, and the MS-Celeb ResNet-18 the CAFE authors start from. The modules below
therefore copy torchvision's attribute names (``conv1``, ``bn1``, ``layer1.0.downsample.0``;
``features.N.conv.M``), so a torchvision ``state_dict`` loads key for key.

Every backbone's ``forward(images (B, 3, H, W)) -> (B, feature_dim)`` is the global-average
pooled last feature map. The classifier head (``fc`` / ``classifier``) is not built; a
checkpoint's head keys are reported and skipped by :func:`load_state_dict_file`.

    model = create_backbone("resnet18", pretrained="resnet18_msceleb.pth")
    model.feature_dim   # 512
    model.load_report   # LoadReport of what matched, or None when not pretrained
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from featcache.errors import FerError
from maskfer.weights import PRETRAINED_HUB_WORDS, is_remote_pretrained  # noqa: F401 - part of this module's API

__all__ = [
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "load_state_dict_file",
    "LoadReport",
    "BackboneLoadError",
    "ResNet",
    "MobileNetV2",
]

_REGISTRY: dict[str, Callable[[], nn.Module]] = {}
_HEAD_PREFIXES = ("fc.", "classifier.")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


class BackboneLoadError(FerError, RuntimeError):  # RuntimeError: its only base before FerError
    """A weights file does not fit the backbone; the message names the file and example keys."""


def register_backbone(name: str):
    def wrap(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        _REGISTRY[name] = factory
        return factory
    return wrap


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


# torchvision's published ImageNet weights (torchvision-format state dicts), fetched when online.
IMAGENET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "mobilenet_v2": "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
}
_HUB_WORDS = PRETRAINED_HUB_WORDS


def resolve_pretrained(name: str, pretrained: str | os.PathLike) -> Path:
    """A local weights file for ``pretrained``: a path as is; "imagenet" (torchvision's weights),
    an http(s)/file URL, or "hf://OWNER/REPO/FILE" (a file of a Hugging Face hub repository) are
    downloaded once into the usual caches. Offline, those raise a clear BackboneLoadError."""
    spec = str(pretrained)
    url = IMAGENET_URLS.get(name) if spec.lower() in _HUB_WORDS else None
    if spec.lower() in _HUB_WORDS and url is None:
        raise BackboneLoadError(f"no published ImageNet weights known for backbone {name!r}; pass a weights file")
    if spec.startswith(("http://", "https://", "file://")):
        url = spec
    try:
        if url is not None:
            import torch.hub

            fname = os.path.basename(url.split("?")[0])
            dest = Path(torch.hub.get_dir()) / "checkpoints" / fname
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(dest), progress=False)
            return dest
        if spec.startswith("hf://"):
            from huggingface_hub import hf_hub_download

            parts = spec[len("hf://"):].split("/")
            if len(parts) < 3:
                raise BackboneLoadError(f"--pretrained {spec!r}: expected hf://OWNER/REPO/PATH/TO/FILE")
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
    except BackboneLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - URLError, OSError, hub errors: all mean "could not fetch"
        raise BackboneLoadError(
            f"cannot download pretrained weights {spec!r} for {name} ({type(e).__name__}: {e}); "
            "without network access, download a torchvision-format .pth/.safetensors file elsewhere "
            "and pass its path"
        ) from e
    return Path(spec)


def create_backbone(name: str = "resnet18", pretrained: str | os.PathLike | None = None) -> nn.Module:
    """Build backbone ``name``: random init, or ``pretrained`` weights (see :func:`resolve_pretrained`:
    a torchvision-format file, "imagenet", a URL or hf://OWNER/REPO/FILE), with a load report."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    model = _REGISTRY[name]()
    model.load_report = None
    if pretrained is not None:
        model.load_report = load_state_dict_file(model, resolve_pretrained(name, pretrained))
    return model


# ------------------------------------------------------------------------------ ResNet

def _conv3x3(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(inp: int, out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inp: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inp, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, inp: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inp, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int]):
        super().__init__()
        self._inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 512 * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self._inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self._inplanes, planes, stride, downsample)]
        self._inplanes = planes * block.expansion
        layers += [block(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


@register_backbone("resnet18")
def resnet18() -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2])


@register_backbone("resnet50")
def resnet50() -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3])


# ------------------------------------------------------------------------- MobileNetV2

class ConvBNReLU6(nn.Sequential):
    """torchvision's Conv2dNormActivation: children 0 (conv), 1 (bn), 2 (ReLU6)."""

    def __init__(self, inp: int, out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(inp, out, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    # t (expansion), c (channels), n (repeats), s (first stride): torchvision's width-1.0 table.
    SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
               [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]

    def __init__(self):
        super().__init__()
        inp, last = 32, 1280
        features: list[nn.Module] = [ConvBNReLU6(3, inp, stride=2)]
        for t, c, n, s in self.SETTING:
            for i in range(n):
                features.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
                inp = c
        features.append(ConvBNReLU6(inp, last, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.feature_dim = last
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


@register_backbone("mobilenet_v2")
def mobilenet_v2() -> MobileNetV2:
    return MobileNetV2()


# -------------------------------------------------------------------------- loading

@dataclass
class LoadReport:
    path: str
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)        # backbone keys the file lacks (left at init)
    unexpected: list[str] = field(default_factory=list)     # file keys the backbone has no place for
    shape_mismatches: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, model, file)
    ignored_head: list[str] = field(default_factory=list)   # fc.* / classifier.* keys, skipped by design

    def summary(self) -> str:
        return (f"{self.path}: {len(self.matched)} matched, {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.shape_mismatches)} shape mismatches, "
                f"{len(self.ignored_head)} head keys ignored")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickled modules/optimisers are refused by weights_only
        raise BackboneLoadError(f"{path}: cannot read as a weights-only torch file: {exc}") from exc
    # Training scripts save {"state_dict": ..., "epoch": ...} and the like; descend to the weights.
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise BackboneLoadError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DataParallel/DDP ``module.`` prefixes (possibly repeated)."""
    out = {}
    for key, value in weights.items():
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


def _examples(keys, n: int = 4) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") if keys else "(none)"


def load_state_dict_file(model: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load a torchvision-format weights file (.pth/.pt via weights_only, or .safetensors) into
    ``model`` and report what matched.

    Head keys (``fc.*``, ``classifier.*``) may be missing or unexpected without complaint.
    Raises :class:`BackboneLoadError` if no backbone key matches (wrong architecture or
    naming) or if any backbone key's shape differs. Missing or unexpected non-head keys are
    reported but do not raise.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneLoadError(f"weights file not found: {path}")
    weights = _strip_prefixes(_read_weights(path))
    own = model.state_dict()
    report = LoadReport(path=str(path))
    to_load = {}
    for key, value in weights.items():
        if key.startswith(_HEAD_PREFIXES) and (key not in own or value.shape != own[key].shape):
            report.ignored_head.append(key)  # a 1000-class ImageNet head never fits a 7-class one
        elif key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.shape_mismatches.append((key, tuple(own[key].shape), tuple(value.shape)))
        else:
            to_load[key] = value
            report.matched.append(key)
    # Old checkpoints predate BatchNorm's num_batches_tracked buffer; its absence is harmless.
    report.missing = [k for k in own if k not in weights and not k.endswith("num_batches_tracked")
                      and not k.startswith(_HEAD_PREFIXES)]

    backbone_matched = [k for k in report.matched if not k.startswith(_HEAD_PREFIXES)]
    if not backbone_matched:
        raise BackboneLoadError(
            f"{path}: no key matches the {type(model).__name__} backbone (wrong architecture?). "
            f"File keys: {_examples(weights)}; expected keys like: {_examples(own)}"
        )
    if report.shape_mismatches:
        shown = "; ".join(f"{k}: model {m} vs file {f}" for k, m, f in report.shape_mismatches[:3])
        raise BackboneLoadError(
            f"{path}: {len(report.shape_mismatches)} key(s) have the wrong shape for "
            f"{type(model).__name__} (different architecture?): {shown}"
        )
    model.load_state_dict(to_load, strict=False)
    return report
