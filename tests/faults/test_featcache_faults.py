"""Fault injection for featcache (issue 7): kill -9 with decode workers, symlink loops, bad dataset
names, read-only and full disks, silently corrupted stores, decompression bombs, and two test gaps
(the store's view order against the encoder itself; journal shard numbering on resume).

Each test fails on the fault it guards; docs/faults.md lists case -> behaviour -> test.
"""
from __future__ import annotations

import fcntl
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import layout_fixtures as fx
from cli.featcache_cli import main as cli
from featcache import open_store
from featcache.build import build_store
from featcache.images import ImageError, load_image
from featcache.journal import Journal, store_lock
from featcache.manifests import ManifestError, list_items, load_manifest

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
MODEL, KEY = "plugin_encoders:tiny_encoder", "tiny-enc"  # pure torch: a CLI process starts in ~2 s


def flat(text: str) -> str:
    return text.replace("\n", "")


def env() -> dict:
    path = os.pathsep.join(p for p in (str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "FEATCACHE_FLUSH_SECONDS": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "500", "PYTHONPATH": path}


def build_cmd(root: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "cli.featcache_cli", "build", "--dataset", "folders", "--root", str(root),
            "--cache", str(out), "--model", MODEL, "--device", "cpu", "--quiet", *map(str, extra)]


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def lib_build(out, root, **kw):
    kw.setdefault("workers", 0)
    return build_store(out, "folders", root, model=MODEL, progress=False, device="cpu", **kw)


@pytest.fixture(autouse=True)
def _plugins_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def leftovers(out: Path) -> list[str]:
    """Temp files a failed build must not leave: the commit copy and half-written journal shards."""
    return sorted(str(p) for p in [*out.parent.glob(out.name + ".tmp-*"),
                                   *Path(f"{out}.journal").glob("*/*.tmp*")])


def one_error_line(output: str) -> str:
    """The CLI's whole error output: exactly one 'error:' line, no traceback."""
    assert "Traceback" not in output, output
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


# ================================================================== 1. kill -9 with decode workers
N_KILL, BATCH = 240, 8


@pytest.fixture(scope="module")
def kill_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill") / "faces"
    for i in range(N_KILL):
        fx.write_image(root / ("happy", "sad", "angry")[i % 3] / f"img_{i:04d}.jpg", size=24)
    return root


def session_processes(sid: int) -> dict[int, str]:
    """pid -> name of the live (not zombie) processes of a session: the build and every worker it forked."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            found[int(d.name)] = name
    return found


def workers(sid: int) -> list[int]:
    return [pid for pid, name in session_processes(sid).items() if name == "pt_data_worker"]  # torch's name


def lock_is_free(out: Path) -> bool:
    fd = os.open(f"{out}.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def shards(out: Path) -> int:
    return len([p for p in Path(f"{out}.journal").glob("*/shard-*.npz") if ".tmp" not in p.name])


def wait_for(cond, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_kill9_with_default_workers_leaves_no_orphan_and_resumes_at_once(kill_root, tmp_path):
    """Default --workers (decode worker processes), thumbnails through the worker pipe, SIGKILL at three
    points: no process of the build survives, the lock is free at once, the next run resumes, and the
    final store equals an uninterrupted build."""
    out, ref = tmp_path / "s.h5", tmp_path / "ref.h5"
    lib_build(ref, kill_root, image_size=16, batch_size=5)
    total = -(-N_KILL // BATCH)
    kill_points = [
        ("decode workers just started", lambda sid: bool(workers(sid))),
        ("first shard written", lambda sid: shards(out) >= 1),
        ("half of the shards written", lambda sid: shards(out) >= total // 2),
    ]
    started = []
    try:
        for k, (what, cond) in enumerate(kill_points):
            log = tmp_path / f"stderr-{k}.txt"
            with open(log, "w") as err:  # not a pipe: an orphan holding it would block reading it
                proc = subprocess.Popen(build_cmd(kill_root, out, "--batch-size", BATCH, "--image-size", 16),
                                        cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=err,
                                        start_new_session=True)
            started.append(proc.pid)
            deadline = time.monotonic() + 120
            while proc.poll() is None and not cond(proc.pid):
                assert time.monotonic() < deadline, f"the build never reached the kill point '{what}'"
                time.sleep(0.001)
            assert proc.poll() is None, f"run before '{what}' ended by itself: {log.read_text()}"
            if k == 0:  # later kill points may come after the workers decoded everything (a loaded machine)
                assert workers(proc.pid), "the build runs no decode worker: nothing is tested"
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
            # workers die with the build, and none of them keeps the store's lock
            assert wait_for(lambda: not session_processes(proc.pid), 3.0), \
                f"killed at '{what}': orphaned worker(s) {session_processes(proc.pid)} still running"
            assert wait_for(lambda: lock_is_free(out), 1.0), f"killed at '{what}': the lock is still held"
            assert shards(out) < total and not out.exists()
    finally:  # whatever happened, leave no process of these builds behind
        for sid in started:
            try:
                os.killpg(sid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    logged = []
    rep = lib_build(out, kill_root, workers=None, image_size=16, batch_size=BATCH, log=logged.append)  # default workers
    assert 0 < rep.resumed_from < N_KILL and rep.resumed_from + rep.encoded_now == N_KILL
    assert any(m.startswith("resuming: ") for m in logged)
    got, want = open_store(out).dataset("folders"), open_store(ref).dataset("folders")
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.features(KEY), want.features(KEY), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got.images(16), want.images(16))
    assert not Path(f"{out}.journal").exists() and not leftovers(out)


def test_store_lock_is_not_inherited_by_forked_children(tmp_path):
    """A child forked while the lock is held (a DataLoader worker) does not keep the lock alive."""
    out = tmp_path / "s.h5"
    with store_lock(out):
        pid = os.fork()
        if pid == 0:  # the child: outlives the lock holder's critical section
            time.sleep(20)
            os._exit(0)
        assert not lock_is_free(out)
    try:
        # (the child closes its copy of the lock fd as it starts: allow it a moment to be scheduled)
        assert wait_for(lambda: lock_is_free(out), 2.0), "a forked child keeps the lock after the parent let it go"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# ================================================================== 2. symlink loops and dangling links
def _links(folder: Path) -> dict[str, str]:
    (folder / "loop.jpg").symlink_to("loop.jpg")  # a loop: ELOOP when followed
    (folder / "dangling.jpg").symlink_to("nowhere/gone.jpg")
    return {"loop.jpg": "symbolic link loop", "dangling.jpg": "dangling symbolic link to 'nowhere/gone.jpg'"}


def test_symlink_loop_in_class_folder_hides_nothing(tmp_path):
    root = fx.make_folders(tmp_path / "data")
    expected = _links(root / "happy")
    listing = list_items(load_manifest("folders"), root, on_error="skip")
    assert len(listing.items) == 8  # every good image of the folder is still listed
    assert sum(it.id.startswith("happy/") for it in listing.items) == 2
    got = {Path(p.where).name: p.reason for p in listing.problems}
    assert set(got) == set(expected)
    for name, cause in expected.items():
        assert cause in got[name]
        assert any(p.where == str(root / "happy" / name) for p in listing.problems)
    with pytest.raises(ManifestError) as e:
        list_items(load_manifest("folders"), root, on_error="fail")
    assert str(root / "happy" / "dangling.jpg") in str(e.value) and "2 problems" in str(e.value)

    out = tmp_path / "s.h5"
    r = run_cli("build", "--dataset", "folders", "--root", root, "--cache", out, "--model", MODEL, "--workers", 0,
                "--on-error", "skip", "--quiet")
    assert r.exit_code == 0, r.output
    ds = open_store(out).dataset("folders")
    assert len(ds) == 8 and {Path(w).name for _, w, _ in ds.skipped} == set(expected)


def test_symlink_loop_in_muxspace_images_hides_nothing(tmp_path):
    root = fx.make_muxspace(tmp_path / "mux")
    images = root / "images"
    (images / "zz-loop.jpg").symlink_to("zz-loop.jpg")  # not listed in legend.csv: must not matter
    listing = list_items(load_manifest("muxspace"), root, on_error="skip")
    assert len(listing.items) == 9 and len(listing.problems) == 1  # as without the loop (fx.EXPECTED)

    # listed images that are broken links: named, with the cause, and only those rows
    (images / "Avinash_28.jpg").unlink()
    (images / "Avinash_28.jpg").symlink_to("Avinash_28.jpg")
    (images / "Avinash_31.jpg").unlink()
    (images / "Avinash_31.jpg").symlink_to("../gone/Avinash_31.jpg")
    listing = list_items(load_manifest("muxspace"), root, on_error="skip")
    assert len(listing.items) == 7
    reasons = {p.item_id: p.reason for p in listing.problems}
    assert "symbolic link loop" in reasons["images/Avinash_28.jpg"]
    assert "dangling symbolic link to '../gone/Avinash_31.jpg'" in reasons["images/Avinash_31.jpg"]
    assert all(str(root) in reasons[i] for i in ("images/Avinash_28.jpg", "images/Avinash_31.jpg"))


def test_broken_links_decode_with_their_cause(tmp_path):
    (tmp_path / "loop.png").symlink_to("loop.png")
    (tmp_path / "dangling.png").symlink_to("missing.png")
    with pytest.raises(ImageError, match="symbolic link loop"):
        load_image(tmp_path / "loop.png")
    with pytest.raises(ImageError, match="dangling symbolic link to 'missing.png'"):
        load_image(tmp_path / "dangling.png")


# ================================================================== 3. dataset names
@pytest.mark.parametrize("flag,value", [
    ("--name", "a/b"), ("--name", "."), ("--name", ".."), ("--name", ""), ("--name", "a\nb"),
    ("--name", "tab\there"), ("--encoder-key", "x/y"), ("--encoder-key", ".."),
])
def test_bad_dataset_names_are_refused_before_anything_is_written(flag, value, tmp_path):
    root = fx.make_folders(tmp_path / "data")
    out = tmp_path / "s.h5"
    r = run_cli("build", "--dataset", "folders", "--root", root, "--cache", out, "--model", MODEL, "--workers", 0,
                "--quiet", flag, value)
    assert r.exit_code == 1
    line = one_error_line(r.output)
    what = "dataset name" if flag == "--name" else "encoder key"
    assert f"invalid {what} {value!r}" in line and flag in line and "one path component" in line
    assert not out.exists() and not Path(f"{out}.journal").exists()


def test_bad_name_from_a_manifest_says_to_pass_name(tmp_path):
    root = fx.make_csv(tmp_path / "data")
    manifest = tmp_path / "mine.toml"
    manifest.write_text('name = "team/raf"\nkind = "csv"\n')
    r = run_cli("build", "--dataset", manifest, "--root", root, "--cache", tmp_path / "s.h5", "--model", MODEL,
                "--workers", 0, "--quiet")
    assert r.exit_code == 1
    line = one_error_line(r.output)
    assert "invalid dataset name 'team/raf'" in line and str(manifest) in line and "--name" in line


def test_a_good_unusual_name_works_end_to_end(tmp_path):
    root = fx.make_folders(tmp_path / "data")
    out = tmp_path / "s.h5"
    r = run_cli("build", "--dataset", "folders", "--root", root, "--cache", out, "--model", MODEL, "--workers", 0,
                "--quiet", "--name", "raf db (v2)")
    assert r.exit_code == 0, r.output
    assert run_cli("info", out).exit_code == 0
    r = run_cli("verify", out, "--sample", 0)
    assert r.exit_code == 0 and "raf db (v2): ids unique" in r.output, r.output


# ================================================================== 4. read-only store, full disk
def _immutable(path: Path, on: bool) -> bool:
    r = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def read_only(request):
    """make(path): a file or folder nobody may write, for real (root ignores modes: chattr +i then)."""
    undo = []

    def make(path: Path):
        if os.geteuid() == 0:
            if not shutil.which("chattr") or not _immutable(path, True):
                pytest.skip("running as root and cannot chattr +i here: no way to make a path read-only")
            undo.append(lambda: _immutable(path, False))
        else:
            mode = path.stat().st_mode
            path.chmod(0o555 if path.is_dir() else 0o444)
            undo.append(lambda: path.chmod(mode))

    yield make
    for u in reversed(undo):
        u()


def test_read_only_folder_is_one_line(tmp_path, read_only):
    root = fx.make_folders(tmp_path / "data")
    folder = tmp_path / "ro"
    folder.mkdir()
    read_only(folder)
    out = folder / "s.h5"
    r = run_cli("build", "--dataset", "folders", "--root", root, "--cache", out, "--model", MODEL, "--workers", 0,
                "--quiet")
    assert r.exit_code == 1
    line = one_error_line(r.output)
    assert f"cannot write the feature store {out}" in line and "read-only" in line and "--cache" in line
    assert ("Permission denied" in line) or ("Operation not permitted" in line)
    assert sorted(folder.iterdir()) == []


def test_read_only_store_file_is_one_line_and_untouched(tmp_path, read_only):
    root = fx.make_folders(tmp_path / "data")
    out = tmp_path / "s.h5"
    lib_build(out, root)
    before = out.read_bytes()
    read_only(out)
    # nothing to add: a read-only complete store is fine
    r = run_cli("build", "--dataset", "folders", "--root", root, "--cache", out, "--model", MODEL, "--workers", 0,
                "--quiet")
    assert r.exit_code == 0 and "already complete" in r.output, r.output
    r = run_cli("build", "--dataset", "folders", "--root", root, "--cache", out, "--model", MODEL, "--workers", 0,
                "--quiet", "--image-size", 8)
    assert r.exit_code == 1
    line = one_error_line(r.output)
    assert f"cannot write the feature store {out}" in line and "read-only" in line
    assert out.read_bytes() == before and not leftovers(out)
    assert not Path(f"{out}.journal").exists()  # refused before encoding anything, not at the commit


def _limited(kib: int):
    def preexec():  # a file-size limit: writes past it fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (kib << 10, kib << 10))
    return preexec


@pytest.fixture(scope="module")
def efbig_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("efbig") / "faces"
    for i in range(64):
        fx.write_image(root / ("happy", "sad")[i % 2] / f"i{i:03d}.png", size=16)
    return root


@pytest.mark.parametrize("where", ["commit", "copy-of-existing-store", "journal"])
def test_disk_full_is_one_line_without_temp_files_and_resumes(where, efbig_root, tmp_path):
    out = tmp_path / "s.h5"
    cmd = build_cmd(efbig_root, out, "--workers", 0, "--batch-size", 4, "--image-size", 32)
    limit = 64  # KiB: every 4-image shard fits (~14 KiB), the 64-image store (~220 KiB) does not
    if where == "copy-of-existing-store":  # the store is already bigger than the limit: the copy fails
        lib_build(out, efbig_root, image_size=24, name="first")
        limit = out.stat().st_size // 1024 // 2
    elif where == "journal":
        limit = 8
    before = out.read_bytes() if out.exists() else None
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120,
                       preexec_fn=_limited(limit))
    assert r.returncode == 1, (r.returncode, r.stderr)  # not a traceback, not a crash in HDF5 (-11)
    line = one_error_line(r.stderr)
    assert f"cannot write the feature store {out}" in line and "File too large [EFBIG]" in line
    assert "free space" in line and "run the same command again" in line
    assert not leftovers(out), leftovers(out)
    assert (out.read_bytes() if out.exists() else None) == before  # the published store is untouched

    rep = lib_build(out, efbig_root, batch_size=4, image_size=32)  # the same command, with room to write
    assert len(open_store(out).dataset("folders")) == 64 and not leftovers(out)
    if where != "journal":
        assert rep.resumed_from == 64 and rep.encoded_now == 0  # the encoded images were kept


# ================================================================== 5. per-row checksums
@pytest.fixture(scope="module")
def checked_store(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("crc")
    root = base / "faces"
    for i in range(40):
        fx.write_image(root / ("happy", "sad", "angry", "neutral")[i % 4] / f"f{i:03d}.png", size=20)
    out = base / "s.h5"
    if str(TESTS) not in sys.path:  # the plug-in encoder (module scope: before the autouse fixture)
        sys.path.insert(0, str(TESTS))
    lib_build(out, root, image_size=16, batch_size=7)
    return out


def _overwrite_raw(path: Path, dset_name: str, rows: list[int], seed: int = 0) -> None:
    """Random bytes written straight into the file where these rows' bytes lie (no HDF5 API)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "r") as f:
        d = f[dset_name]
        row_bytes = int(np.prod(d.shape[1:])) * d.dtype.itemsize
        spans = []
        for r in rows:
            chunk_row = r - r % d.chunks[0]
            info = d.id.get_chunk_info_by_coord((chunk_row,) + (0,) * (d.ndim - 1))
            spans.append((info.byte_offset + (r - chunk_row) * row_bytes, row_bytes))
    with open(path, "r+b") as fh:
        for offset, size in spans:
            fh.seek(offset)
            fh.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())


