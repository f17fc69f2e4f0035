"""K configurations trained at once (maskfer.parallel.train_parallel) vs one after another (Trainer).

    python benchmarks/sweep_parallel.py [--device auto|cpu|cuda] [--k 8] [--image-size S]
        [--n-images N] [--batch-size 32] [--backbone resnet18] [--epochs 1] [--threads T]
        [--layout auto|grouped|loop|both] [--workdir DIR] [--order parallel-first|sequential-first]

One run builds its own small feature store and measures, on the same device and settings:

* **sequential**: the K configurations trained one after another, each by ``maskfer.train.Trainer``
  into its own run directory (what ``maskfer sweep`` does without ``--parallel``);
* **parallel**: the same K configurations trained by ``train_parallel`` as one fused model, with
  the backbone layout ``--layout`` (auto: grouped convolutions on CUDA, the K backbones called in
  a loop on CPU; ``both`` measures grouped and loop).

The K configurations are a lam x beta x drop (x seed) grid around the paper's defaults (lam 1.5,
beta 5, drop 10), all other settings equal, so they form one parallel group.

Reported: *model-images/s* = K x images x epochs / seconds, both for the training loops alone (the
sum of each run's epoch time, from the ``images_per_s`` every run writes to metrics.jsonl: that
excludes model building, data loading and checkpoint writing) and end to end (wall clock of the
whole call, including those). Ratio = parallel / sequential. Goal: >= 4x on a GPU; on a CPU, not
slower (a CPU has no idle parallelism for the fused network to use; what is saved is the K-1
repeated batch loading/augmentation and the per-layer call overhead).

Store. No CLIP weights can be downloaded here, and features only matter for their shape, so the
encoder is a random tiny CLIP vision tower (2 layers, width 32) whose projection is 512-d, as
ViT-B/32's: the cached features are (N, 2, 512) like the real ones. Images are generated (one colour
and stripe pattern per class, noise), written as PNG class folders and cached in the store at
``--image-size``, so the training reads them from the in-memory image cache as usual.
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featcache.taxonomy import CLASSES  # noqa: E402
from maskfer import rundir  # noqa: E402
from maskfer.config import TrainConfig  # noqa: E402
from maskfer.parallel import default_layout, train_parallel  # noqa: E402
from featcache.devices import resolve_device  # noqa: E402
from maskfer.train import Trainer  # noqa: E402


def make_images(root: Path, n_images: int, size: int, seed: int = 0) -> Path:
    """root/train/<class>/<i>.png: a class colour, class-dependent stripes, Gaussian noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 230, size=(len(CLASSES), 3))
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n_images):
        label = i % len(CLASSES)
        stripes = ((xx + yy * (label % 2)) // (2 + label)) % 2
        img = colours[label] * (0.75 + 0.25 * stripes[..., None]) + rng.normal(0, 12, (size, size, 3))
        d = root / "train" / CLASSES[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:05d}.png")
    return root


def make_tiny_clip(path: Path, projection_dim: int = 512) -> Path:
    """A random 2-layer CLIP vision tower (32 px input) with a ``projection_dim`` projection."""
    from featcache.encoders.random_clip import save_random_clip

    return save_random_clip(path, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8, projection_dim=projection_dim)


def build_store(work: Path, n_images: int, image_size: int) -> Path:
    from featcache.build import build_store as build

    store = work / "features.h5"
    if store.exists():
        return store
    root = make_images(work / "images", n_images, image_size)
    clip = make_tiny_clip(work / "tiny-clip-512")
    build(store, "folders", root, model=str(clip), name="bench", params={"split_dirs.train": "train"},
          image_size=image_size, progress=False, workers=0, device="cpu", log=lambda m: None)
    return store


def grid(k: int) -> list[dict]:
    """The first k points of lam x beta x drop x seed."""
    points = itertools.product([0, 1, 2, 3], [10, 5], [5.0, 1.0], [1.5, 0.5])  # seed, drop, beta, lam
    return [dict(seed=s, drop=d, beta=b, lam=lam) for s, d, b, lam in itertools.islice(points, k)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=None, help="default: 112 on CPU, 224 on CUDA")
    ap.add_argument("--n-images", type=int, default=None, help="default: 224 on CPU, 4096 on CUDA")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--workdir", default=None, help="keep the store and run dirs here (default: a temp dir)")
    ap.add_argument("--order", choices=["parallel-first", "sequential-first"], default="parallel-first")
    ap.add_argument("--layout", choices=["auto", "grouped", "loop", "both"], default="auto")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    size = args.image_size or (224 if cuda else 112)
    n_images = args.n_images or (4096 if cuda else 224)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="sweep_parallel_")
        work = Path(tmp.name)
    settings = (f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if cuda else ''}, "
                f"{torch.get_num_threads()} CPU threads, {args.backbone}, {size} px, batch {args.batch_size}, "
                f"{n_images} images x {args.epochs} epoch(s), 512-d features, K={args.k}, torch {torch.__version__}")
    print(f"settings: {settings}", flush=True)

    t = time.perf_counter()
    store = build_store(work, n_images, size)
    print(f"store built in {time.perf_counter() - t:.1f} s: {store}", flush=True)
    cfgs = [TrainConfig(cache=str(store), train="bench", epochs=args.epochs, batch_size=args.batch_size,
                        image_size=size, backbone=args.backbone, device=str(device), **p) for p in grid(args.k)]
    for c in cfgs:
        c.validate()
    print("configurations: " + "; ".join(f"lam {c.lam} beta {c.beta} drop {c.drop} seed {c.seed}" for c in cfgs))

    def sequential() -> tuple[float, float]:
        shutil.rmtree(work / "seq", ignore_errors=True)  # a kept --workdir must not resume old runs
        outs = [work / "seq" / f"run{i}" for i in range(len(cfgs))]
        t0 = time.perf_counter()
        for cfg, out in zip(cfgs, outs):
            Trainer(cfg, out, progress=False, log=lambda m: None).run()
        return time.perf_counter() - t0, sum(_loop_s(o, n_images) for o in outs)

    def parallel(layout: str) -> tuple[float, float]:
        shutil.rmtree(work / f"par-{layout}", ignore_errors=True)
        outs = [work / f"par-{layout}" / f"run{i}" for i in range(len(cfgs))]
        t0 = time.perf_counter()
        train_parallel(cfgs, outs, progress=False, log=lambda m: None, layout=layout)
        return time.perf_counter() - t0, _loop_s(outs[0], n_images)

    layouts = {"auto": [default_layout(device)], "both": ["grouped", "loop"]}.get(args.layout, [args.layout])
    _warmup(cfgs, device, size, args.batch_size, layouts)
    names = [f"parallel-{lay}" for lay in layouts]
    names = names + ["sequential"] if args.order == "parallel-first" else ["sequential"] + names
    results = {}
    work_images = len(cfgs) * n_images * args.epochs
    for name in names:
        _sync(device)
        wall, loop = sequential() if name == "sequential" else parallel(name.split("-", 1)[1])
        results[name] = (wall, loop)
        print(f"{name:>17}: {work_images / loop:8.1f} model-images/s in training loops ({loop:.1f} s), "
              f"{work_images / wall:8.1f} end to end ({wall:.1f} s)", flush=True)
    sw, sl = results["sequential"]
    for name in names:
        if name != "sequential":
            pw, pl = results[name]
            print(f"ratio {name}/sequential: {sl / pl:.2f}x in training loops, {sw / pw:.2f}x end to end  [{settings}]")
    if tmp is not None:
        tmp.cleanup()


def _loop_s(run: Path, n_images: int) -> float:
    return sum(n_images / r["images_per_s"] for r in rundir.read_metrics(run))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warmup(cfgs, device, size, batch, layouts) -> None:
    """One forward/backward of a single model and of each K-stack, so no timing pays first-call costs."""
    from maskfer.stacking import StackedModel
    from maskfer.model import create_model as build_model

    models = [build_model(c, 512) for c in cfgs]
    x = torch.randn(batch, 3, size, size, device=device)
    f = torch.randn(batch, 512, device=device)
    for m in [models[0].to(device)] + [StackedModel(models, lay).to(device) for lay in layouts]:
        m.train()
        m(x, f)["logits"].sum().backward()
    _sync(device)


if __name__ == "__main__":
    main()
