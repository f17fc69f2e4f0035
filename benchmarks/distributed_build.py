"""featcache build under torchrun: 1 rank vs R ranks on the same images, encoder and settings.

    python benchmarks/distributed_build.py [--ranks 1,2] [--n 128] [--rounds 2] [--model random-b32|tiny|SPEC]
        [--batch-size 16] [--workers 0] [--device cpu|cuda|auto] [--image-size 0]

Each measurement is one real ``torchrun --nproc-per-node R -m featcache build`` of the same ``--n`` generated
224x224 colour JPEGs (``folders`` layout, 7 class folders) into a fresh store, with OMP_NUM_THREADS=1 (one
intra-op thread per rank) and ``--workers 0`` by default (each rank decodes in its own process), so R ranks use
R cores. The rank counts alternate for ``--rounds`` rounds, so that load from other users of the machine hits
them alike; the table gives the median per rank count. Two rates per run:

* **build**: images / the seconds ``featcache build`` reports ("encoded N now in X s": ``build_store`` from its
  argument checks to the published store: listing, encoder load, process group, encoding, journal, commit);
* **command**: images / the wall time of the whole torchrun command (plus Python start-up and imports, once
  per rank, in parallel).

The CPU column is the user + system seconds of the whole command (torchrun and every rank): about the same for
every R when the work is split, not repeated. The speed-up is the rate of R ranks over the rate of 1 rank (R = 1 runs the same command without a process
group: torchrun with WORLD_SIZE=1 is a plain build). The stores of every run are compared with the first
1-rank store (ids, labels and row order exact; the largest feature difference is printed).

Encoder: ``random-b32`` (default), a random-initialised CLIP ViT-B/32 vision tower with projection saved with
``save_pretrained`` and the real CLIP processor settings (the compute of openai/clip-vit-base-patch32, which
cannot be downloaded here); ``tiny``: a 2-layer 64-wide CLIP with the same processor (start-up dominates:
useful to see the fixed cost); any other spec is passed to ``--model``.

On N GPUs (one node), every rank on cuda:LOCAL_RANK, decode workers per rank:

    python benchmarks/distributed_build.py --ranks 1,N --device cuda --workers 4 --n 20000 --batch-size 256
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common import B32, TINY, loadavg  # noqa: E402 - benchmarks/common.py

CLASSES7 = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_images(root: Path, n: int) -> None:
    """``n`` distinct 224x224 colour JPEGs in 7 class folders (q=90)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / CLASSES7[i % 7]
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=(1, 1, 3))
        img = np.clip(base + rng.normal(0, 40, size=(224, 224, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"img_{i:06d}.jpg", quality=90)


def make_clip(path: Path, arch: dict) -> Path:
    from featcache.encoders.random_clip import save_random_clip

    return save_random_clip(path, seed=0, **arch)


def run_build(ranks: int, root: Path, out: Path, model: str, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "featcache", "build", "--dataset", "folders", "--root", str(root),
           "--cache", str(out), "--model", model, "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--device", args.device, "--quiet"] + (["--image-size", str(args.image_size)] if args.image_size else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "COLUMNS": "300"}
    t0, cpu0 = time.perf_counter(), _children_cpu()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if r.returncode != 0:
        raise SystemExit(f"{ranks}-rank build failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr[-3000:]}")
    m = re.search(r"encoded (\d+) now in ([0-9.]+)s", r.stdout)
    if not m or int(m.group(1)) != args.n:
        raise SystemExit(f"unexpected output of the {ranks}-rank build:\n{r.stdout}\n{r.stderr[-2000:]}")
    return {"wall": wall, "build": float(m.group(2)), "cpu": cpu}


def _children_cpu() -> float:
    """User + system CPU seconds of every reaped child process (torchrun and its ranks) so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def compare(ref: Path, other: Path, key: str) -> float:
    import numpy as np

    from featcache import open_store

    with open_store(ref) as a, open_store(other) as b:
        da, db = a.dataset("folders"), b.dataset("folders")
        if not ((da.ids == db.ids).all() and (da.labels == db.labels).all()):
            raise SystemExit(f"{other}: ids or labels differ from the 1-rank store {ref}")
        return float(np.abs(da.features(key) - db.features(key)).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="1,2", help="rank counts to compare, the first is the baseline (default 1,2)")
    ap.add_argument("--n", type=int, default=128, help="images")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="random-b32")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0, help="decode workers per rank (0: in the rank's process)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image-size", type=int, default=0, help="also cache S px thumbnails (0: off)")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]

    import torch
    import transformers

    print("featcache build under torchrun (benchmarks/distributed_build.py)")
    print(f"   command: OMP_NUM_THREADS=1 {' '.join([Path(sys.executable).name, *sys.argv])}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"   machine: {platform.processor() or platform.machine()}, usable cores={cores}, "
          f"cuda={'yes: ' + str(torch.cuda.device_count()) + ' x ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}; "
          f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"   each rank: 1 torch thread (OMP_NUM_THREADS=1), --workers {args.workers}, --batch-size {args.batch_size}, "
          f"--device {args.device}; load avg at start {loadavg()} (other users share these cores)")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="featcache-dist-bench-") as td:
        tmp = Path(td)
        make_images(tmp / "faces", args.n)
        if args.model in ("random-b32", "tiny"):
            arch = B32 if args.model == "random-b32" else TINY
            model = str(make_clip(tmp / f"clip-{args.model}", arch))
            desc = ("random-init CLIP ViT-B/32 vision tower + projection" if args.model == "random-b32"
                    else "tiny random CLIP (2 layers, width 64)") + ", 224 px CLIP processor"
        else:
            model, desc = args.model, args.model
        print(f"   encoder: {desc}; images: {args.n} generated 224x224 colour JPEGs, each encoded with its flip")
        times: dict[int, list[dict]] = {r: [] for r in ranks}
        ref, key, worst = None, None, 0.0
        for rnd in range(args.rounds):
            for r in ranks:
                out = tmp / f"store-r{r}-{rnd}.h5"
                times[r].append(run_build(r, tmp / "faces", out, model, args))
                if ref is None:
                    ref = out
                    from featcache import open_store

                    with open_store(ref) as s:
                        key = s.dataset("folders").encoders()[0]
                else:
                    worst = max(worst, compare(ref, out, key))
                    if out != ref:
                        out.unlink()
                print(f"   round {rnd + 1}/{args.rounds}, {r} rank(s): build {times[r][-1]['build']:.1f} s, "
                      f"command {times[r][-1]['wall']:.1f} s, CPU {times[r][-1]['cpu']:.1f} s "
                      f"(load avg {loadavg()})", flush=True)
        shutil.rmtree(tmp / "faces", ignore_errors=True)

    med = {r: {k: statistics.median(t[k] for t in times[r]) for k in ("build", "wall", "cpu")} for r in ranks}
    base = ranks[0]
    print()
    print(f"| ranks | build s (median of {args.rounds}) | images/s (build) | speed-up | command s | images/s (command) "
          "| speed-up | CPU s, all processes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in ranks:
        b, w, c = med[r]["build"], med[r]["wall"], med[r]["cpu"]
        print(f"| {r} | {b:.1f} | {args.n / b:.1f} | {med[base]['build'] / b:.2f}x | {w:.1f} | {args.n / w:.1f} | "
              f"{med[base]['wall'] / w:.2f}x | {c:.1f} |")
    print(f"\n   every store equals the first {base}-rank store: ids, labels, row order exact; "
          f"largest |feature difference| {worst:.2e}")
    print(f"   total benchmark wall time {time.perf_counter() - t_start:.0f} s; load avg at end {loadavg()}")


if __name__ == "__main__":
    main()
