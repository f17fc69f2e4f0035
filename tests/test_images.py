"""featcache.images: decoding to RGB, face-box crops, and errors that name the file."""
from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from featcache.images import ImageError, load_image, resize_uint8


def save(path, img: Image.Image, **kw):
    img.save(path, **kw)
    return path


def gradient(w=40, h=30) -> Image.Image:
    x = np.arange(w, dtype=np.uint8)[None, :].repeat(h, 0)
    y = np.arange(h, dtype=np.uint8)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x * 5, y * 7, np.full_like(x, 99)], -1), "RGB")


def test_rgb_png_round_trip(tmp_path):
    img = load_image(save(tmp_path / "a.png", gradient()))
    assert img.mode == "RGB" and img.size == (40, 30)
    assert np.array_equal(np.asarray(img), np.asarray(gradient()))


@pytest.mark.parametrize("mode, suffix", [("L", ".png"), ("L", ".jpg"), ("LA", ".png"), ("P", ".png"),
                                          ("RGBA", ".png"), ("CMYK", ".jpg"), ("1", ".png")])
def test_colour_modes_become_rgb(tmp_path, mode, suffix):
    img = load_image(save(tmp_path / f"x{suffix}", gradient().convert(mode)))
    assert img.mode == "RGB" and img.size == (40, 30)


def test_grayscale_gives_equal_channels(tmp_path):
    pixels = np.asarray(load_image(save(tmp_path / "g.png", gradient().convert("L"))))
    assert pixels.shape == (30, 40, 3)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    pixels = np.asarray(load_image(save(tmp_path / "deep.png", grey)))
    assert 120 <= pixels.min() <= pixels.max() <= 135


def test_box_crop_and_clamp(tmp_path):
    path = save(tmp_path / "a.png", gradient())
    crop = load_image(path, box=(5, 4, 10, 6))
    assert crop.size == (10, 6)
    assert np.array_equal(np.asarray(crop), np.asarray(gradient())[4:10, 5:15])
    assert load_image(path, box=(-5, 20, 100, 100)).size == (40, 10)  # clamped to the image


def test_box_outside_the_image(tmp_path):
    path = save(tmp_path / "a.png", gradient())
    with pytest.raises(ImageError, match=r"face box .* outside the 40x30 image"):
        load_image(path, box=(50, 0, 10, 10))


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="zero-byte") as err:
        load_image(path)
    assert err.value.path == str(path) and str(err.value).startswith(f"{path}: ")


def test_truncated_jpeg(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        buffer, "JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated") as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match="not an image.*this is not a p"):
        load_image(path)


def test_folder_named_like_an_image(tmp_path):
    (tmp_path / "x.jpg").mkdir()
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path / "x.jpg")


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "gone.png")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(tmp_path):
    path = save(tmp_path / "locked.png", gradient())
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match="permission denied"):
            load_image(path)
    finally:
        path.chmod(0o644)


def test_image_error_pickles_for_worker_processes():
    err = pickle.loads(pickle.dumps(ImageError("/data/a.jpg", "zero-byte file")))
    assert (err.path, err.reason, str(err)) == ("/data/a.jpg", "zero-byte file", "/data/a.jpg: zero-byte file")


def test_resize_uint8(tmp_path):
    img = load_image(save(tmp_path / "a.png", gradient()))
    out = resize_uint8(img, 24)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    flat = resize_uint8(Image.new("RGB", (50, 20), (10, 200, 30)), 8)
    assert np.all(flat == np.array([10, 200, 30], dtype=np.uint8))
    assert resize_uint8(Image.new("L", (5, 5), 7), 3).shape == (3, 3, 3)


def test_permission_denied_is_reported_even_as_root(tmp_path, monkeypatch):
    # Root ignores file modes, so simulate what an unreadable file raises inside Pillow.
    path = save(tmp_path / "locked.png", gradient())

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr("featcache.images.Image.open", refuse)
    with pytest.raises(ImageError, match="permission denied"):
        load_image(path)
