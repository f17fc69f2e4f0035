"""featcache build --aug-views K: augmented views of the cached images, encoded and stored beside the features.

Checked against the encoder run directly on apply_params(cached image, stored row), not against the writer;
incremental (K=2 then K=4 equals K=4 at once), refusals, kill -9 mid-way, info, verify and the read API.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import layout_fixtures as fx
from cli.featcache_cli import main as cli
from featcache import StoreError, open_store
from featcache.build import BuildError, build_store
from featcache.encoders import create_encoder
from featcache.encoders.batched import input_size, tensor_preprocess
from featcache.views import OFFICIAL, PARAMS, Recipe, apply_params, image_keys, view_params

REPO = Path(__file__).resolve().parents[1]
SIZE, K = 16, 4          # cached image size; views of the reference store
KEY = "tiny-clip"


def make_root(root: Path, n: int) -> Path:
    for i in range(n):
        fx.write_image(root / ("happy", "sad", "angry")[i % 3] / f"img_{i:04d}.png", size=24)
    return root


def build(out, root, clip, **kw):
    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 5)
    kw.setdefault("log", lambda m: None)
    return build_store(out, "folders", root, model=str(clip), progress=False, device="cpu", **kw)


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def flat(text: str) -> str:
    """CLI output with runs of whitespace as one space: rich wraps long lines at a space (160 columns off a terminal)."""
    return " ".join(text.split())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("aug") / "faces", 12)


@pytest.fixture(scope="module")
def ref(tmp_path_factory, root, tiny_clip_dir) -> Path:
    """Dataset, images and K views in one build."""
    out = tmp_path_factory.mktemp("ref") / "s.h5"
    r = build(out, root, tiny_clip_dir, image_size=SIZE, aug_views=K)
    assert (r.aug_views, r.aug_added, r.aug_encoded_now) == (K, K, K * 12)
    return out


@pytest.fixture(scope="module")
def enc(tiny_clip_dir):
    return create_encoder(str(tiny_clip_dir))


# ------------------------------------------------------------------ what is stored
def test_stored_views_are_the_encoder_on_apply_params_of_the_cached_image(ref, enc):
    ds = open_store(ref).dataset("folders")
    assert ds.aug_views(KEY) == K
    feats, params = ds.aug_features(KEY), ds.aug_params(KEY)
    assert feats.shape == (12, K, 16) and feats.dtype == np.float32 and params.shape == (12, K, len(PARAMS))
    # the rows are view_params of the ids, bit for bit
    assert np.array_equal(params, view_params(image_keys(ds.ids), range(K), OFFICIAL, 0).numpy())
    p = params.reshape(-1, len(PARAMS))
    assert p[:, 0].any() and (p[:, 3] > 0).any() and (p[:, 5] >= 0).any()  # flips, erasures and noise all occur
    assert input_size(enc) == 32  # the tiny CLIP's crop size: the views are rendered at the encoder's input size
    prep = tensor_preprocess(enc)
    images = torch.from_numpy(ds.images(SIZE))
    want = np.zeros_like(feats)
    with torch.inference_mode():
        for i in range(12):           # one image, one view at a time
            for k in range(K):
                x = apply_params(images[i:i + 1], torch.from_numpy(params[i:i + 1, k]), 32, OFFICIAL.noise_std)
                want[i, k] = enc.module(prep(x))[0].numpy()
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)
    orig = ds.features(KEY)
    assert np.abs(feats[:, 0] - feats[:, 1]).max() > 1e-2 and np.abs(feats[:, 0] - orig[:, 0]).max() > 1e-2
    rec = ds.aug_recipe(KEY)
    assert rec == {**OFFICIAL.to_dict(), "seed": 0, "views": K, "image_size": SIZE, "input_size": 32}
    assert Recipe.from_dict({k: rec[k] for k in OFFICIAL.to_dict()}) == OFFICIAL


def test_read_api_rows_in_any_order_and_a_key_without_views(ref, tmp_path, root, tiny_clip_dir):
    ds = open_store(ref).dataset("folders")
    full_f, full_p = ds.aug_features(KEY), ds.aug_params(KEY)
    np.testing.assert_array_equal(ds.aug_features(KEY, [7, 1, 1]), full_f[[7, 1, 1]])
    np.testing.assert_array_equal(ds.aug_params(KEY, np.array([11, 0])), full_p[[11, 0]])
    plain = tmp_path / "plain.h5"
    build(plain, root, tiny_clip_dir, image_size=SIZE)
    ds = open_store(plain).dataset("folders")
    assert ds.aug_views(KEY) == 0 and ds.aug_recipe(KEY) is None
    with pytest.raises(StoreError, match=r"no augmented views of encoder 'tiny-clip'.*--aug-views K"):
        ds.aug_features(KEY)
    with pytest.raises(StoreError, match="no augmented views"):
        ds.aug_params(KEY, [0])


# ------------------------------------------------------------------ incremental
def test_k2_then_k4_equals_k4_at_once(ref, tmp_path, root, tiny_clip_dir):
    out = tmp_path / "s.h5"
    r = build(out, root, tiny_clip_dir, image_size=SIZE, aug_views=2)
    assert (r.aug_views, r.aug_added) == (2, 2)
    first = open_store(out).dataset("folders")
    f2, p2 = first.aug_features(KEY), first.aug_params(KEY)
    first.store.close()
    r = build(out, root, tiny_clip_dir, aug_views=K, batch_size=3)  # no --image-size: the store caches one size
    assert (r.aug_views, r.aug_added, r.aug_encoded_now, r.encoded_now) == (K, 2, 2 * 12, 0)  # only views 2, 3
    got, want = open_store(out).dataset("folders"), open_store(ref).dataset("folders")
    assert np.array_equal(got.aug_features(KEY)[:, :2], f2) and np.array_equal(got.aug_params(KEY)[:, :2], p2)
    assert np.array_equal(got.aug_params(KEY), want.aug_params(KEY))
    np.testing.assert_allclose(got.aug_features(KEY), want.aug_features(KEY), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.features(KEY), want.features(KEY))
    assert got.aug_recipe(KEY) == want.aug_recipe(KEY)
    assert not Path(f"{out}.journal").exists()


def test_fewer_views_than_stored_is_a_note(ref, tmp_path, root, tiny_clip_dir):
    out = tmp_path / "s.h5"
    shutil.copyfile(ref, out)
    before = digest(out)
    r = build(out, root, tiny_clip_dir, aug_views=2)
    assert r.up_to_date and r.aug_added == 0 and r.aug_views == K
    assert "already holds 4 augmented views" in r.aug_note and digest(out) == before
    c = run_cli("build", "--dataset", "folders", "--root", root, "--cache", out, "--model", tiny_clip_dir,
                "--workers", 0, "--quiet", "--device", "cpu", "--aug-views", 3)
    assert c.exit_code == 0, c.output
    assert "already complete (12 rows, 4 augmented views); nothing to do." in flat(c.output)
    assert "note: the store already holds 4 augmented views (>= --aug-views 3); none added" in flat(c.output)
    assert digest(out) == before


# ------------------------------------------------------------------ refusals
def test_another_seed_or_recipe_is_refused(ref, tmp_path, root, tiny_clip_dir):
    out = tmp_path / "s.h5"
    shutil.copyfile(ref, out)
    before = digest(out)
    with pytest.raises(BuildError, match=r"already holds 4 augmented views .* drawn with seed 0, .*this build asks "
                                         r"for seed 1, .*pass --aug-seed 0 to add views.*new --cache"):
        build(out, root, tiny_clip_dir, aug_views=6, aug_seed=1)
    with pytest.raises(BuildError, match=r"Views of another recipe cannot join them: build these views into a new --cache"):
        build(out, root, tiny_clip_dir, aug_views=6, aug_recipe=Recipe(erase_scale=(0.02, 0.33)))
    c = run_cli("build", "--dataset", "folders", "--root", root, "--cache", out, "--model", tiny_clip_dir,
                "--workers", 0, "--quiet", "--device", "cpu", "--aug-views", 6, "--aug-seed", 2)
    assert c.exit_code == 1 and flat(c.output).startswith("error: ") and "Traceback" not in c.output
    assert "--aug-seed 0" in flat(c.output)
    assert digest(out) == before and not Path(f"{out}.journal").exists()


def test_views_without_cached_images_are_refused(tmp_path, root, tiny_clip_dir):
    out = tmp_path / "s.h5"
    with pytest.raises(BuildError, match=r"--aug-views needs cached images .*none are being cached: add --image-size S"):
        build(out, root, tiny_clip_dir, aug_views=2)
    assert not out.exists()  # refused before anything was encoded
    build(out, root, tiny_clip_dir)
    before = digest(out)
    c = run_cli("build", "--dataset", "folders", "--root", root, "--cache", out, "--model", tiny_clip_dir,
                "--workers", 0, "--quiet", "--device", "cpu", "--aug-views", 2)
    assert c.exit_code == 1 and "Traceback" not in c.output, c.output
    assert "dataset 'folders' in" in flat(c.output) and "has none: add --image-size S to this command" in flat(c.output)
    assert digest(out) == before
    build(out, root, tiny_clip_dir, image_size=8)
    build(out, root, tiny_clip_dir, image_size=12)
    with pytest.raises(BuildError, match=r"caches images of sizes 8, 12; pass --image-size S to choose"):
        build(out, root, tiny_clip_dir, aug_views=2)
    r = build(out, root, tiny_clip_dir, aug_views=2, image_size=12)   # the size is chosen, and recorded
    assert open_store(out).dataset("folders").aug_recipe(KEY)["image_size"] == 12 and r.aug_added == 2


def test_an_encoder_without_batched_preprocessing_is_refused_before_encoding(tmp_path, root):
    out = tmp_path / "s.h5"
    with pytest.raises(BuildError, match=r"--aug-views: encoder 'plugin_encoders:tiny_encoder' records no processor "
                                         r"settings usable for batched preprocessing.*--preprocess official"):
        build_store(out, "folders", root, model="plugin_encoders:tiny_encoder", workers=0, progress=False,
                    device="cpu", image_size=SIZE, aug_views=2)
    assert not out.exists()
    r = build_store(out, "folders", root, model="plugin_encoders:tiny_encoder", workers=0, progress=False,
                    device="cpu", image_size=SIZE, aug_views=2, preprocess="official")   # batchable: it works
    assert r.aug_added == 2 and open_store(out).dataset("folders").aug_recipe("tiny-enc")["input_size"] == 16


# ------------------------------------------------------------------ kill -9
def _env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "FEATCACHE_FLUSH_SECONDS": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": path}


def _aug_shards(out: Path) -> int:
    n = 0
    for plan in Path(f"{out}.journal").glob("*/plan.json"):
        try:
            if json.loads(plan.read_text()).get("stage") == "aug-views":
                n += len(list(plan.parent.glob("shard-*[0-9].npz")))
        except (OSError, ValueError):
            pass
    return n


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kill -9 of a subprocess build")
def test_kill9_mid_view_encoding_then_rerun_equals_an_uninterrupted_build(tmp_path, tiny_clip_dir):
    root = make_root(tmp_path / "faces", 30)
    views, batch = 8, 2
    ref, out = tmp_path / "ref.h5", tmp_path / "s.h5"
    build(ref, root, tiny_clip_dir, image_size=SIZE, aug_views=views)
    build(out, root, tiny_clip_dir, image_size=SIZE)
    total = -(-30 * views // batch)
    cmd = [sys.executable, "-m", "cli.featcache_cli", "build", "--dataset", "folders", "--root", str(root),
           "--cache", str(out), "--model", str(tiny_clip_dir), "--device", "cpu", "--quiet", "--workers", "0",
           "--batch-size", str(batch), "--aug-views", str(views)]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and _aug_shards(out) < 3:
            assert time.monotonic() < deadline, "the build never started encoding views"
            time.sleep(0.002)
        assert proc.poll() is None, f"the build ended before the kill: {(tmp_path / 'stderr.txt').read_text()}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    written = _aug_shards(out)
    assert 3 <= written < total
    assert open_store(out).dataset("folders").aug_views(KEY) == 0   # the published store is untouched
    logged = []
    r = build(out, root, tiny_clip_dir, aug_views=views, batch_size=batch, log=logged.append)
    assert 0 < r.aug_resumed_from < 30 * views and r.aug_resumed_from + r.aug_encoded_now == 30 * views
    assert any(m.startswith("resuming: ") and "augmented views" in m for m in logged)
    got, want = open_store(out).dataset("folders"), open_store(ref).dataset("folders")
    assert np.array_equal(got.aug_params(KEY), want.aug_params(KEY))
    np.testing.assert_allclose(got.aug_features(KEY), want.aug_features(KEY), rtol=1e-5, atol=1e-6)
    assert not Path(f"{out}.journal").exists()
    assert not list(tmp_path.glob("s.h5.tmp-*"))


def test_a_journal_whose_views_were_committed_is_removed(ref, tmp_path, root, tiny_clip_dir):
    """Killed between the commit's rename and the journal's removal: the next build deletes the journal."""
    out = tmp_path / "s.h5"
    build(out, root, tiny_clip_dir, image_size=SIZE, aug_views=2)
    jdir = Path(f"{out}.journal")
    from featcache.journal import Journal
    with h5py.File(out, "r") as f:
        fp = f["datasets/folders/encoders/tiny-clip"].attrs["fingerprint"]
        sha = f["datasets/folders"].attrs["manifest_sha256"]
    stale = Journal(out, {"stage": "aug-views", "dataset": "folders", "manifest_sha256": sha, "encoder": fp,
                          "key": KEY, "first_view": 0, "seed": 0, "recipe": OFFICIAL.to_dict(), "image_size": SIZE})
    pending = Journal(out, {"stage": "aug-views", "dataset": "folders", "manifest_sha256": sha, "encoder": fp,
                            "key": KEY, "first_view": 2, "seed": 0, "recipe": OFFICIAL.to_dict(), "image_size": SIZE})
    for j in (stale, pending):
        j.open()
        j.write_shard(0, idx=np.arange(3))
    build(out, root, tiny_clip_dir)   # any build of the dataset looks
    assert not stale.dir.exists() and pending.dir.exists()   # the views of the second one are not in the store
    assert jdir.exists()


# ------------------------------------------------------------------ info and verify
def test_info_shows_the_views(ref):
    r = run_cli("info", ref)
    assert r.exit_code == 0, r.output
    assert "augmented views: 4 per image, rendered from the 16px cached images at 32px; seed 0, flip 0.5, erase 0.5 " \
           "(scale 0.02-0.25, ratio 0.3-3.3), noise 0.5 (std 5.48)" in flat(r.output)
    r = run_cli("info", ref, "--json")
    e = json.loads(r.output)["datasets"]["folders"]["encoders"][KEY]
    assert e["aug_views"] == {**OFFICIAL.to_dict(), "seed": 0, "views": K, "image_size": SIZE, "input_size": 32}
    assert e["preprocess"] == "clip"


def test_verify_checks_every_aug_row_and_flags_a_corrupted_one(ref, tmp_path):
    r = run_cli("verify", ref, "--sample", 0)
    assert r.exit_code == 0, r.output
    text = flat(r.output)
    for check in ("augmented views shape", "augmented views finite",
                  "augmented views params: 12 x 4 rows equal view_params of their ids (seed 0)",
                  "augmented views features checksums: 12 rows ok", "augmented views params checksums: 12 rows ok"):
        assert f"ok folders/tiny-clip: {check}" in text, check
    ids = open_store(ref).dataset("folders").ids
    bad = tmp_path / "bad.h5"
    shutil.copyfile(ref, bad)
    with h5py.File(bad, "a") as f:   # silent damage: the bytes change, the checksums do not
        d = f["datasets/folders/encoders/tiny-clip/aug_features"]
        d[5, 2] = d[5, 2] + 1e-3
        p = f["datasets/folders/encoders/tiny-clip/aug_params"]
        row = p[9, 3]
        row[0] = 1.0 - row[0]
        p[9, 3] = row
    r = run_cli("verify", bad, "--sample", 0)
    assert r.exit_code == 1, r.output
    text = flat(r.output)
    assert ("FAIL folders/tiny-clip: augmented views features checksums: 1 of 12 rows of "
            f"/datasets/folders/encoders/tiny-clip/aug_features do not match their CRC-32: rows 5 ({ids[5]})") in text
    assert "FAIL folders/tiny-clip: augmented views params checksums: 1 of 12 rows" in text and f"rows 9 ({ids[9]})" in text
    assert "FAIL folders/tiny-clip: augmented views params: 1 rows differ from view_params of their ids" in text
    assert "3 check(s) failed" in text
