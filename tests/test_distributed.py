"""torchrun: sharded `featcache build` and `maskfer sweep` (featcache/distributed.py, docs/sweep.md).

Real `torchrun --nproc-per-node 2 -m featcache build|maskfer sweep` processes on the CPU (gloo), against the
same command in one process: the store and the sweep summary must be the same. Faults are injected by the
encoder plug-in below (spec ``test_distributed:counting_encoder``): it records every forward call per rank
and, when asked by environment variables, kills its own rank with SIGKILL or raises an error at a given call.
The build tests take 5-11 s each on a loaded 2-core machine; the two sweep comparisons (about 15 s each plus
the store) are marked slow.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import layout_fixtures as fx
import maskfer_fixtures as mf
from featcache import open_store
from featcache.build import build_store
from featcache.distributed import SINGLE, Context, DistributedError, detect
from featcache.encoders import Encoder, EncoderError
from featcache.journal import store_lock
from maskfer import rundir
from maskfer.config import TrainConfig
from maskfer.sweep import run_sweep

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PLUGIN, PLUGIN_KEY = "test_distributed:counting_encoder", "counting"
CLASSES = ("happy", "sad", "angry", "neutral", "surprise", "fear")


# ---------------------------------------------------------------- the fault-injecting encoder (runs in the ranks)
class _Gray16:
    def __call__(self, image: Image.Image) -> torch.Tensor:
        x = torch.frombuffer(bytearray(image.convert("RGB").resize((16, 16)).tobytes()), dtype=torch.uint8)
        return x.view(16, 16, 3).permute(2, 0, 1).float() / 255.0


class _Counting(torch.nn.Module):
    """Appends each forward's image count to $DIST_CALLS/rank-<RANK>.txt; at call $DIST_FAULT_CALL of rank
    $DIST_FAULT_RANK it SIGKILLs its process ($DIST_FAULT=kill) or raises EncoderError ($DIST_FAULT=error)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.calls = 0

    def forward(self, x):
        if len(x) == 1:  # the plug-in loader's probe of the feature size; a build always sends an image and its flip
            return self.net(x)
        rank = os.environ.get("RANK", "single")
        self.calls += 1
        if os.environ.get("DIST_FAULT_RANK") == rank and self.calls == int(os.environ.get("DIST_FAULT_CALL", "0")):
            if os.environ.get("DIST_FAULT") == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise EncoderError(f"injected failure in call {self.calls}")
        if os.environ.get("DIST_CALLS"):
            with open(Path(os.environ["DIST_CALLS"]) / f"rank-{rank}.txt", "a") as fh:
                fh.write(f"{len(x)}\n")
        return self.net(x)


def counting_encoder():
    return Encoder(name=PLUGIN_KEY, module=_Counting(), preprocess=_Gray16(), dim=6,
                   metadata={"type": "test-plugin", "revision": "r1", "processor": {"size": 16}, "dim": 6})


# ---------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    path = os.pathsep.join(p for p in (str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    e.update({"FEATCACHE_FLUSH_SECONDS": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
              "COLUMNS": "500", "PYTHONPATH": path, "FEATCACHE_DIST_TIMEOUT": "120"})
    e.update({k: str(v) for k, v in extra.items()})
    return e


