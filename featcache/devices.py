"""Device choice shared by both stages: "auto" means CUDA when present, else CPU."""
from __future__ import annotations

import torch

from featcache.errors import FerError


class DeviceError(FerError, ValueError):  # ValueError: callers may catch a bad --device as one
    pass


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {device} asked for, but no CUDA device is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise DeviceError(f"--device {device}: {e}") from None
