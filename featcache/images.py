"""Decode one image file into RGB, with errors that name the file and say what is wrong with it.

Listing (featcache.manifests) only checks that files exist; everything that needs the pixels
goes through :func:`load_image`, so a zero-byte, truncated or mislabelled file fails here,
once, with a reason a person can act on.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from featcache.errors import FerError


# Decode limit: a 12000x12000 PNG needs ~2.4 GB to decode and convert, and a face dataset has no use for
# such an image. Checked from the header, before any pixel is decoded (`featcache build --max-pixels`).
DEFAULT_MAX_PIXELS = 50_000_000


class ImageError(FerError):
    """An image that cannot be decoded. Picklable (args are path, reason) for worker processes."""

    def __init__(self, path, reason: str):
        super().__init__(str(path), reason)
        self.path, self.reason = str(path), reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def load_image(path: str | os.PathLike, box: tuple[int, int, int, int] | None = None,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decoded RGB image, cropped to the ``(x, y, w, h)`` box (clamped to the image) if given.

    EXIF orientation is deliberately not applied: dataset face boxes refer to the stored pixels.
    An image of more than ``max_pixels`` pixels (None or 0: no limit) is refused before decoding.
    """
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise ImageError(path, "zero-byte file (empty): the download or copy is incomplete")
        with Image.open(path) as img:
            if max_pixels and img.width * img.height > max_pixels:
                raise ImageError(path, f"image of {img.width}x{img.height} = {img.width * img.height / 1e6:.1f} "
                                       f"megapixels is over the decode limit of {max_pixels / 1e6:g} megapixels "
                                       "(not decoded: it would take gigabytes of memory); shrink the image, or "
                                       "raise the limit with --max-pixels")
            img.load()  # decode now, so a truncated file fails here and not in a worker later
            rgb = _to_rgb(img)
    except ImageError:
        raise
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageError(path, f"dangling symbolic link to {os.readlink(path)!r} (the target does not exist); "
                                   "fix or remove the link") from None
        raise ImageError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageError(path, "is a folder, not an image file") from None
    except PermissionError:
        raise ImageError(path, "permission denied: the file cannot be read") from None
    except UnidentifiedImageError:
        raise ImageError(path, f"not an image: the contents are not a format Pillow can read{_peek(path)}") from None
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"image too large to decode safely ({e})") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(path, "symbolic link loop: following the link leads back to it; "
                                   "fix or remove the link") from None
        raise ImageError(path, f"truncated or corrupt image data ({e})") from None
    except (SyntaxError, ValueError) as e:  # Pillow reports broken data as OSError/SyntaxError
        raise ImageError(path, f"truncated or corrupt image data ({e})") from None
    return rgb if box is None else _crop(path, rgb, box)


def resize_uint8(img: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the image squashed (aspect not kept) with bilinear filtering."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # convert("RGB") would clip 16-bit and float grey to 255; scale into 0..255 first.
        grey = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(grey.max()), 255.0)
        img = Image.fromarray(np.clip(grey * (255.0 / top), 0, 255).astype(np.uint8), "L")
    elif img.mode == "P":
        img = img.convert("RGBA")  # palette transparency needs RGBA first, or Pillow warns
    return img.convert("RGB")  # a new image, detached from the file


def _crop(path: Path, img: Image.Image, box) -> Image.Image:
    x, y, w, h = (int(v) for v in box)
    left, top = max(0, x), max(0, y)
    right, bottom = min(img.width, x + w), min(img.height, y + h)
    if right <= left or bottom <= top:
        raise ImageError(path, f"face box (x={x}, y={y}, w={w}, h={h}) lies outside the "
                               f"{img.width}x{img.height} image")
    return img.crop((left, top, right, bottom))


def _peek(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return ""
    return f" (starts with {head!r})" if head else ""