def test_verify_finds_every_overwritten_row(checked_store, tmp_path):
    bad = tmp_path / "bad.h5"
    shutil.copyfile(checked_store, bad)
    ids = open_store(checked_store).dataset("folders").ids
    _overwrite_raw(bad, "datasets/folders/images/16", [0, 13, 39])
    _overwrite_raw(bad, "datasets/folders/encoders/tiny-enc/features", [21], seed=1)
    r = run_cli("verify", bad, "--sample", 0)
    assert r.exit_code == 1, r.output
    text = flat(r.output)
    assert "FAIL  folders/images/16: checksums: 3 of 40 rows of /datasets/folders/images/16 do not match" in text
    assert f"rows 0 ({ids[0]}), 13 ({ids[13]}), 39 ({ids[39]})" in text
    assert "FAIL  folders/tiny-enc: features checksums: 1 of 40 rows of " \
           "/datasets/folders/encoders/tiny-enc/features do not match" in text and f"rows 21 ({ids[21]})" in text
    assert "2 check(s) failed" in text

    every = tmp_path / "every.h5"  # every row, not a sample
    shutil.copyfile(checked_store, every)
    _overwrite_raw(every, "datasets/folders/images/16", list(range(40)), seed=2)
    r = run_cli("verify", every, "--sample", 0)
    assert r.exit_code == 1 and "40 of 40 rows of /datasets/folders/images/16" in flat(r.output), r.output


