"""The training augmentation as data: parameters per (image, view), applied to a batch at once.

CAFE's official code augments each training image (Gaussian noise with p = 0.5 on the 0-255
pixels before the resize, horizontal flip, random erasing with scale 0.02-0.25) and feeds the
SAME augmented tensor to the frozen encoder and to the mask CNN. To cache that, an augmented
view must be reproducible: `featcache build --aug-views K` draws K parameter rows per image,
encodes the augmented images and stores the rows beside the features; maskfer re-applies a row
to the cached image its CNN sees, so F and the CNN input stay paired. The training batches
without stored views go through the same two functions (parameters drawn from the epoch's
generator), so there is one augmentation, not two.

A parameter row (``PARAMS``; float32, all relative to the image, so it means the same at any
resolution):

* ``flip``: 1.0 = mirror left-right;
* ``erase_top, erase_left, erase_h, erase_w``: the erased rectangle as fractions of the image
  height/width (``erase_h = 0``: nothing erased). It is filled with the ImageNet mean colour,
  which is torchvision's ``RandomErasing(value=0)`` after ``Normalize`` (what the official code does);
* ``noise_seed``: the seed of the Gaussian noise field (< 0: no noise). The field is generated
  on the grid of the image it is added to by a counter-based hash (no generator state), so any
  device, batch order or subset regenerates exactly the same noise for the same seed and grid.

Order: noise on the source pixels (then rounded down to uint8, as ``astype(np.uint8)`` does) ->
resize to the consumer's size -> flip -> erase. Random draws come from uniforms: a
``torch.Generator`` for training batches, or :func:`hash_uniform` of (seed, image key, view) at
build time, so a view never depends on which other images or views were built with it.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PARAMS", "Recipe", "OFFICIAL", "image_keys", "hash_uniform", "hash_normal", "params_from_uniforms",
           "draw_params", "view_params", "apply_params", "resize01", "IMAGENET_MEAN", "IMAGENET_STD", "UNIFORMS",
           "recipe_text"]

PARAMS = ("flip", "erase_top", "erase_left", "erase_h", "erase_w", "noise_seed")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ERASE_ATTEMPTS = 10   # torchvision's RandomErasing tries 10 rectangles before giving up
UNIFORMS = 4 + 4 * ERASE_ATTEMPTS  # per view: flip, erase?, noise?, noise seed, then 4 per erase attempt
_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Recipe:
    """Probabilities and ranges of the training augmentation. ``noise_std`` is in 0-255 pixel units."""

    flip_p: float = 0.5
    erase_p: float = 0.5
    erase_scale: tuple[float, float] = (0.02, 0.25)
    erase_ratio: tuple[float, float] = (0.3, 3.3)
    noise_p: float = 0.5
    noise_std: float = math.sqrt(30.0)   # the official add_g: variance 30

    def to_dict(self) -> dict:
        return {"flip_p": self.flip_p, "erase_p": self.erase_p, "erase_scale": list(self.erase_scale),
                "erase_ratio": list(self.erase_ratio), "noise_p": self.noise_p, "noise_std": self.noise_std}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


OFFICIAL = Recipe()


def recipe_text(d: dict, seed: int) -> str:
    """One line for people: 'seed 0, flip 0.5, erase 0.5 (scale 0.02-0.25, ratio 0.3-3.3), noise 0.5 (std 5.48)'."""
    try:
        return (f"seed {seed}, flip {d['flip_p']:g}, erase {d['erase_p']:g} (scale {d['erase_scale'][0]:g}-"
                f"{d['erase_scale'][1]:g}, ratio {d['erase_ratio'][0]:g}-{d['erase_ratio'][1]:g}), "
                f"noise {d['noise_p']:g} (std {d['noise_std']:.3g})")
    except (KeyError, IndexError, TypeError, ValueError):
        return f"seed {seed}, recipe {d}"


# ---------------------------------------------------------------------------- counter-based randomness
def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons): a bijective 32-bit integer hash, on int64 tensors holding [0, 2^32) values.
    Products overflow int64 and wrap; the low 32 bits kept are then exact."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def image_keys(ids) -> torch.Tensor:
    """Stable 32-bit keys of image ids (CRC-32 of the UTF-8 id), as int64."""
    return torch.tensor([zlib.crc32(str(i).encode()) for i in ids], dtype=torch.int64)


def hash_uniform(keys: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) float64 uniforms in (0, 1): a pure function of each int64 key and the counter 0..n-1."""
    k = _mix32(keys.to(torch.int64))
    counter = torch.arange(n, dtype=torch.int64, device=keys.device)
    h = _mix32(_mix32(k.unsqueeze(-1) ^ (counter * 0x9E3779B9 & _M32)) + counter)
    return (h.double() + 0.5) / 4294967296.0


