"""The read API maskfer uses: open_store -> dataset -> rows, splits, features, images; errors that
name what exists; pickling, DataLoader workers and several readers at once."""
from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import layout_fixtures as fx
from featcache import StoreError, open_store
from featcache.build import build_store
from featcache.manifests import list_items, load_manifest
from featcache.store import DatasetView, Store

REPO = Path(__file__).resolve().parents[1]
KEY = "tiny-clip"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_clip_dir):
    base = tmp_path_factory.mktemp("read")
    roots = {n: fx.LAYOUT_MAKERS[n](base / n) for n in ("rafdb", "folders", "csv")}
    out = base / "s.h5"
    for n in ("rafdb", "folders"):
        build_store(out, n, roots[n], model=str(tiny_clip_dir), workers=0, progress=False, image_size=8)
    with h5py.File(out, "r") as f:  # ground truth straight from the file
        truth = {n: {"feats": f[f"datasets/{n}/encoders/{KEY}/features"][()], "images": f[f"datasets/{n}/images/8"][()]}
                 for n in ("rafdb", "folders")}
    return out, roots, truth


def test_rows_match_the_listing(built):
    out, roots, _ = built
    s = open_store(out)
    assert s.datasets() == ["folders", "rafdb"]
    for name in ("rafdb", "folders"):
        ds = s.dataset(name)
        items = list_items(load_manifest(name), roots[name]).items
        assert len(ds) == len(items)
        assert ds.ids.dtype.kind in "UO" and ds.ids.tolist() == [it.id for it in items]
        assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [it.label for it in items]
        assert ds.splits.tolist() == [it.split for it in items]
        assert ds.encoders() == [KEY] and ds.image_sizes() == [8] and ds.manifest_name == name
        assert ds.index_of([items[2].id, items[0].id]).tolist() == [2, 0]


def test_indices_per_split(built):
    out, _, _ = built
    raf = open_store(out).dataset("rafdb")
    assert raf.split_names() == ["test", "train"]
    np.testing.assert_array_equal(raf.indices("test"), [0, 1, 2, 3])
    np.testing.assert_array_equal(raf.indices("train"), [4, 5, 6, 7])
    assert all(i.startswith("Image/aligned/train_") for i in raf.ids[raf.indices("train")])
    for split in (None, "all"):
        np.testing.assert_array_equal(raf.indices(split), np.arange(8))
    folders = open_store(out).dataset("folders")  # a dataset whose only split is "all"
    assert folders.split_names() == ["all"]
    for split in (None, "all"):
        idx = folders.indices(split)
        assert idx.dtype == np.int64 and idx.tolist() == list(range(8))


def test_features_and_images_with_any_indices(built):
    out, _, truth = built
    ds = open_store(out).dataset("rafdb")
    full, imgs = truth["rafdb"]["feats"], truth["rafdb"]["images"]
    assert full.shape == (8, 2, 16)
    np.testing.assert_array_equal(ds.features(KEY), full)
    for idx in ([5, 1, 1, 7, 0, 5], np.array([3, 2]), [4], [6, 6, 6], [0, 1, 2], list(range(7, -1, -1))):
        got = ds.features(KEY, idx)
        assert got.dtype == np.float32 and got.shape == (len(idx), 2, 16)
        np.testing.assert_array_equal(got, full[np.asarray(idx)])
        np.testing.assert_array_equal(ds.images(8, idx), imgs[np.asarray(idx)])
    np.testing.assert_array_equal(ds.features(KEY, [2, 0], views=("flip",)), full[[2, 0]][:, [1]])
    np.testing.assert_array_equal(ds.features(KEY, [2, 0], views=("flip", "orig")), full[[2, 0]][:, ::-1])
    np.testing.assert_array_equal(ds.features(KEY, ds.indices("train")), full[4:])
    assert ds.features(KEY, []).shape == (0, 2, 16) and ds.images(8, []).shape == (0, 8, 8, 3)
    assert ds.images(8).dtype == np.uint8 and ds.images(8).shape == (8, 8, 8, 3)


def test_errors_name_what_exists(built):
    out, _, _ = built
    s = open_store(out)
    with pytest.raises(StoreError, match=r"no dataset 'ferplus' \(it has: folders, rafdb\)"):
        s.dataset("ferplus")
    ds = s.dataset("rafdb")
    with pytest.raises(StoreError, match=r"no features from encoder 'clip-vit-base-patch32' \(encoders: tiny-clip\)"):
        ds.features("clip-vit-base-patch32")
    with pytest.raises(StoreError, match=r"encoders: tiny-clip"):
        ds.encoder_info("nope")
    with pytest.raises(StoreError, match=r"no split 'val' \(splits: test, train"):
        ds.indices("val")
    with pytest.raises(StoreError, match=r"no cached images of size 64 \(sizes: 8\)"):
        ds.images(64)
    with pytest.raises(StoreError, match=r"unknown view\(s\) \['mirror'\]; stored views are \['orig', 'flip'\]"):
        ds.features(KEY, views=("mirror",))
    with pytest.raises(StoreError, match=r"out of range 0..7"):
        ds.features(KEY, [1, 8])
    with pytest.raises(StoreError, match=r"no image id 'x.jpg'"):
        ds.index_of(["x.jpg"])
    with pytest.raises(StoreError, match="does not exist"):
        open_store(out.with_name("missing.h5"))


