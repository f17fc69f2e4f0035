"""featcache build on the real data (../shared/data/fer, or FER_DATA_DIR) with the tiny CLIP:
all of muxspace, and FERPlus restricted to its Test split by a user-written manifest."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.featcache_cli import main as cli
from featcache import open_store
from featcache.encoders import create_encoder
from featcache.images import load_image
from featcache.manifests import list_items, load_manifest
from featcache.taxonomy import CLASSES

pytestmark = pytest.mark.realdata


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def per_split_and_class(items) -> dict:
    out = {}
    for split in sorted({it.split for it in items}):
        c = Counter(CLASSES[it.label] for it in items if it.split == split)
        out[split] = {"total": sum(c.values()), **{k: c.get(k, 0) for k in CLASSES}}
    return out


def check_against_listing(out, name, listing, info, enc):
    items = listing.items
    ds = open_store(out).dataset(name)
    assert ds.ids.tolist() == [it.id for it in items]
    assert ds.labels.tolist() == [it.label for it in items]
    assert ds.splits.tolist() == [it.split for it in items]
    d = info["datasets"][name]
    assert d["rows"] == len(items) and d["splits"] == per_split_and_class(items)
    assert d["encoders"]["tiny-clip"]["dim"] == 16 and d["dropped"] == listing.dropped
    feats = ds.features("tiny-clip")
    assert feats.shape == (len(items), 2, 16) and np.isfinite(feats).all()
    rows = np.random.default_rng(0).choice(len(items), 4, replace=False)  # spot-check against the encoder
    pix = torch.stack([enc.preprocess(load_image(items[i].path, items[i].box)) for i in rows])
    with torch.inference_mode():
        want = torch.stack([enc.module(pix), enc.module(pix.flip(-1))], 1).numpy()
    np.testing.assert_allclose(feats[rows], want, rtol=1e-5, atol=1e-5)
    return ds


def test_muxspace_full_build_records_the_conflicting_duplicate(fer_data_dir, tmp_path, tiny_clip_dir):
    root = fer_data_dir / "muxspace"
    out = tmp_path / "mux.h5"
    r = run("build", "--dataset", "muxspace", "--root", root, "--cache", out, "--model", tiny_clip_dir,
            "--workers", 1, "--batch-size", 128, "--device", "cpu", "--on-error", "skip", "--quiet")
    assert r.exit_code == 0, r.output
    assert "2315 rows" in r.output and "skipped 1 item(s)" in r.output and "Avinash_30.jpg" in r.output
    listing = list_items(load_manifest("muxspace"), root, on_error="skip")
    assert len(listing.items) == 2315
    info = json.loads(run("info", out, "--json").output)
    ds = check_against_listing(out, "muxspace", listing, info, create_encoder(str(tiny_clip_dir)))
    assert len(ds) == 2315 and info["datasets"]["muxspace"]["splits"]["all"]["total"] == 2315
    assert ds.attrs["dropped"]["contempt"] == 9
    (sid, where, reason), = ds.skipped
    assert sid == "images/Avinash_30.jpg" and "conflicting labels" in reason
    assert "legend.csv:1905 says SURPRISE" in reason and "legend.csv:1911 says SADNESS" in reason
    assert info["datasets"]["muxspace"]["skipped_items"] == [{"id": sid, "where": where, "reason": reason}]


def test_ferplus_test_split_through_a_user_manifest(fer_data_dir, tmp_path, tiny_clip_dir):
    root = fer_data_dir / "ferplus"
    manifest = tmp_path / "ferplus_test.toml"
    manifest.write_text('name = "ferplus-test"\nkind = "ferplus"\n'
                        'description = "FERPlus PrivateTest only (majority vote)"\n\n'
                        '[params.folders]\ntest = "data/FER2013Test"\n')
    out = tmp_path / "fer.h5"
    r = run("build", "--dataset", manifest, "--root", root, "--cache", out, "--model", tiny_clip_dir,
            "--workers", 1, "--batch-size", 256, "--device", "cpu", "--quiet")
    assert r.exit_code == 0, r.output
    listing = list_items(load_manifest(str(manifest)), root)
    full = list_items(load_manifest("ferplus"), root)
    test_items = [it for it in full.items if it.split == "test"]
    assert listing.items == test_items and 3000 < len(test_items) < 3573  # the same rows the built-in lists
    info = json.loads(run("info", out, "--json").output)
    ds = check_against_listing(out, "ferplus-test", listing, info, create_encoder(str(tiny_clip_dir)))
    assert ds.split_names() == ["test"] and ds.skipped == []
    assert info["datasets"]["ferplus-test"]["splits"]["test"]["total"] == len(test_items)
