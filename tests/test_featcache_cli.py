"""`featcache info` and `featcache verify`: what they report, and verify failing on a corrupted copy."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import layout_fixtures as fx
from cli.featcache_cli import main as cli
from featcache import open_store
from featcache.build import build_store
from featcache.encoders import create_encoder, fingerprint
from featcache.manifests import builtin_manifests, list_items, load_manifest
from featcache.taxonomy import CLASSES

REPO = Path(__file__).resolve().parents[1]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def flat(text: str) -> str:
    return text.replace("\n", "")


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_clip_dir):
    """rafdb (train/test) and muxspace (one skipped conflicting row) with features and 8px images."""
    base = tmp_path_factory.mktemp("cli")
    roots = {n: fx.LAYOUT_MAKERS[n](base / n) for n in ("rafdb", "muxspace")}
    out = base / "s.h5"
    for n, root in roots.items():
        r = run("build", "--dataset", n, "--root", root, "--cache", out, "--model", tiny_clip_dir, "--workers", 0,
                "--image-size", 8, "--on-error", "skip", "--quiet")
        assert r.exit_code == 0, r.output
    return out, roots


def corrupt_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copyfile(src, dst)
    with h5py.File(dst, "a") as f:
        edit(f)
    return dst


# ------------------------------------------------------------------ info
def test_info_json(store, tiny_clip_dir):
    out, roots = store
    fp = fingerprint(create_encoder(str(tiny_clip_dir)).metadata)
    r = run("info", out, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["schema_version"] == 1 and set(info["datasets"]) == {"rafdb", "muxspace"}
    for name, root in roots.items():
        d = info["datasets"][name]
        items = list_items(load_manifest(name), root, on_error="skip").items
        assert d["rows"] == len(items) and d["manifest"] == name
        assert d["manifest_sha256"] == load_manifest(name).sha256
        for split in {it.split for it in items}:
            want = {c: sum(1 for it in items if it.split == split and CLASSES[it.label] == c) for c in CLASSES}
            assert d["splits"][split] == {"total": sum(want.values()), **want}
        assert set(d["splits"]) == {it.split for it in items}
        assert d["encoders"] == {"tiny-clip": {"model": str(tiny_clip_dir), "dim": 16, "dtype": "float32",
                                               "views": ["orig", "flip"], "fingerprint": fp, "precision": "fp32",
                                               "preprocess": "clip", "aug_views": None}}
        assert d["image_sizes"] == [8]
    raf = info["datasets"]["rafdb"]
    assert raf["splits"]["train"]["total"] == 4 and raf["splits"]["test"]["total"] == 4
    assert raf["splits"]["train"]["sadness"] == 1 and raf["splits"]["test"]["surprise"] == 1
    assert raf["skipped"] == 0 and raf["skipped_items"] == []
    mux = info["datasets"]["muxspace"]
    assert mux["dropped"] == {"contempt": 1} and mux["skipped"] == 1
    (item,) = mux["skipped_items"]
    assert item["id"] == "images/Avinash_30.jpg" and item["where"].endswith("legend.csv:9")
    assert "conflicting labels" in item["reason"]


def test_info_text(store):
    out, _ = store
    r = run("info", out)
    assert r.exit_code == 0, r.output
    text = r.output
    assert "rafdb: 8 rows" in text and "muxspace: 9 rows" in text
    assert "encoder tiny-clip" in text and "dim 16" in text and "float32" in text
    assert "cached image sizes: [8]" in text and "skipped items: 1" in text and "contempt 1" in text
    for c in CLASSES:
        assert c in text


def test_info_console_script(store):
    """The installed entry point works as well as the click group."""
    out, _ = store
    exe = Path(sys.executable).with_name("featcache")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cli.featcache_cli"]
    p = subprocess.run([*cmd, "info", str(out), "--json"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["datasets"]["rafdb"]["rows"] == 8


def test_manifests_lists_every_builtin():
    r = run("manifests")
    assert r.exit_code == 0
    assert [line.split()[0] for line in r.output.splitlines()] == builtin_manifests()


# ------------------------------------------------------------------ verify
def test_verify_passes_on_a_good_store(store):
    out, _ = store
    r = run("verify", out, "--sample", 50, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "FAIL" not in r.output and "not checked" not in r.output
    assert "rafdb/tiny-clip: 8 re-encoded match" in r.output and "muxspace/tiny-clip: 9 re-encoded match" in r.output
    assert "muxspace: ids unique: 9 ids" in r.output


def _nan(f):
    f["datasets/rafdb/encoders/tiny-clip/features"][3, 1, 5] = np.nan


def _dup(f):
    ids = f["datasets/muxspace/ids"]
    ids[4] = ids.asstr()[2]


def _label(f):
    f["datasets/rafdb/labels"][1] = 9


def _drift(f):
    d = f["datasets/rafdb/encoders/tiny-clip/features"]
    d[6] = d[6] + 0.5


CORRUPTIONS = {  # edit, the check that must fail, its detail, how many checks fail
    # features edited in place also fail their row checksums (rafdb/tiny-clip: features checksums)
    "nan": (_nan, "rafdb/tiny-clip: features finite", "1 rows with NaN/inf", 3),  # and its re-encode differs
    "duplicate-id": (_dup, "muxspace: ids unique", "duplicates e.g.", 2),  # row 4 now names another image
    "bad-label": (_label, "rafdb: labels in 0..6", "1 bad, first row 1", 1),
    "features-drift": (_drift, "rafdb/tiny-clip: 8 re-encoded match", "max abs diff 5.00e-01", 2),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_verify_fails_on_a_corrupted_copy(kind, store, tmp_path):
    out, _ = store
    edit, check, detail, nfail = CORRUPTIONS[kind]
    bad = corrupt_copy(out, tmp_path / "bad.h5", edit)
    r = run("verify", bad, "--sample", 50, "--device", "cpu")
    assert r.exit_code == 1, r.output
    text = flat(r.output)
    assert f"FAIL  {check}: " in text and detail in text and f"{nfail} check(s) failed" in text
    if kind == "nan":
        assert open_store(out).dataset("rafdb").ids[3] in text  # names the row
    if kind == "duplicate-id":
        assert open_store(out).dataset("muxspace").ids[2] in text
    if kind == "bad-label":
        assert open_store(out).dataset("rafdb").ids[1] in text


def test_verify_without_root_is_not_checked_not_failed(store, tmp_path):
    out, _ = store
    r = run("verify", out, "--root", tmp_path / "gone")
    assert r.exit_code == 0, r.output
    assert "not checked" in r.output and "FAIL" not in r.output


def test_verify_a_store_of_a_user_manifest(tmp_path, tiny_clip_dir):
    """The re-encode check lists the data again from the manifest recorded in the store, not the file."""
    root = fx.make_csv(tmp_path / "data")
    manifest = tmp_path / "mine.toml"
    manifest.write_text('name = "mine"\nkind = "csv"\n[labels]\nhappy = "happiness"\n')
    out = tmp_path / "s.h5"
    build_store(out, str(manifest), root, model=str(tiny_clip_dir), workers=0, progress=False)
    manifest.unlink()
    r = run("verify", out, "--sample", 10, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "mine/tiny-clip: 3 re-encoded match" in r.output and "FAIL" not in r.output


def test_verify_and_info_on_a_missing_file(tmp_path):
    for cmd in ("info", "verify"):
        r = run(cmd, tmp_path / "nope.h5")
        assert r.exit_code == 1 and "does not exist" in flat(r.output) and str(tmp_path / "nope.h5") in flat(r.output)


# ------------------------------------------------------------------ flags shared with maskfer
def test_build_old_out_spelling_still_works_with_a_note(store, tiny_clip_dir):
    """`--cache FILE` names the store, as in maskfer; the old `--out FILE` works and says so in one line."""
    out, roots = store
    args = ["build", "--dataset", "rafdb", "--root", roots["rafdb"], "--model", tiny_clip_dir, "--workers", 0,
            "--image-size", 8, "--quiet"]
    r = CliRunner().invoke(cli, [str(a) for a in (*args, "--out", out)])
    assert r.exit_code == 0, r.output
    assert "already complete" in r.stdout and str(out) in r.stdout  # the same store, found under the old name
    assert r.stderr.strip().splitlines() == ["note: --out is now --cache here (--out always names a directory); "
                                             "the old spelling still works"]
    r = CliRunner().invoke(cli, [str(a) for a in (*args, "--cache", out)])
    assert r.exit_code == 0 and "already complete" in r.stdout and "note:" not in r.stderr
    r = CliRunner().invoke(cli, [str(a) for a in (*args, "--cache", out, "--out", out)])
    assert r.exit_code == 2 and "--out is the old name of --cache" in r.output


def test_verify_device_defaults_to_auto(store, monkeypatch):
    """--device auto (the default, as everywhere) reaches the re-encode check as a concrete device."""
    import featcache.inspection

    seen = []
    real = featcache.inspection.verify

    def spy(s, **kw):  # records the device; re-encodes on the CPU, as the store was built
        seen.append(kw["device"])
        return real(s, **{**kw, "device": "cpu"})

    monkeypatch.setattr(featcache.inspection, "verify", spy)
    out, _ = store
    r = run("verify", out, "--sample", 2)
    assert r.exit_code == 0, r.output
    assert seen == ["cuda" if torch_cuda() else "cpu"]


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
