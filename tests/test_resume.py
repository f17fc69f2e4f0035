"""A build SIGKILLed at different moments and started again ends with exactly what an uninterrupted
build stores; a killed build never damages the published store; one writer at a time.

Real `python -m cli.featcache_cli build` processes on a 300-image dataset, with
FEATCACHE_FLUSH_SECONDS=0 so every batch becomes a journal shard. The encoder is the pure-torch
plug-in `plugin_encoders:tiny_encoder` (tests/plugin_encoders.py): resuming does not depend on the
encoder, and each process then starts in seconds instead of also importing transformers.
"""
from __future__ import annotations

import hashlib
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
from click.testing import CliRunner

import layout_fixtures as fx
from cli.featcache_cli import main as cli
from featcache import open_store
from featcache.build import build_store
from featcache.journal import LockedError

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
MODEL, KEY = "plugin_encoders:tiny_encoder", "tiny-enc"
N, BATCH, SIZE = 300, 4, 16
CLASSES = ("happy", "sad", "angry", "neutral", "surprise", "fear")


@pytest.fixture(scope="module")
def big_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("big") / "faces"
    for i in range(N):
        fx.write_image(root / CLASSES[i % len(CLASSES)] / f"img_{i:04d}.jpg", size=16)
    return root


def command(root: Path, out: Path, workers: int = 0) -> list[str]:
    return [sys.executable, "-m", "cli.featcache_cli", "build", "--dataset", "folders", "--root", str(root),
            "--cache", str(out), "--model", MODEL, "--batch-size", str(BATCH), "--workers", str(workers),
            "--device", "cpu", "--image-size", str(SIZE), "--quiet"]


def env() -> dict:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "FEATCACHE_FLUSH_SECONDS": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "500", "PYTHONPATH": path}


def shard_files(out: Path) -> list[Path]:
    """Complete shards (a shard is written as shard-N.tmp.npz, then renamed)."""
    return sorted(p for p in Path(f"{out}.journal").glob("*/shard-*.npz") if ".tmp" not in p.name)


def journal_idx(out: Path) -> np.ndarray:
    parts = [np.load(p)["idx"] for p in shard_files(out)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def tmp_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".tmp-*"))