def test_store_and_view_pickle_without_the_handle(built):
    out, _, truth = built
    s = open_store(out)
    ds = s.dataset("rafdb")
    _ = ds.features(KEY, [0])  # the handle is open now
    assert isinstance(s._file, h5py.File)
    blob = pickle.dumps(ds)
    assert b"h5py" not in blob and len(blob) < 2000
    ds2 = pickle.loads(blob)
    assert isinstance(ds2, DatasetView) and isinstance(ds2.store, Store) and ds2.store._file is None
    np.testing.assert_array_equal(ds2.features(KEY, [3, 1]), truth["rafdb"]["feats"][[3, 1]])
    assert ds2.store.file is not s.file  # its own handle
    s2 = pickle.loads(pickle.dumps(s))
    assert s2.datasets() == s.datasets()
    s2.close()
    assert ds.labels.tolist() == ds2.labels.tolist()


class Rows(torch.utils.data.Dataset):
    """Module level, so it also pickles; holds a DatasetView whose store was opened in the parent."""

    def __init__(self, ds: DatasetView):
        self.ds = ds
        handle = ds.store.file
        self.parent_handle = (id(handle), handle.id.id)  # the parent's h5py File object and HDF5 file id

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        feats = self.ds.features(KEY, [i])[0]
        img = self.ds.images(8, [i])[0]
        handle = self.ds.store._file
        reopened = (self.ds.store._pid == os.getpid() and handle is not None and handle.id.valid
                    and id(handle) != self.parent_handle[0] and handle.id.id != self.parent_handle[1])
        return i, feats, img, int(self.ds.labels[i]), os.getpid(), reopened


def test_dataloader_fork_workers_reopen_the_file(built):
    out, _, truth = built
    ds = open_store(out).dataset("folders")
    parent_handle = ds.store.file  # opened before the fork: the workers must not reuse it
    labels = ds.labels
    loader = torch.utils.data.DataLoader(Rows(ds), batch_size=3, num_workers=2, multiprocessing_context="fork",
                                         shuffle=False)
    seen, pids = [], set()
    for idx, feats, img, lab, pid, reopened in loader:
        seen += idx.tolist()
        np.testing.assert_array_equal(feats.numpy(), truth["folders"]["feats"][idx.numpy()])
        np.testing.assert_array_equal(img.numpy(), truth["folders"]["images"][idx.numpy()])
        assert lab.tolist() == labels[idx.numpy()].tolist()
        assert reopened.all()
        pids.update(pid.tolist())
    assert sorted(seen) == list(range(len(ds)))
    assert os.getpid() not in pids and len(pids) == 2
    assert ds.store.file is parent_handle and parent_handle.id.valid  # the parent's handle survived
    np.testing.assert_array_equal(ds.features(KEY, [0]), truth["folders"]["feats"][[0]])


READER = """
import hashlib, sys, time
from featcache import open_store
ds = open_store(sys.argv[1]).dataset("rafdb")
h = hashlib.sha256(ds.features("tiny-clip", [7, 0, 3]).tobytes())
time.sleep(0.5)  # stay open while the other reader runs
h.update(ds.images(8).tobytes())
print(h.hexdigest())
"""


def test_several_readers_at_once(built, tmp_path, tiny_clip_dir):
    out, roots, truth = built
    s = open_store(out)
    ds = s.dataset("rafdb")
    want = hashlib.sha256(ds.features(KEY, [7, 0, 3]).tobytes())
    want.update(ds.images(8).tobytes())
    procs = [subprocess.Popen([sys.executable, "-c", READER, str(out)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr
        assert stdout.strip() == want.hexdigest()
    assert ds.features(KEY).shape == (8, 2, 16)  # this reader is still fine

    # a build that adds a dataset while this reader is open: the reader keeps a complete (old) file
    copy = tmp_path / "s.h5"
    copy.write_bytes(out.read_bytes())
    reader = open_store(copy)
    old = reader.dataset("rafdb")
    _ = old.ids
    build_store(copy, "csv", roots["csv"], model=str(tiny_clip_dir), workers=0, progress=False)
    assert reader.datasets() == ["folders", "rafdb"]
    np.testing.assert_array_equal(old.features(KEY), truth["rafdb"]["feats"])
    assert open_store(copy).datasets() == ["csv", "folders", "rafdb"]
    np.testing.assert_array_equal(open_store(copy).dataset("rafdb").features(KEY), truth["rafdb"]["feats"])
