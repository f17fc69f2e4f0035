"""featcache build: every built-in layout end to end with the tiny CLIP, store metadata and schema,
several datasets and encoders in one file, incremental builds, and the refusals that protect a store."""
from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import featcache
import layout_fixtures as fx
from cli.featcache_cli import main as cli
from conftest import _make_tiny_clip
from featcache import StoreError, open_store
from featcache.build import BuildError, build_store
from featcache.encoders import create_encoder, fingerprint
from featcache.images import resize_uint8
from featcache.manifests import list_items, load_manifest
from featcache.taxonomy import CLASSES

SIZE = 12  # --image-size of the all-layouts store


# ------------------------------------------------------------------ helpers
def decode(item) -> Image.Image:
    """The image as the build should see it, decoded here with plain PIL (independent of featcache.images)."""
    with Image.open(item.path) as im:
        im.load()
        rgb = im.convert("RGB")
    if item.box is not None:
        x, y, w, h = item.box
        rgb = rgb.crop((max(0, x), max(0, y), min(rgb.width, x + w), min(rgb.height, y + h)))
    return rgb


def direct_features(enc, images) -> np.ndarray:
    """(n, 2, C): the encoder run directly on each preprocessed image and on its horizontally flipped tensor."""
    pix = torch.stack([enc.preprocess(im) for im in images])
    with torch.inference_mode():
        orig, flip = enc.module(pix), enc.module(pix.flip(-1))
    return torch.stack([orig, flip], 1).numpy()


def snapshot(path: Path) -> dict[str, str]:
    """sha256 of every HDF5 object's bytes and attributes in a store, by object name."""
    out = {}
    with h5py.File(path, "r") as f:
        out["/@"] = json.dumps({k: str(v) for k, v in f.attrs.items()}, sort_keys=True)

        def visit(name, obj):
            attrs = json.dumps({k: str(v) for k, v in obj.attrs.items()}, sort_keys=True)
            data = obj[()].tobytes() if isinstance(obj, h5py.Dataset) and obj.dtype.kind != "O" else (
                repr(obj.asstr()[()].tolist()).encode() if isinstance(obj, h5py.Dataset) else b"")
            out[name] = hashlib.sha256(attrs.encode() + data).hexdigest()

        f.visititems(visit)
    return out


def file_state(path: Path):
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size, hashlib.sha256(path.read_bytes()).hexdigest()