def torchrun(module: str, *args, nproc: int = 2, timeout: float = 300, **env_extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", module, *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=env(**env_extra), capture_output=True, text=True, timeout=timeout)


def build_args(root: Path, out: Path, model, *extra) -> list:
    return ["build", "--dataset", "folders", "--root", root, "--cache", out, "--model", model, "--workers", 0,
            "--device", "cpu", "--batch-size", 4, "--image-size", 16, "--quiet", *extra]


def journal_idx(out: Path) -> np.ndarray:
    parts = [np.load(p)["idx"] for p in Path(f"{out}.journal").glob("*/**/shard-*.npz") if ".tmp" not in p.name]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def calls(folder: Path) -> dict[str, int]:
    """Images each rank's encoder saw (the build encodes an image and its flip in one call: 2 per image)."""
    return {p.stem: sum(int(x) for x in p.read_text().split()) for p in folder.glob("rank-*.txt")}


def metrics(run: Path) -> list[dict]:
    """A run's metrics.jsonl without its speeds (images/s of the run and of its parallel group)."""
    return [{k: v for k, v in row.items() if not k.endswith("per_s")} for row in rundir.read_metrics(run)]


def assert_same_store(got: Path, want: Path, key: str, aug: bool = False) -> None:
    g, w = open_store(got).dataset("folders"), open_store(want).dataset("folders")
    np.testing.assert_array_equal(g.ids, w.ids)
    np.testing.assert_array_equal(g.labels, w.labels)
    np.testing.assert_array_equal(g.splits, w.splits)
    np.testing.assert_allclose(g.features(key), w.features(key), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(g.images(16), w.images(16))
    if aug:
        assert g.aug_views(key) == w.aug_views(key) > 0 and g.aug_recipe(key) == w.aug_recipe(key)
        np.testing.assert_array_equal(g.aug_params(key), w.aug_params(key))
        np.testing.assert_allclose(g.aug_features(key), w.aug_features(key), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist") / "faces"
    for i in range(36):
        fx.write_image(root / CLASSES[i % len(CLASSES)] / f"img_{i:04d}.jpg", size=16)
    return root


# ---------------------------------------------------------------- the plumbing, in one process
def test_detect_and_shard():
    assert detect({}) is SINGLE and detect({"WORLD_SIZE": "1"}) is SINGLE
    ctx = detect({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                  "FEATCACHE_DIST_TIMEOUT": "60"})
    assert (ctx.rank, ctx.world, ctx.local_rank, ctx.local_world, ctx.timeout) == (2, 4, 0, 2, 60.0)
    assert ctx.prefix == "[rank 2/4] " and not ctx.primary and ctx.progress(True)
    assert not Context(1, 4, 1, 2).progress(True) and ctx.journal_part == "rank-00002"
    work = np.arange(10)
    parts = [Context(r, 4).shard(work) for r in range(4)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))        # disjoint, complete
    assert [len(p) for p in parts] == [3, 3, 2, 2] and parts[1].tolist() == [1, 5, 9]
    logged = []
    ctx.prefixed(logged.append)("hello")
    assert logged == ["[rank 2/4] hello"]
    with pytest.raises(DistributedError, match="RANK"):
        detect({"WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match="FEATCACHE_DIST_TIMEOUT"):
        detect({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "FEATCACHE_DIST_TIMEOUT": "soon"})
    with pytest.raises(DistributedError, match="cuda:LOCAL_RANK"):
        ctx.device("cuda:1")
    assert ctx.device("cpu") == torch.device("cpu")


# ---------------------------------------------------------------- (1) sharded build == one-process build
def test_two_rank_build_equals_one_process_build(faces, tmp_path, tiny_clip_dir):
    """Tiny random CLIP, images and 2 augmented views: ids, labels, splits, row order and images exact,
    features and views allclose; each rank encoded its half, and only rank 0 printed the result."""
    ref, out = tmp_path / "ref.h5", tmp_path / "dist.h5"
    build_store(ref, "folders", faces, model=str(tiny_clip_dir), workers=0, device="cpu", batch_size=4,
                image_size=16, aug_views=2, progress=False, log=lambda m: None)
    r = torchrun("featcache", *build_args(faces, out, tiny_clip_dir, "--aug-views", 2))
    assert r.returncode == 0, r.stderr
    assert_same_store(out, ref, tiny_clip_dir.name, aug=True)
    assert "[rank 0/2] encoding 18 of the 36 images left on cpu" in r.stderr
    assert "[rank 1/2] encoding 18 of the 36 images left on cpu" in r.stderr
    assert "[rank 1/2] encoding 36 of the 72 augmented views left on cpu" in r.stderr
    assert r.stdout.count(f"{out}: dataset 'folders': 36 rows") == 1 and "encoded 36 now" in r.stdout
    assert "augmented views: 2 per image (2 added: 72 encoded now)" in r.stdout
    assert not Path(f"{out}.journal").exists() and not list(tmp_path.glob("dist.h5.tmp-*"))


# ---------------------------------------------------------------- (2) a rank killed, then the same command
def test_killed_rank_then_rerun_resumes_every_rank_and_equals_uninterrupted(faces, tmp_path):
    """Rank 1 SIGKILLs itself at its 3rd encoder call (2 of its batches journaled); torchrun stops rank 0. The
    same command again: nothing journaled is encoded again (counted at the encoder), the rest is split over
    both ranks, and the store equals an uninterrupted one-process build."""
    ref, out, counted = tmp_path / "ref.h5", tmp_path / "dist.h5", tmp_path / "calls"
    counted.mkdir()
    build_store(ref, "folders", faces, model=PLUGIN, workers=0, device="cpu", batch_size=4, image_size=16,
                progress=False, log=lambda m: None)
    killed = torchrun("featcache", *build_args(faces, out, PLUGIN), DIST_FAULT="kill", DIST_FAULT_RANK=1,
                      DIST_FAULT_CALL=3)
    assert killed.returncode != 0 and not out.exists()
    assert "rank      : 1 (local_rank: 1)" in killed.stderr and "(SIGKILL)" in killed.stderr  # torchrun's summary
    kept = journal_idx(out)
    assert len(kept) == len(np.unique(kept)) and 8 <= len(kept) < 36  # rank 1's 2 batches at least
    assert list(Path(f"{out}.journal").glob("*/rank-00001/shard-*.npz")), "rank 1 wrote no journal part"

    again = torchrun("featcache", *build_args(faces, out, PLUGIN), DIST_CALLS=counted)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {len(kept)}/36 images already encoded" in again.stderr
    seen = calls(counted)
    left = 36 - len(kept)
    assert sum(seen.values()) == 2 * left                   # every image left once (with its flip), none again
    assert set(seen) == {"rank-0", "rank-1"} and abs(seen["rank-0"] - seen["rank-1"]) <= 2 * 4  # split over both
    assert f"encoded {left} now, {len(kept)} resumed" in again.stdout
    assert_same_store(out, ref, PLUGIN_KEY)
    assert not Path(f"{out}.journal").exists()


def test_failing_rank_stops_the_others_with_its_reason(faces, tmp_path):
    """Rank 1 raises at its 2nd encoder call: it says why; rank 0 stops at the next meeting point naming rank 1
    and the reason (no waiting for a timeout); the journal keeps what both wrote; nothing is published. A
    one-process build then resumes the sharded journal and ends with the uninterrupted store."""
    out, ref = tmp_path / "dist.h5", tmp_path / "ref.h5"
    r = torchrun("featcache", *build_args(faces, out, PLUGIN), DIST_FAULT="error", DIST_FAULT_RANK=1,
                 DIST_FAULT_CALL=2, timeout=120)
    assert r.returncode != 0 and not out.exists()
    assert "[rank 1/2] failed while encoding: injected failure in call 2" in r.stderr
    assert "error: [rank 0/2] stopping: rank 1/2 failed while encoding: injected failure in call 2" in r.stderr
    kept = journal_idx(out)
    assert len(kept) >= 4 + 4  # rank 1's first batch and at least rank 0's first are kept for the rerun

    build_store(ref, "folders", faces, model=PLUGIN, workers=0, device="cpu", batch_size=4, image_size=16,
                progress=False, log=lambda m: None)
    rep = build_store(out, "folders", faces, model=PLUGIN, workers=0, device="cpu", batch_size=4, image_size=16,
                      progress=False, log=lambda m: None)
    assert (rep.resumed_from, rep.encoded_now) == (len(kept), 36 - len(kept))
    assert_same_store(out, ref, PLUGIN_KEY)


def test_a_held_store_lock_stops_every_rank(faces, tmp_path):
    """Rank 0 takes the store's lock for all ranks; when another build holds it, every rank stops with one line
    naming rank 0 and the lock, and nothing is encoded."""
    out, counted = tmp_path / "dist.h5", tmp_path / "calls"
    counted.mkdir()
    with store_lock(out):
        r = torchrun("featcache", *build_args(faces, out, PLUGIN), DIST_CALLS=counted, timeout=120)
    assert r.returncode != 0 and not out.exists() and calls(counted) == {}
    assert f"[rank 0/2] failed while taking the store lock: another featcache build is writing {out}" in r.stderr
    assert ("error: [rank 1/2] stopping: rank 0/2 failed while taking the store lock: another featcache build is "
            f"writing {out}") in r.stderr


# ---------------------------------------------------------------- (3) sharded sweep == one-process sweep
@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory, tiny_clip_dir) -> Path:
    return mf.two_domain_store(tmp_path_factory.mktemp("dist_sweep"), tiny_clip_dir,
                               {"train": 3, "val": 2, "test": 1}, {"train": 2, "test": 1})


SWEEP = ["--train", "domA", "--test", "domA,domB", "--epochs", 1, "--batch-size", 16, "--image-size", 16,
         "--drop", 1, "--device", "cpu", "--backbone", "mobilenet_v2", "--val-split", "val", "--quiet",
         "--grid", "lambda=0.5,1.5", "--grid", "seed=0,1"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [1, 2])
def test_two_rank_sweep_summary_equals_one_process_summary(sweep_store, tmp_path, parallel):
    """The same grid in one process and over 2 ranks (the groups --parallel forms, round-robin): the same runs,
    the same numbers (each configuration is deterministic given its seed), the same summary files."""
    one, two = tmp_path / "one", tmp_path / "two"
    grid = {"lam": [0.5, 1.5], "seed": [0, 1]}
    base = TrainConfig(cache=str(sweep_store), train="domA", test=["domA", "domB"], epochs=1, batch_size=16,
                       image_size=16, drop=1, device="cpu", backbone="mobilenet_v2", val_split="val")
    run_sweep(base, grid, one, parallel=parallel, progress=False, log=lambda m: None, dist_context=SINGLE)
    r = torchrun("maskfer", "sweep", "--cache", sweep_store, "--out", two, "--parallel", parallel, *SWEEP)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("| **selected** |") == 1          # rank 0 printed the summary, rank 1 nothing
    said = {rank: [ln.split("] ", 1)[1] for ln in r.stderr.splitlines() if ln.startswith(f"[rank {rank}/2] ")]
            for rank in (0, 1)}
    # the units round-robin: lone runs in grid order, or the two --parallel 2 chunks of the one group
    if parallel == 1:
        assert [ln for ln in said[0] if ln.startswith("[")] == ["[1/2] lambda=0.5_seed=0", "[2/2] lambda=1.5_seed=0"]
        assert [ln for ln in said[1] if ln.startswith("[")] == ["[1/2] lambda=0.5_seed=1", "[2/2] lambda=1.5_seed=1"]
    else:
        assert "training 2 configurations at once: lambda=0.5_seed=0, lambda=0.5_seed=1" in said[0]
        assert "training 2 configurations at once: lambda=1.5_seed=0, lambda=1.5_seed=1" in said[1]
        assert not any("lambda=1.5" in ln for ln in said[0] if ln.startswith("training"))
    assert all("2 of the 4 configurations to train are this rank's, on cpu" in said[k] for k in (0, 1))
    assert json.loads((two / "summary.json").read_text()) == json.loads((one / "summary.json").read_text())
    for f in ("summary.md", "summary.csv"):
        assert (two / f).read_text() == (one / f).read_text()
    for run in sorted((one / "runs").iterdir()):
        assert metrics(two / "runs" / run.name) == metrics(run)
        assert rundir.read_json(two / "runs" / run.name / rundir.RESULTS)["tests"] == \
            rundir.read_json(run / rundir.RESULTS)["tests"]
    # a rerun over 2 ranks trains nothing and writes the same summary
    again = torchrun("maskfer", "sweep", "--cache", sweep_store, "--out", two, "--parallel", parallel, *SWEEP)
    assert again.returncode == 0, again.stderr
    assert "4 configurations, 4 already finished" in again.stderr
    assert json.loads((two / "summary.json").read_text()) == json.loads((one / "summary.json").read_text())