def hash_normal(seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) standard normals (float32): Box-Muller on :func:`hash_uniform` of each seed."""
    m = math.prod(shape)
    u = hash_uniform(seeds, 2 * ((m + 1) // 2)).view(len(seeds), -1, 2)
    r = torch.sqrt(-2.0 * torch.log(u[..., 0]))
    z = torch.stack([r * torch.cos(2 * math.pi * u[..., 1]), r * torch.sin(2 * math.pi * u[..., 1])], -1)
    return z.reshape(len(seeds), -1)[:, :m].reshape(len(seeds), *shape).float()


# ---------------------------------------------------------------------------- parameters
def params_from_uniforms(u: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """(..., UNIFORMS) uniforms -> (..., len(PARAMS)) float32 parameter rows (torchvision's erasing rules:
    the first of 10 candidate rectangles that fits the image, else nothing)."""
    u = u.double()
    flip = (u[..., 0] < recipe.flip_p).double()
    noise = u[..., 2] < recipe.noise_p
    seed = torch.where(noise, torch.floor(u[..., 3] * 2.0 ** 24), torch.full_like(u[..., 3], -1.0))  # exact in float32
    a = u[..., 4:].reshape(*u.shape[:-1], ERASE_ATTEMPTS, 4)
    area = recipe.erase_scale[0] + (recipe.erase_scale[1] - recipe.erase_scale[0]) * a[..., 0]
    lo, hi = math.log(recipe.erase_ratio[0]), math.log(recipe.erase_ratio[1])
    aspect = torch.exp(lo + (hi - lo) * a[..., 1])
    h, w = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (h < 1) & (w < 1)
    first = fits.int().argmax(-1, keepdim=True)  # the first candidate that fits
    erase = (u[..., 1] < recipe.erase_p) & fits.any(-1)
    pick = lambda t: t.gather(-1, first).squeeze(-1)  # noqa: E731
    h, w = pick(h), pick(w)
    top, left = pick(a[..., 2]) * (1 - h), pick(a[..., 3]) * (1 - w)
    zero = torch.zeros_like(h)
    box = [torch.where(erase, v, zero) for v in (top, left, h, w)]
    return torch.stack([flip, *box, seed], -1).float()


def draw_params(n: int, recipe: Recipe, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(n, len(PARAMS)) rows from a generator (a training batch's draw), on the generator's device by default."""
    if device is None and generator is not None:
        device = generator.device
    u = torch.rand(n, UNIFORMS, generator=generator, device=device, dtype=torch.float64)
    return params_from_uniforms(u, recipe)


def view_params(keys: torch.Tensor, views: range, recipe: Recipe, seed: int = 0) -> torch.Tensor:
    """(n, len(views), len(PARAMS)) rows of the augmented views ``views`` of the images with ``keys``
    (:func:`image_keys`): a function of (seed, key, view index) only, so views can be added later and any
    subset rebuilt to the same values."""
    v = torch.tensor(list(views), dtype=torch.int64)
    k = _mix32(_mix32(keys.view(-1, 1) ^ (seed * 0x27D4EB2F & _M32)) + v.view(1, -1) * 0x165667B1)
    return params_from_uniforms(hash_uniform(k, UNIFORMS), recipe)


# ---------------------------------------------------------------------------- applying
def resize01(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of a float NCHW batch to size x size; no-op when it matches."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def apply_params(images: torch.Tensor, params: torch.Tensor, size: int, noise_std: float) -> torch.Tensor:
    """uint8 images (B, H, W, 3) + rows (B, len(PARAMS)) -> augmented float (B, 3, size, size) in [0, 1].

    ``noise_std`` (0-255 units) scales the noise field of rows whose ``noise_seed`` >= 0."""
    dev = images.device
    params = params.to(dev)
    x = images.permute(0, 3, 1, 2).float()                       # 0..255, source grid
    seed = params[:, 5].to(torch.int64)
    noisy = seed >= 0
    if noise_std > 0:  # a field for every row, kept where the row has noise: no host sync in a training step
        n = hash_normal(seed.clamp(min=0), tuple(x.shape[1:])).to(dev)
        x = torch.where(noisy.view(-1, 1, 1, 1), torch.floor((x + noise_std * n).clamp(0, 255)), x)
    x = resize01(x / 255.0, size)
    x = torch.where(params[:, 0].view(-1, 1, 1, 1) > 0.5, x.flip(-1), x)
    top = torch.round(params[:, 1] * size).long().view(-1, 1)
    left = torch.round(params[:, 2] * size).long().view(-1, 1)
    h = torch.round(params[:, 3] * size).long().view(-1, 1)
    w = torch.round(params[:, 4] * size).long().view(-1, 1)
    idx = torch.arange(size, device=dev).view(1, -1)
    inside = (((idx >= top) & (idx < top + h)).unsqueeze(2) & ((idx >= left) & (idx < left + w)).unsqueeze(1))
    fill = torch.tensor(IMAGENET_MEAN, device=dev, dtype=x.dtype).view(1, 3, 1, 1)
    return torch.where(inside.unsqueeze(1), fill, x)