def flat(text: str) -> str:
    """CLI output without line breaks: rich wraps long error lines at the console width when piped."""
    return text.replace("\n", "")


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def quick_build(out, dataset, root, model, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("progress", False)
    kw.setdefault("device", "cpu")
    return build_store(out, dataset, root, model=str(model), **kw)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("layouts")
    return {name: make(base / name) for name, make in fx.LAYOUT_MAKERS.items()}


@pytest.fixture(scope="module")
def enc(tiny_clip_dir):
    return create_encoder(str(tiny_clip_dir))


@pytest.fixture(scope="module")
def all_store(tmp_path_factory, roots, tiny_clip_dir):
    """Every built-in manifest's fixture built into ONE store through the CLI, with images."""
    out = tmp_path_factory.mktemp("store") / "all.h5"
    outputs = {}
    for i, name in enumerate(fx.LAYOUT_MAKERS):
        # --device auto is the CPU here; where CUDA exists it would compute in fp16, so stay on the CPU there
        device = "auto" if name == "csv" and not torch.cuda.is_available() else "cpu"
        args = ["build", "--dataset", name, "--root", roots[name], "--cache", out, "--model", tiny_clip_dir,
                "--batch-size", 3, "--device", device, "--workers", 1 if name == "affectnet" else 0,
                "--image-size", SIZE, "--quiet"]
        if name == "muxspace":  # the fixture lists one image twice with conflicting labels
            args += ["--on-error", "skip"]
        r = run_cli(*args)
        assert r.exit_code == 0, f"{name}: {r.output}"
        outputs[name] = r.output
    return out, outputs


# ------------------------------------------------------------------ every layout end to end
@pytest.mark.parametrize("name", sorted(fx.LAYOUT_MAKERS))
def test_every_builtin_manifest_builds_with_tiny_clip(name, all_store, roots, enc):
    out, outputs = all_store
    listing = list_items(load_manifest(name), roots[name], on_error="skip")
    items = listing.items
    ds = open_store(out).dataset(name)

    # rows = listed items, in listing order
    assert ds.ids.tolist() == [it.id for it in items]
    assert ds.labels.tolist() == [it.label for it in items]
    assert ds.splits.tolist() == [it.split for it in items]
    assert dict(Counter(ds.splits.tolist())) == fx.EXPECTED[name][0]  # independent of list_items
    assert ds.attrs["dropped"] == fx.EXPECTED[name][1]
    assert len(ds.skipped) == fx.EXPECTED[name][2]
    assert f"{len(items)} rows" in outputs[name]

    # features: (N, 2, C), view 0 = encoder(image), view 1 = encoder(flipped preprocessed tensor)
    feats = ds.features("tiny-clip")
    assert feats.shape == (len(items), 2, enc.dim) and feats.dtype == np.float32
    want = direct_features(enc, [decode(it) for it in items])
    np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(feats[:, 0], feats[:, 1], atol=1e-3)  # the flip really is another view
    np.testing.assert_array_equal(ds.features("tiny-clip", views=("flip",))[:, 0], feats[:, 1])

    # --image-size: (N, S, S, 3) uint8 equal to resize_uint8 of the decoded image
    imgs = ds.images(SIZE)
    assert imgs.shape == (len(items), SIZE, SIZE, 3) and imgs.dtype == np.uint8
    np.testing.assert_array_equal(imgs, np.stack([resize_uint8(decode(it), SIZE) for it in items]))


def test_all_datasets_side_by_side_in_one_file(all_store):
    out, _ = all_store
    s = open_store(out)
    assert s.datasets() == sorted(fx.LAYOUT_MAKERS)
    for name in s.datasets():
        ds = s.dataset(name)
        assert ds.encoders() == ["tiny-clip"] and ds.image_sizes() == [SIZE]


def test_affectnet_face_box_is_cropped(all_store, roots, enc):
    out, _ = all_store
    ds = open_store(out).dataset("affectnet")
    items = {it.id: it for it in list_items(load_manifest("affectnet"), roots["affectnet"]).items}
    row = int(np.flatnonzero(ds.ids == "Manually_Annotated_Images/689/a0.jpg")[0])
    item = items["Manually_Annotated_Images/689/a0.jpg"]
    assert item.box == (2, 3, 20, 22)
    with Image.open(item.path) as im:
        full = im.convert("RGB")
    crop = full.crop((2, 3, 22, 25))
    np.testing.assert_array_equal(ds.images(SIZE, [row])[0], resize_uint8(crop, SIZE))
    assert not np.array_equal(ds.images(SIZE, [row])[0], resize_uint8(full, SIZE))
    stored = ds.features("tiny-clip", [row])
    np.testing.assert_allclose(stored, direct_features(enc, [crop]), rtol=1e-5, atol=1e-5)
    assert not np.allclose(stored, direct_features(enc, [full]), atol=1e-3)


def test_user_manifest_file_works_like_a_builtin(tmp_path, tiny_clip_dir, enc):
    root = tmp_path / "lab"
    rows = [("a.jpg", "train", "smile"), ("b.jpg", "test", "frown"), ("c.png", "train", "Sad"),
            ("d.jpg", "test", "neutral")]
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "list.tsv").write_text("".join(f"{n}\t{s}\t{lab}\n" for n, s, lab in rows))
    for n, _, _ in rows:
        fx.write_image(root / "pics" / n, size=20)
    manifest = tmp_path / "manifests" / "my_faces.toml"
    manifest.parent.mkdir()
    manifest.write_text('name = "my-faces"\nkind = "csv"\n\n[params]\nfile = "meta/list.tsv"\nimage_column = 0\n'
                        'split_column = 1\nlabel_column = 2\nimage_dir = "pics"\ndelimiter = "\\t"\n'
                        'has_header = false\n\n[labels]\nsmile = "happiness"\nfrown = "sadness"\n')
    out = tmp_path / "f.h5"
    r = run_cli("build", "--dataset", manifest, "--root", root, "--cache", out, "--model", tiny_clip_dir,
                "--workers", 0, "--device", "cpu", "--image-size", 8, "--quiet")
    assert r.exit_code == 0, r.output
    ds = open_store(out).dataset("my-faces")
    assert ds.ids.tolist() == ["pics/b.jpg", "pics/d.jpg", "pics/a.jpg", "pics/c.png"]
    assert [CLASSES[i] for i in ds.labels] == ["sadness", "neutral", "happiness", "sadness"]
    assert ds.splits.tolist() == ["test", "test", "train", "train"]
    assert ds.attrs["manifest_sha256"] == load_manifest(str(manifest)).sha256
    assert ds.attrs["manifest"]["params"]["delimiter"] == "\t"
    items = list_items(load_manifest(str(manifest)), root).items
    np.testing.assert_allclose(ds.features("tiny-clip"), direct_features(enc, [decode(it) for it in items]),
                               rtol=1e-5, atol=1e-5)
    # --param overrides apply to a user manifest too (a different listing -> a different dataset)
    r = run_cli("build", "--dataset", manifest, "--root", root, "--cache", out, "--model", tiny_clip_dir,
                "--workers", 0, "--param", "has_header=true", "--name", "my-faces-hdr", "--quiet")
    assert r.exit_code == 0, r.output
    assert open_store(out).dataset("my-faces-hdr").ids.tolist() == ["pics/b.jpg", "pics/d.jpg", "pics/c.png"]  # row 1 = header