def test_verify_passes_a_good_store_and_says_when_there_are_no_checksums(checked_store, tmp_path):
    r = run_cli("verify", checked_store, "--sample", 0)
    assert r.exit_code == 0, r.output
    assert "ok  folders/tiny-enc: features checksums: 40 rows ok" in r.output
    assert "ok  folders/images/16: checksums: 40 rows ok" in r.output
    old = tmp_path / "old.h5"  # a store written before checksums existed
    shutil.copyfile(checked_store, old)
    with h5py.File(old, "a") as f:
        del f["datasets/folders/encoders/tiny-enc/features_crc32"]
        del f["datasets/folders/images_crc32"]
    r = run_cli("verify", old, "--sample", 0)
    assert r.exit_code == 0, r.output
    text = flat(r.output)
    assert "not checked  folders/tiny-enc: features checksums: not checked: " in text and "no checksums" in text
    assert "not checked  folders/images/16: checksums" in text and "FAIL" not in text
    assert open_store(old).dataset("folders").features(KEY).shape == (40, 2, 6)  # still readable


# ================================================================== 6. decompression bombs
def _zero_png(path: Path, w: int, h: int) -> Path:
    """A valid all-black RGB PNG, written row by row (a few MB for 8000x8000)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    comp, row = zlib.compressobj(1), b"\0" * (1 + 3 * w)
    body = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def test_huge_image_is_refused_before_decoding(tmp_path):
    png = _zero_png(tmp_path / "huge.png", 8000, 8000)  # 64 Mpx: ~200 MB decoded, more once converted
    script = textwrap.dedent(f"""
        import resource, sys
        from featcache.images import ImageError, load_image
        try:
            load_image({str(png)!r})
            print("DECODED")
        except ImageError as e:
            print("ERROR", e)
        # VmHWM: this process's peak memory (ru_maxrss would include the forked pytest before exec)
        peak = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")]
        print("PEAK_MB", int(peak[0].split()[1]) // 1024 if peak else 0)
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "DECODED" not in r.stdout
    assert f"ERROR {png}: image of 8000x8000 = 64.0 megapixels is over the decode limit of 50 megapixels" \
           in r.stdout and "--max-pixels" in r.stdout
    assert int(r.stdout.split("PEAK_MB")[1]) < 150  # header only: no pixel buffer was allocated (~1 GB if it were)


def test_max_pixels_is_a_per_file_problem(tmp_path):
    root = fx.make_folders(tmp_path / "data")
    big = fx.write_image(root / "Sad" / "big.png", size=(40, 30))
    out = tmp_path / "s.h5"
    args = ["build", "--dataset", "folders", "--root", root, "--cache", out, "--model", MODEL, "--workers", 0,
            "--quiet", "--max-pixels", 1000]
    r = run_cli(*args)
    assert r.exit_code == 1
    line = one_error_line(r.output)
    assert f"{big}: image of 40x30 = 0.0 megapixels is over the decode limit of 0.001 megapixels" in line
    assert "--max-pixels" in line and "--on-error skip" in line
    r = run_cli(*args, "--on-error", "skip")
    assert r.exit_code == 0, r.output
    ds = open_store(out).dataset("folders")
    assert len(ds) == 8 and [(s[1], "decode limit" in s[2]) for s in ds.skipped] == [(str(big), True)]
    # the limit is the build's option: the default (50 Mpx) takes the same image
    assert lib_build(tmp_path / "t.h5", root).rows == 9


# ================================================================== 7. test gaps
def test_stored_views_are_the_encoder_on_the_pixels_and_on_the_flipped_pixels(tmp_path, tiny_clip_dir):
    """The store's view axis checked against the encoder itself, not against what the writer wrote."""
    from featcache.encoders import create_encoder

    root = fx.make_folders(tmp_path / "data")
    out = tmp_path / "s.h5"
    build_store(out, "folders", root, model=str(tiny_clip_dir), workers=0, progress=False, device="cpu",
                batch_size=3)
    ds = open_store(out).dataset("folders")
    key = ds.encoders()[0]
    enc = create_encoder(str(tiny_clip_dir), device="cpu")
    pix = torch.stack([enc.preprocess(load_image(root / i)) for i in ds.ids])
    with torch.inference_mode():
        orig = torch.cat([enc.module(p[None]) for p in pix]).numpy()            # one image at a time
        flip = torch.cat([enc.module(p[None].flip(-1)) for p in pix]).numpy()   # mirrored left-right
    assert np.abs(orig - flip).max() > 1e-2  # the views differ: the comparison below can tell them apart
    np.testing.assert_allclose(ds.features(key, views=("orig",))[:, 0], orig, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ds.features(key, views=("flip",))[:, 0], flip, rtol=1e-4, atol=1e-5)
    both = ds.features(key, [2, 0], views=("flip", "orig"))
    np.testing.assert_allclose(both[:, 0], flip[[2, 0]], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(both[:, 1], orig[[2, 0]], rtol=1e-4, atol=1e-5)


def test_journal_numbers_shards_on_after_a_reopen(tmp_path):
    plan = {"dataset": "x", "encoder": "fp", "image_size": None}
    j = Journal(tmp_path / "s.h5", plan)
    j.open()
    assert j.next_seq() == 0
    j.write_shard(0, idx=np.arange(0, 5), ok=np.ones(5, bool))

    again = Journal(tmp_path / "s.h5", dict(plan))  # a resumed build: a new process, the same plan
    (again.dir / "shard-000000001.tmp.npz").write_bytes(b"half a shard")  # cut short by the kill
    again.open()
    assert not list(again.dir.glob("*.tmp*"))
    assert again.next_seq() == 1
    assert again.done_mask(12).tolist() == [True] * 5 + [False] * 7
    again.write_shard(again.next_seq(), idx=np.arange(5, 9), ok=np.ones(4, bool))
    assert [p.name for p in again.shard_paths()] == ["shard-000000000.npz", "shard-000000001.npz"]
    assert again.done_mask(12).tolist() == [True] * 9 + [False] * 3  # shard 0 was not overwritten
    for k in range(2, 12):  # numbering keeps going past 9 (names sort as numbers)
        again.write_shard(k, idx=np.array([0]), ok=np.ones(1, bool))
    assert Journal(tmp_path / "s.h5", dict(plan)).next_seq() == 12


def test_markup_in_names_prints_verbatim(tmp_path):
    """A dataset named like rich markup is printed as it is by info and verify (no styling, no emoji)."""
    root = fx.make_folders(tmp_path / "data")
    out = tmp_path / "s.h5"
    name = "[red]raf[-red] :smile:"
    r = run_cli("build", "--dataset", "folders", "--root", root, "--cache", out, "--model", MODEL, "--workers", 0,
                "--quiet", "--name", name)
    assert r.exit_code == 0, r.output
    r = run_cli("info", out)
    assert r.exit_code == 0 and name in r.output, r.output
    r = run_cli("verify", out, "--sample", 0)
    assert r.exit_code == 0 and f"{name}: ids unique" in r.output, r.output
