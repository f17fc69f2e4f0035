"""Crash-safe progress of one build: numbered shard files beside the store.

HDF5 files can be corrupted by a process killed mid-write, so a build never writes the
published store while it runs. Each batch of results goes to ``<store>.journal/<plan>/``
as a shard written to a temporary name, fsynced, then atomically renamed. A SIGKILL at
any moment leaves only complete shards (and maybe a temp file, removed on restart).
The plan directory is named by a hash of everything that decides the results, so a
journal is only ever resumed by the same build.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from featcache.errors import FerError


class LockedError(FerError):
    """Another process holds the store's write lock; the message names the lock file and its holder."""


# Lock fds held by this process. A flock belongs to the open file description, which fork() shares
# with the child: a DataLoader worker forked during the build would keep the lock alive after the build
# is killed (kill -9), and every rerun would be refused until someone found and killed the orphan.
# So every forked child closes these fds at once (os.open already makes them close-on-exec).
_HELD_LOCK_FDS: set[int] = set()


def _close_lock_fds_in_child() -> None:
    for fd in list(_HELD_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_lock_fds_in_child)


def _holder(fd: int) -> str:
    """' by pid N' (and whether it is still running) from the pid the holder wrote into the lock file."""
    try:
        pid = int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return ""
    try:
        os.kill(pid, 0)
        return f" by pid {pid}"
    except ProcessLookupError:
        return f" by a process started by pid {pid}, which has exited (find it with `fuser -v FILE`)"
    except OSError:
        return f" by pid {pid}"


@contextmanager
def store_lock(store_path: Path):
    """One writer per store; the kernel drops the lock when the process dies (even SIGKILL)."""
    lock_path = Path(str(store_path) + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(
                f"another featcache build is writing {store_path} (lock {lock_path} is held"
                f"{_holder(fd).replace('FILE', str(lock_path))}); wait for it to finish"
            ) from None
        _HELD_LOCK_FDS.add(fd)
        try:  # for the message above; the lock itself is the flock, never this content
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        yield
    finally:
        _HELD_LOCK_FDS.discard(fd)
        os.close(fd)


def plan_hash(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Journal:
    """One plan's shards. ``part`` (e.g. ``"rank-00001"``): this process writes into ``<plan>/<part>/``, as each
    rank of a torchrun build does, so ranks never share a file name; every reader sees the shards of all parts."""

    def __init__(self, store_path: Path, plan: dict, part: str | None = None):
        self.root = Path(str(store_path) + ".journal")
        self.dir = self.root / plan_hash(plan)
        self.write_dir = self.dir / part if part else self.dir
        self.plan = plan
        self.written: list[Path] = []   # shards this process wrote (their names are reported to the committer)
        self.reported: set[Path] = set()  # shards other ranks said they wrote (see shard_paths)

    def open(self, primary: bool = True) -> None:
        """Create the folder, the plan and (``primary``) remove writes cut short by a kill, in every part: only
        the primary does that, while no rank writes."""
        self.write_dir.mkdir(parents=True, exist_ok=True)
        if not primary:
            return
        plan_file = self.dir / "plan.json"
        if not plan_file.exists():
            tmp = self.dir / "plan.json.tmp"
            tmp.write_text(json.dumps(self.plan, sort_keys=True, indent=1))
            os.replace(tmp, plan_file)
        for stale in [*self.dir.glob("*.tmp*"), *self.dir.glob("rank-*/*.tmp*")]:  # a write cut short by a kill
            stale.unlink()

    def shard_paths(self) -> list[Path]:
        """Complete shards of every part, plus those other ranks reported: on a shared file system another node's
        new file may be missing from a cached directory listing for a while, but it opens by its name."""
        found = ([*self.dir.glob("shard-*.npz"), *self.dir.glob("rank-*/shard-*.npz")] if self.dir.exists() else [])
        return sorted({p for p in found if ".tmp" not in p.name} | self.reported)

    def done_mask(self, n: int) -> np.ndarray:
        """Work items 0..n-1 that a shard holds; items >= n (an augmented-view journal resumed with a smaller
        --aug-views) are left out."""
        done = np.zeros(n, dtype=bool)
        for p in self.shard_paths():
            with np.load(p) as z:
                idx = z["idx"]
                done[idx[idx < n]] = True
        return done

    def write_shard(self, seq: int, **arrays: np.ndarray) -> Path:
        final = self.write_dir / f"shard-{seq:09d}.npz"
        tmp = self.write_dir / f"shard-{seq:09d}.tmp.npz"
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException as e:
            tmp.unlink(missing_ok=True)  # disk full, Ctrl-C: no half-written shard left behind
            if isinstance(e, OSError) and not e.filename:  # np.savez's errors do not say which file
                raise OSError(e.errno, e.strerror or str(e), str(tmp)) from None
            raise
        _fsync_dir(self.write_dir)
        self.written.append(final)
        return final

    def next_seq(self) -> int:
        paths = sorted(p for p in self.write_dir.glob("shard-*.npz") if ".tmp" not in p.name)
        return int(paths[-1].name[6:15]) + 1 if paths else 0

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.root.rmdir()  # only when no other plan is pending
        except OSError:
            pass


def pending_plans(store_path: Path) -> list[tuple[Path, dict]]:
    """``(directory, plan)`` of every journal left beside the store by a build that did not finish."""
    root = Path(str(store_path) + ".journal")
    found = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            try:
                found.append((d, json.loads((d / "plan.json").read_text())))
            except (OSError, ValueError):
                continue
    return found


def discard(store_path: Path, plan_dir: Path) -> None:
    """Remove one plan's journal (and the journal folder when it is left empty)."""
    shutil.rmtree(plan_dir, ignore_errors=True)
    try:
        Path(str(store_path) + ".journal").rmdir()
    except OSError:
        pass