# ------------------------------------------------------------------ metadata and schema
def test_store_metadata_records_provenance(all_store, tiny_clip_dir, enc):
    out, _ = all_store
    s = open_store(out)
    assert s.attrs["schema"] == "featcache" and int(s.attrs["schema_version"]) == 1
    assert s.attrs["tool_version"] == featcache.__version__
    ds = s.dataset("ferplus")
    info = ds.encoder_info("tiny-clip")
    meta = info["metadata"]
    assert meta["model"] == str(tiny_clip_dir) and info["spec"] == str(tiny_clip_dir)
    assert meta["revision"].startswith("sha256:") and len(meta["revision"]) == 7 + 64
    assert meta["revision"] == enc.metadata["revision"]
    assert meta["processor"]["crop_size"] == {"height": 32, "width": 32}
    assert meta["processor"]["size"] == {"shortest_edge": 32}
    assert meta["processor"]["image_mean"] == enc.metadata["processor"]["image_mean"]
    assert info["dim"] == 16 and info["shape"] == (len(ds), 2, 16)
    assert info["dtype"] == "float32" and info["views"] == ["orig", "flip"]
    assert info["fingerprint"] == fingerprint(enc.metadata)
    assert info["tool_version"] == featcache.__version__ and info["compute_precision"] == "fp32"
    m = load_manifest("ferplus")
    assert ds.attrs["manifest_sha256"] == m.sha256 and ds.manifest_name == "ferplus"
    assert ds.attrs["manifest"]["kind"] == "ferplus" and ds.attrs["manifest"]["params"] == m.params
    assert ds.attrs["tool_version"] == featcache.__version__
    assert ds.class_names == list(CLASSES)
    assert Path(ds.root).name == "ferplus"


def test_readers_check_the_schema(all_store, tmp_path, roots, tiny_clip_dir):
    out, _ = all_store
    other = tmp_path / "v2.h5"
    shutil.copyfile(out, other)
    with h5py.File(other, "a") as f:
        f.attrs["schema_version"] = 2
    with pytest.raises(StoreError, match=r"schema v2; this featcache reads v1"):
        open_store(other)
    with pytest.raises(StoreError, match=r"schema v2"):
        quick_build(other, "csv", roots["csv"], tiny_clip_dir)

    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(StoreError, match="not a featcache store") as e:
        open_store(plain)
    assert str(plain) in str(e.value)
    before = file_state(plain)
    with pytest.raises(StoreError, match="not a featcache store"):
        quick_build(plain, "csv", roots["csv"], tiny_clip_dir)
    assert file_state(plain) == before  # never overwritten

    noversion = tmp_path / "noversion.h5"
    with h5py.File(noversion, "w") as f:
        f.attrs["schema"] = "featcache"
    with pytest.raises(StoreError, match="schema_version"):
        open_store(noversion)

    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(StoreError, match="cannot open feature store"):
        open_store(text)
    with pytest.raises(BuildError, match="not a readable HDF5 file"):
        quick_build(text, "csv", roots["csv"], tiny_clip_dir)
    r = run_cli("info", plain)
    assert r.exit_code == 1 and "not a featcache store" in flat(r.output) and str(plain) in flat(r.output)


