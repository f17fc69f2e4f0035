"""What `--pretrained` may name besides a local file (stdlib only: the config validates it at CLI start)."""
from __future__ import annotations

PRETRAINED_HUB_WORDS = ("imagenet", "hub", "torchvision", "default", "true")  # torchvision's weights


def is_remote_pretrained(spec) -> bool:
    """--pretrained names downloadable weights (a hub word, a URL, hf://...) rather than a local file."""
    s = str(spec)
    return s.lower() in PRETRAINED_HUB_WORDS or s.startswith(("http://", "https://", "file://", "hf://"))
