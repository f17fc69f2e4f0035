"""Plug-in factories for tests/test_encoders.py, loaded by spec "plugin_encoders:<factory>"."""
import torch
from PIL import Image

from featcache.encoders import Encoder


class Gray16:
    """Picklable preprocess: 16x16, 0..1 floats."""

    size = 16

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB").resize((self.size, self.size))
        x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(self.size, self.size, 3)
        return x.permute(2, 0, 1).float() / 255.0


def _net(width: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def tiny_tuple():
    return _net(), Gray16()


def tiny_encoder():
    return Encoder(name="tiny-enc", module=_net(6), preprocess=Gray16(), dim=6,
                   metadata={"type": "test-plugin", "revision": "r1", "processor": {"size": 16}, "dim": 6})


def wrong_dim_encoder():
    return Encoder(name="x", module=_net(6), preprocess=Gray16(), dim=5, metadata={})


def not_an_encoder():
    return 42


def bad_output():
    return torch.nn.Conv2d(3, 4, 3), Gray16()   # 4-D feature map, not (B, C)


NOT_CALLABLE = 3