# ------------------------------------------------------------------ incremental builds
def test_identical_build_is_up_to_date_and_leaves_the_file_alone(tmp_path, roots, tiny_clip_dir):
    out = tmp_path / "s.h5"
    first = quick_build(out, "rafdb", roots["rafdb"], tiny_clip_dir, image_size=8)
    assert not first.up_to_date and first.encoded_now == 8 and first.rows == 8
    before = file_state(out)
    again = quick_build(out, "rafdb", roots["rafdb"], tiny_clip_dir, image_size=8)
    assert again.up_to_date and again.encoded_now == 0 and again.rows == 8
    assert file_state(out) == before
    r = run_cli("build", "--dataset", "rafdb", "--root", roots["rafdb"], "--cache", out, "--model", tiny_clip_dir,
                "--workers", 0, "--quiet")
    assert r.exit_code == 0 and "already complete" in r.output and "(8 rows)" in r.output
    assert file_state(out) == before
    assert not Path(f"{out}.journal").exists()


def test_adding_image_size_later_adds_images_only(tmp_path, roots, tiny_clip_dir, monkeypatch):
    out = tmp_path / "s.h5"
    quick_build(out, "sfew", roots["sfew"], tiny_clip_dir)
    quick_build(out, "csv", roots["csv"], tiny_clip_dir)
    before = snapshot(out)
    with h5py.File(out, "r") as f:
        raw = f["datasets/sfew/encoders/tiny-clip/features"][()].tobytes()

    def no_encoding(*a, **k):
        raise AssertionError("features were re-encoded")

    monkeypatch.setattr("featcache.build.encode_views", no_encoding)
    rep = quick_build(out, "sfew", roots["sfew"], tiny_clip_dir, image_size=10, batch_size=4)
    assert not rep.up_to_date and rep.rows == 21 and rep.encoded_now == 21 and rep.resumed_from == 0
    with h5py.File(out, "r") as f:
        assert f["datasets/sfew/encoders/tiny-clip/features"][()].tobytes() == raw
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing already there changed
    assert set(after) - set(before) == {"datasets/sfew/images/10", "datasets/sfew/images_crc32/10"}  # + checksums
    ds = open_store(out).dataset("sfew")
    items = list_items(load_manifest("sfew"), roots["sfew"]).items
    np.testing.assert_array_equal(ds.images(10), np.stack([resize_uint8(decode(it), 10) for it in items]))
    assert quick_build(out, "sfew", roots["sfew"], tiny_clip_dir, image_size=10).up_to_date


def test_several_datasets_and_encoders_nothing_lost(tmp_path, roots, tiny_clip_dir, enc):
    clip_b = _make_tiny_clip(tmp_path / "tiny-clip-b", seed=1)
    enc_b = create_encoder(str(clip_b))
    assert fingerprint(enc_b.metadata) != fingerprint(enc.metadata)
    out = tmp_path / "s.h5"
    quick_build(out, "rafdb", roots["rafdb"], tiny_clip_dir, image_size=8)
    quick_build(out, "mma", roots["mma"], tiny_clip_dir)
    snap1 = snapshot(out)

    rep = quick_build(out, "rafdb", roots["rafdb"], clip_b)  # a second encoder for an existing dataset
    assert rep.encoder_key == "tiny-clip-b" and rep.encoded_now == 8
    snap2 = snapshot(out)
    assert {k: v for k, v in snap2.items() if k in snap1} == snap1
    assert {k.rsplit("/", 1)[0] for k in set(snap2) - set(snap1)} == {"datasets/rafdb/encoders",
                                                                       "datasets/rafdb/encoders/tiny-clip-b"}

    quick_build(out, "ckplus", roots["ckplus"], clip_b)  # a third dataset, with the second encoder only
    snap3 = snapshot(out)
    assert {k: v for k, v in snap3.items() if k in snap2} == snap2

    s = open_store(out)
    assert s.datasets() == ["ckplus", "mma", "rafdb"]
    ds = s.dataset("rafdb")
    assert ds.encoders() == ["tiny-clip", "tiny-clip-b"] and ds.image_sizes() == [8]
    assert s.dataset("mma").encoders() == ["tiny-clip"] and s.dataset("ckplus").encoders() == ["tiny-clip-b"]
    items = list_items(load_manifest("rafdb"), roots["rafdb"]).items
    images = [decode(it) for it in items]
    np.testing.assert_allclose(ds.features("tiny-clip"), direct_features(enc, images), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.features("tiny-clip-b"), direct_features(enc_b, images), rtol=1e-5, atol=1e-5)
    assert not np.allclose(ds.features("tiny-clip"), ds.features("tiny-clip-b"), atol=1e-3)
    assert ds.encoder_info("tiny-clip-b")["fingerprint"] == fingerprint(enc_b.metadata)
    assert not Path(f"{out}.journal").exists()