def start(cmd):
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, cond, timeout: float = 120.0, pause=None) -> int:
    """SIGKILL ``proc`` as soon as ``cond()`` holds (after calling ``pause(proc)`` if given);
    returns the exit status (-9 when killed, else the status it finished with on its own)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if cond():
            if pause is not None:
                pause(proc)
            proc.kill()
            break
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the build neither reached the kill point nor finished")
        time.sleep(0.001)
    proc.communicate(timeout=60)
    return proc.returncode


def store_digest(path: Path, dataset: str) -> str:
    """Every array and attribute of one dataset group, hashed."""
    h = hashlib.sha256()
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            h.update(name.encode())
            h.update(repr(sorted((k, str(v)) for k, v in obj.attrs.items())).encode())
            if isinstance(obj, h5py.Dataset):
                h.update(repr(obj.asstr()[()].tolist()).encode() if obj.dtype.kind == "O" else obj[()].tobytes())
        f[f"datasets/{dataset}"].visititems(visit)
    return h.hexdigest()


def assert_previous_store(out: Path, csv_digest: str) -> None:
    """The published store still opens and holds exactly its previous content."""
    s = open_store(out)
    assert s.datasets() == ["csv"]
    assert store_digest(out, "csv") == csv_digest
    s.close()


def test_sigkill_at_any_moment_then_resume_matches_uninterrupted(big_root, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    csv_root = fx.make_csv(tmp_path / "csvdata")
    out, ref = tmp_path / "live.h5", tmp_path / "ref.h5"
    build_store(out, "csv", csv_root, model=MODEL, workers=0, progress=False)  # the previous content
    csv_digest = store_digest(out, "csv")
    # the uninterrupted reference, in one go with another batch size
    build_store(ref, "folders", big_root, model=MODEL, workers=0, progress=False, image_size=SIZE, batch_size=7,
                device="cpu")
    total_shards = -(-N // BATCH)

    # 1. killed right after the first shard is written; meanwhile a second build is refused (lock)
    refused = {}

    def try_second_build(proc):
        proc.send_signal(signal.SIGSTOP)  # hold it still, lock held, while another build tries
        with pytest.raises(LockedError) as e:
            build_store(out, "folders", big_root, model=MODEL, workers=0, progress=False, image_size=SIZE)
        refused["lib"] = str(e.value)
        r = CliRunner().invoke(cli, command(big_root, out)[3:])
        refused["cli"] = (r.exit_code, r.output.replace("\n", ""))

    rc = kill_when(start(command(big_root, out)), lambda: len(shard_files(out)) >= 1,
                   pause=try_second_build)
    assert rc == -signal.SIGKILL
    assert f"another featcache build is writing {out}" in refused["lib"] and "wait for it to finish" in refused["lib"]
    assert refused["cli"][0] == 1 and f"another featcache build is writing {out}" in refused["cli"][1]
    first = journal_idx(out)
    assert 0 < len(first) < N
    assert_previous_store(out, csv_digest)

    # 2. resumed, killed about half-way through the encoding
    rc = kill_when(start(command(big_root, out)), lambda: len(shard_files(out)) >= total_shards // 2)
    assert rc == -signal.SIGKILL
    second = journal_idx(out)
    assert len(first) < len(second) < N
    assert len(np.unique(second)) == len(second)  # nothing encoded twice
    assert set(first) <= set(second)
    assert_previous_store(out, csv_digest)

    # 3. resumed, killed while committing (the new copy of the store exists, not yet renamed into place)
    backup = tmp_path / "backup"
    shutil.copytree(Path(f"{out}.journal"), backup / "journal")
    shutil.copyfile(out, backup / "store.h5")
    for attempt in range(4):
        rc = kill_when(start(command(big_root, out)), lambda: bool(tmp_files(out)))
        if rc == -signal.SIGKILL and tmp_files(out):
            print(f"killed inside the commit at attempt {attempt + 1}")
            break
        # the kill landed after the rename (or the commit won the race): put the killed state back, try again
        for p in tmp_files(out):
            p.unlink()
        shutil.rmtree(Path(f"{out}.journal"), ignore_errors=True)
        shutil.copytree(backup / "journal", Path(f"{out}.journal"))
        shutil.copyfile(backup / "store.h5", out)
    else:
        pytest.fail("could not kill the build inside its commit phase")
    assert len(journal_idx(out)) == N  # every image encoded; only the commit was cut short
    assert_previous_store(out, csv_digest)

    # 4. resumed to the end (with a decode worker this time)
    p = start(command(big_root, out, workers=1))
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert f"{N} rows" in stdout and "encoded 0 now" in stdout and f"{N} resumed" in stdout
    assert not Path(f"{out}.journal").exists() and not tmp_files(out)

    s = open_store(out)
    assert s.datasets() == ["csv", "folders"]
    assert store_digest(out, "csv") == csv_digest
    got, want = s.dataset("folders"), open_store(ref).dataset("folders")
    assert len(got) == N and len(set(got.ids.tolist())) == N
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.splits, want.splits)
    np.testing.assert_allclose(got.features(KEY), want.features(KEY), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got.images(SIZE), want.images(SIZE))
    assert got.skipped == [] and got.encoders() == [KEY] and got.image_sizes() == [SIZE]


def test_journal_of_a_committed_build_is_cleaned_up(tmp_path, monkeypatch):
    """A build killed between renaming the new store into place and deleting its journal: the next build
    finds the store complete, reports up to date and removes the leftover journal."""
    monkeypatch.syspath_prepend(str(TESTS))
    root = fx.make_folders(tmp_path / "data")
    out = tmp_path / "s.h5"
    build_store(out, "folders", root, model=MODEL, workers=0, progress=False, flush_seconds=0)
    # recreate what such a kill leaves behind: the journal of that very plan, still full
    from featcache.journal import Journal

    store = open_store(out)
    plan = {"dataset": "folders", "manifest_sha256": store.dataset("folders").attrs["manifest_sha256"],
            "listing": "x", "new_dataset": True, "tool_version": "0.1.0",
            "encoder": store.dataset("folders").encoder_info(KEY)["fingerprint"], "image_size": None}
    store.close()
    j = Journal(out, plan)
    j.open()
    j.write_shard(0, idx=np.arange(8), ok=np.ones(8, bool))
    pending = Journal(out, dict(plan, dataset="other"))  # another dataset's unfinished build: kept
    pending.open()
    before = out.stat().st_mtime_ns
    rep = build_store(out, "folders", root, model=MODEL, workers=0, progress=False)
    assert rep.up_to_date and out.stat().st_mtime_ns == before
    assert not j.dir.exists() and pending.dir.exists()
