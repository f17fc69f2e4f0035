"""Bad input: every kind of broken image or label row gets a message naming the file or row with
--on-error fail, and is recorded in the store (and printed) with --on-error skip."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import layout_fixtures as fx
from cli.featcache_cli import main as cli
from featcache import open_store
from featcache.build import BuildError, build_store
from featcache.manifests import ManifestError


def flat(text: str) -> str:
    """CLI output without line breaks: rich wraps long paths at the console width when piped."""
    return text.replace("\n", "")


def cli_build(dataset, root, out, model, *extra):
    args = ["build", "--dataset", dataset, "--root", root, "--cache", out, "--model", model, "--workers", 0,
            "--device", "cpu", "--batch-size", 2, "--quiet", *extra]
    return CliRunner().invoke(cli, [str(a) for a in args])


def lib_build(out, dataset, root, model, **kw):
    kw.setdefault("workers", 0)
    return build_store(out, dataset, root, model=str(model), progress=False, device="cpu", **kw)


# ------------------------------------------------------------------ images that cannot be decoded
def _zero_byte(root: Path) -> Path:
    p = root / "happy" / "happy_000.jpg"
    p.write_bytes(b"")
    return p


def _truncated(root: Path) -> Path:
    p = root / "Sad" / "sad_001.jpg"
    p.write_bytes(p.read_bytes()[:300])
    return p


def _not_an_image(root: Path) -> Path:
    p = root / "neutral" / "notes.jpg"
    p.write_text("these are my notes, not a JPEG\n")
    return p


BAD_IMAGES = {"zero-byte": (_zero_byte, "zero-byte file"), "truncated": (_truncated, "truncated or corrupt"),
              "non-image": (_not_an_image, "not an image")}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_image_fails_naming_the_file(kind, tmp_path, tiny_clip_dir):
    root = fx.make_folders(tmp_path / "data")
    bad = BAD_IMAGES[kind][0](root)
    out = tmp_path / "s.h5"
    with pytest.raises(BuildError) as e:
        lib_build(out, "folders", root, tiny_clip_dir)
    msg = str(e.value)
    assert str(bad) in msg and BAD_IMAGES[kind][1] in msg and "--on-error skip" in msg
    assert not out.exists()  # nothing half-built is ever published
    r = cli_build("folders", root, out, tiny_clip_dir)
    assert r.exit_code == 1 and str(bad) in flat(r.output) and "error:" in r.output


def test_bad_images_are_skipped_recorded_and_printed(tmp_path, tiny_clip_dir):
    root = fx.make_folders(tmp_path / "data")
    bad = {kind: make(root) for kind, (make, _) in BAD_IMAGES.items()}
    out = tmp_path / "s.h5"
    r = cli_build("folders", root, out, tiny_clip_dir, "--on-error", "skip", "--image-size", 8)
    assert r.exit_code == 0, r.output
    assert "skipped 3 item(s)" in r.output
    for kind, path in bad.items():
        assert f"{path}: " in r.output and BAD_IMAGES[kind][1] in r.output
    ds = open_store(out).dataset("folders")
    good = 9 - 3  # 8 fixture images + notes.jpg, 3 of them broken
    assert len(ds) == good and ds.features("tiny-clip").shape == (good, 2, 16) and ds.images(8).shape[0] == good
    skipped = {sid: (where, reason) for sid, where, reason in ds.skipped}
    assert set(skipped) == {p.relative_to(root).as_posix() for p in bad.values()}
    for kind, path in bad.items():
        where, reason = skipped[path.relative_to(root).as_posix()]
        assert where == str(path) and BAD_IMAGES[kind][1] in reason
    assert not set(skipped) & set(ds.ids.tolist())
    assert np.isfinite(ds.features("tiny-clip")).all()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_fails_naming_it(tmp_path, tiny_clip_dir):
    root = fx.make_folders(tmp_path / "data")
    p = root / "happy" / "happy_001.jpg"
    p.chmod(0)
    with pytest.raises(BuildError, match="permission denied") as e:
        lib_build(tmp_path / "s.h5", "folders", root, tiny_clip_dir)
    assert str(p) in str(e.value)


def test_folder_named_like_an_image_in_a_label_file(tmp_path, tiny_clip_dir):
    root = fx.make_csv(tmp_path / "data")
    (root / "img" / "x.jpg").mkdir()
    with open(root / "labels.csv", "a") as f:
        f.write("img/x.jpg,happy\n")
    out = tmp_path / "s.h5"
    with pytest.raises(ManifestError) as e:
        lib_build(out, "csv", root, tiny_clip_dir)
    assert f"{root / 'labels.csv'}:6" in str(e.value) and "img/x.jpg" in str(e.value)
    r = cli_build("csv", root, out, tiny_clip_dir, "--on-error", "skip")
    assert r.exit_code == 0 and "skipped 1 item(s)" in r.output and "img/x.jpg" in r.output
    ds = open_store(out).dataset("csv")
    assert len(ds) == 3 and [s[0] for s in ds.skipped] == ["img/x.jpg"]
    assert ds.skipped[0][1] == f"{root / 'labels.csv'}:6"


# ------------------------------------------------------------------ label rows
def _missing_image(root: Path):
    (root / "Image" / "aligned" / "train_00002_aligned.jpg").unlink()
    return "rafdb", f"{root / 'EmoLabel' / 'list_patition_label.txt'}:2", "Image/aligned/train_00002_aligned.jpg", 7


def _conflicting_duplicate(root: Path):
    return "muxspace", f"{root / 'data' / 'legend.csv'}:9", "images/Avinash_30.jpg", 9


def _unknown_label(root: Path):
    fx.write_image(root / "img" / "e.jpg")
    with open(root / "labels.csv", "a") as f:
        f.write("img/e.jpg,smirk\n")
    return "csv", f"{root / 'labels.csv'}:6", "img/e.jpg", 3


BAD_ROWS = {"missing-image": _missing_image, "conflicting-duplicate": _conflicting_duplicate,
            "unknown-label": _unknown_label}
REASON = {"missing-image": "is missing", "conflicting-duplicate": "conflicting labels",
          "unknown-label": "unknown label 'smirk'"}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_label_rows(kind, tmp_path, tiny_clip_dir):
    name = {"missing-image": "rafdb", "conflicting-duplicate": "muxspace", "unknown-label": "csv"}[kind]
    root = fx.LAYOUT_MAKERS[name](tmp_path / "data")
    dataset, where, item_id, rows = BAD_ROWS[kind](root)
    out = tmp_path / "s.h5"

    with pytest.raises(ManifestError) as e:
        lib_build(out, dataset, root, tiny_clip_dir)
    msg = str(e.value)
    assert msg.startswith(where + ":") and REASON[kind] in msg and "--on-error skip" in msg
    assert not out.exists()
    r = cli_build(dataset, root, out, tiny_clip_dir)
    assert r.exit_code == 1 and where in flat(r.output)

    r = cli_build(dataset, root, out, tiny_clip_dir, "--on-error", "skip")
    assert r.exit_code == 0, r.output
    assert "skipped 1 item(s)" in r.output and f"  {where}: " in r.output and REASON[kind] in r.output
    ds = open_store(out).dataset(dataset)
    assert len(ds) == rows and item_id not in ds.ids.tolist()
    (sid, swhere, sreason), = ds.skipped
    assert (sid, swhere) == (item_id, where) and REASON[kind] in sreason
    if kind == "conflicting-duplicate":  # both rows are named
        assert f"{root / 'data' / 'legend.csv'}:12 says SADNESS" in sreason and "says SURPRISE" in sreason


def test_wrong_root(tmp_path, tiny_clip_dir):
    out = tmp_path / "s.h5"
    nowhere = tmp_path / "no" / "such" / "dir"
    with pytest.raises(ManifestError) as e:
        lib_build(out, "rafdb", nowhere, tiny_clip_dir)
    assert str(nowhere) in str(e.value) and "not a folder" in str(e.value)
    r = cli_build("rafdb", nowhere, out, tiny_clip_dir)
    assert r.exit_code == 1 and str(nowhere) in flat(r.output)

    other = fx.make_csv(tmp_path / "csvdata")  # a real folder, but not RAF-DB
    with pytest.raises(ManifestError) as e:
        lib_build(out, "rafdb", other, tiny_clip_dir)
    assert "EmoLabel/list_patition_label.txt" in str(e.value) and str(other) in str(e.value)
    r = cli_build("rafdb", other, out, tiny_clip_dir, "--on-error", "skip")  # skip does not hide a wrong root
    assert r.exit_code == 1 and "EmoLabel/list_patition_label.txt" in flat(r.output)
    assert not out.exists()


# ------------------------------------------------------------------ a failure part-way keeps the work done
def test_failure_keeps_encoded_batches_and_skip_resumes(tmp_path, tiny_clip_dir):
    root = fx.make_folders(tmp_path / "data")
    clean = tmp_path / "clean"
    shutil.copytree(root, clean)
    bad = root / "neutral" / "neutral_001.jpg"  # the last item in listing order
    bad.write_bytes(b"")
    shutil.copyfile(bad, clean / "neutral" / "neutral_001.jpg")
    out = tmp_path / "s.h5"

    with pytest.raises(BuildError) as e:  # default flush interval: the kept batches are flushed on the way out
        lib_build(out, "folders", root, tiny_clip_dir, batch_size=2)
    assert str(bad) in str(e.value) and "encoded so far are kept" in str(e.value)
    assert not out.exists()
    shards = sorted(Path(f"{out}.journal").glob("*/shard-*.npz"))
    assert shards, "the encoded batches were not kept"
    assert sum(len(np.load(p)["idx"]) for p in shards) == 6

    rep = lib_build(out, "folders", root, tiny_clip_dir, batch_size=2, on_error="skip")
    assert rep.resumed_from == 6 and rep.encoded_now == 1 and rep.encoded_now < 8 and rep.rows == 7
    assert [s[0] for s in rep.skipped] == ["neutral/neutral_001.jpg"]
    assert not Path(f"{out}.journal").exists()

    ref = tmp_path / "ref.h5"  # the same data built in one go
    lib_build(ref, "folders", clean, tiny_clip_dir, batch_size=3, on_error="skip")
    a, b = open_store(out).dataset("folders"), open_store(ref).dataset("folders")
    assert a.ids.tolist() == b.ids.tolist() and a.labels.tolist() == b.labels.tolist()
    np.testing.assert_allclose(a.features("tiny-clip"), b.features("tiny-clip"), rtol=1e-6, atol=1e-6)
    assert [s[0] for s in a.skipped] == [s[0] for s in b.skipped] == ["neutral/neutral_001.jpg"]


def test_a_dataset_whose_every_image_fails_is_a_clear_error_not_an_empty_group(tmp_path, tiny_clip_dir):
    from featcache.build import BuildError, build_store

    root = tmp_path / "broken"
    for cls in ("happy", "sad"):
        (root / cls).mkdir(parents=True)
        (root / cls / "a.jpg").write_bytes(b"")  # zero-byte: undecodable
    out = tmp_path / "f.h5"
    with pytest.raises(BuildError, match="no image of 'folders' could be encoded"):
        build_store(out, "folders", root, model=tiny_clip_dir, on_error="skip", progress=False, workers=0)
    assert not out.exists()