def test_other_encoder_under_same_key_is_refused(tmp_path, roots, tiny_clip_dir):
    out = tmp_path / "s.h5"
    quick_build(out, "csv", roots["csv"], tiny_clip_dir)
    before = file_state(out)
    other_weights = _make_tiny_clip(tmp_path / "w" / "tiny-clip", seed=1)  # same folder name -> same key
    other_proc = tmp_path / "p" / "tiny-clip"
    shutil.copytree(tiny_clip_dir, other_proc)
    cfg = json.loads((other_proc / "preprocessor_config.json").read_text())
    cfg["image_mean"] = [0.5, 0.5, 0.5]
    (other_proc / "preprocessor_config.json").write_text(json.dumps(cfg))
    for model in (other_weights, other_proc):
        with pytest.raises(BuildError) as e:
            quick_build(out, "csv", roots["csv"], model)
        msg = str(e.value)
        assert "--encoder-key" in msg and "'tiny-clip'" in msg and str(out) in msg
        assert file_state(out) == before
    r = run_cli("build", "--dataset", "csv", "--root", roots["csv"], "--cache", out, "--model", other_proc,
                "--workers", 0, "--quiet")
    assert r.exit_code == 1 and "--encoder-key" in flat(r.output)

    # the same copy of the weights elsewhere is the same encoder: nothing to do
    same = tmp_path / "copy" / "tiny-clip"
    shutil.copytree(tiny_clip_dir, same)
    assert quick_build(out, "csv", roots["csv"], same).up_to_date

    rep = quick_build(out, "csv", roots["csv"], other_proc, encoder_key="tiny-clip-mean05")
    assert rep.encoded_now == 3
    ds = open_store(out).dataset("csv")
    assert ds.encoders() == ["tiny-clip", "tiny-clip-mean05"]
    assert not np.allclose(ds.features("tiny-clip"), ds.features("tiny-clip-mean05"), atol=1e-4)


def test_other_manifest_for_existing_dataset_suggests_name(tmp_path, roots, tiny_clip_dir):
    out = tmp_path / "s.h5"
    quick_build(out, "ferplus", roots["ferplus"], tiny_clip_dir)
    before = file_state(out)
    with pytest.raises(BuildError) as e:
        quick_build(out, "ferplus", roots["ferplus"], tiny_clip_dir, params={"vote_rule": "plurality"})
    assert "--name" in str(e.value) and "different manifest" in str(e.value) and "'ferplus'" in str(e.value)
    assert file_state(out) == before
    r = run_cli("build", "--dataset", "ferplus", "--root", roots["ferplus"], "--cache", out, "--model", tiny_clip_dir,
                "--param", "vote_rule=plurality", "--workers", 0, "--quiet")
    assert r.exit_code == 1 and "--name" in flat(r.output)
    r = run_cli("build", "--dataset", "ferplus", "--root", roots["ferplus"], "--cache", out, "--model", tiny_clip_dir,
                "--param", "vote_rule=plurality", "--name", "ferplus-plurality", "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    s = open_store(out)
    assert s.datasets() == ["ferplus", "ferplus-plurality"]
    assert len(s.dataset("ferplus")) == 7 and len(s.dataset("ferplus-plurality")) == 8
    assert s.dataset("ferplus-plurality").attrs["manifest"]["params"]["vote_rule"] == "plurality"


def test_cuda_without_cuda_is_a_clear_error(tmp_path, roots, tiny_clip_dir):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(BuildError, match="no CUDA device"):
        quick_build(tmp_path / "s.h5", "csv", roots["csv"], tiny_clip_dir, device="cuda")
    assert not (tmp_path / "s.h5").exists()
