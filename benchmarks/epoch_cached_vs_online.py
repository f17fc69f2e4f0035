"""One epoch of CAFE with cached CLIP features (clean, and K augmented views) vs --online-encoder, in one run.

The online path recomputes the frozen CLIP features from every augmented batch, as the original
CAFE code does; the cached path reads them (and the flipped view) from the featcache store; the
K-view cache reads one of K stored augmented views per image (featcache build --aug-views K), whose
one-off encoding cost is reported beside the epochs. The
encoder is a RANDOM-INIT CLIP ViT-B/32 vision tower built from ``CLIPVisionConfig()`` defaults with
the default CLIP image processor (224 px), saved locally: the same compute as
openai/clip-vit-base-patch32 without downloading it. Features are meaningless; time is what counts.

    python benchmarks/epoch_cached_vs_online.py                  # 64 synthetic images, 112 px, 2 epochs
    python benchmarks/epoch_cached_vs_online.py --images 128 --threads 1

Epoch time = images / images_per_s from metrics.jsonl: the training loop only (batches, forward,
backward, step), not the checkpoint write, the encoder load or the store build. The first epoch
includes one-off kernel warm-up; the ratio is reported for the LAST epoch (warm) and for epoch 1.
Goal: cached / online <= 0.3.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from common import make_images  # noqa: E402 - benchmarks/common.py


def save_random_vit_b32(path: Path, seed: int = 0) -> Path:
    """ViT-B/32 shapes (CLIPVisionConfig defaults), random weights + the CLIP processor (224 px)."""
    from featcache.encoders.random_clip import VIT_B32, save_random_clip

    return save_random_clip(path, seed=seed, **VIT_B32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64, help="training images (synthetic)")
    ap.add_argument("--source-size", type=int, default=160, help="side of the synthetic image files")
    ap.add_argument("--image-size", type=int, default=112, help="mask-CNN input size (and cached image size)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is the warm measurement")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--views", type=int, default=4, help="K augmented views per image in the K-view cache")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads [default: torch's]")
    ap.add_argument("--workdir", default=None, help="keep everything here instead of a temp dir")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from featcache.build import build_store
    from maskfer.config import TrainConfig
    from maskfer.rundir import read_metrics
    from maskfer.train import train

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cafe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        clip = save_random_vit_b32(work / "clip-vit-b32-random")
        t_clip = time.perf_counter() - t
        root = make_images(work / "data", args.images, args.source_size)
        store = work / "features.h5"
        t = time.perf_counter()
        build_store(store, "folders", root, model=str(clip), name="bench", params={"split_dirs.train": "train"},
                    image_size=args.image_size, batch_size=32, device="cpu", workers=0, progress=False,
                    log=lambda m: None)
        t_build = time.perf_counter() - t
        t = time.perf_counter()
        build_store(store, "folders", root, model=str(clip), name="bench", params={"split_dirs.train": "train"},
                    image_size=args.image_size, batch_size=32, device="cpu", workers=0, progress=False,
                    log=lambda m: None, aug_views=args.views)
        t_views = time.perf_counter() - t

        base = dict(cache=str(store), train="bench", method="cafe", backbone=args.backbone, epochs=args.epochs,
                    batch_size=args.batch_size, image_size=args.image_size, device="cpu", seed=0)
        times = {}
        runs = (("cached", dict()), ("views", dict(views="augmented")), ("online", dict(online_encoder=True)))
        for name, kw in runs:
            cfg = TrainConfig(**base, **kw)
            train(cfg, work / f"run-{name}", progress=False, log=lambda m: None)
            times[name] = [args.images / r["images_per_s"] for r in read_metrics(work / f"run-{name}")]

        d = TrainConfig(**base)
        print("# CAFE: one epoch with cached CLIP features vs --online-encoder (measured in this run)")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
              f"torch {torch.__version__}, torch threads {torch.get_num_threads()}, device cpu "
              f"(load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}: shared machine, times are noisy)")
        print(f"encoder: random-init CLIP ViT-B/32 vision tower (CLIPVisionConfig defaults: 12 layers, width 768, "
              f"patch 32, 224 px input, 512-d projection) + default CLIP image processor")
        print(f"settings (both runs): images {args.images} (synthetic {args.source_size} px PNGs), method cafe, "
              f"backbone {d.backbone}, image_size {d.image_size}, batch_size {d.batch_size}, "
              f"steps/epoch {-(-args.images // d.batch_size)}, lr {d.lr}, drop {d.drop}, lambda {d.lam}, "
              f"beta {d.beta}, flip {d.flip}, erasing {d.erasing}, seed {d.seed}; only views / online_encoder differ")
        print(f"setup (not in epoch times): saving the ViT-B/32 {t_clip:.1f} s; featcache build of "
              f"{args.images} images x 2 views at 224 px + {args.image_size} px image cache {t_build:.1f} s; "
              f"adding {args.views} augmented views per image (--aug-views {args.views}) {t_views:.1f} s "
              f"(= {t_views / (args.images * args.views) * 1e3:.0f} ms per view, paid once)")
        print()
        print(f"| epoch | cached s/epoch | {args.views}-view cache s/epoch | online s/epoch | cached/online | "
              f"views/online | settings |")
        print("|---|---|---|---|---|---|---|")
        setting = f"{args.images} img, {args.image_size} px, batch {d.batch_size}, {d.backbone}, cpu x{torch.get_num_threads()}"
        for e, (c, v, o) in enumerate(zip(times["cached"], times["views"], times["online"])):
            tag = " (warm-up)" if e == 0 and args.epochs > 1 else ""
            print(f"| {e + 1}{tag} | {c:.2f} | {v:.2f} | {o:.2f} | {c / o:.3f} | {v / o:.3f} | {setting} |")
        c, v, o = times["cached"][-1], times["views"][-1], times["online"][-1]
        print()
        print(f"last epoch: cached {c:.2f} s ({args.images / c:.1f} img/s), {args.views}-view cache {v:.2f} s "
              f"({args.images / v:.1f} img/s) vs online {o:.2f} s ({args.images / o:.1f} img/s) at {setting}")
        print(f"ratio cached/online = {c / o:.3f}, views/online = {v / o:.3f} (goal <= 0.3: "
              f"{'met' if max(c, v) / o <= 0.3 else 'NOT met'}); online is {o / v:.1f}x slower than the view cache")
        print(json.dumps({"images": args.images, "image_size": args.image_size, "batch_size": d.batch_size,
                          "backbone": d.backbone, "threads": torch.get_num_threads(), "views": args.views,
                          "views_build_s": t_views, "cached_s_per_epoch": times["cached"],
                          "views_s_per_epoch": times["views"], "online_s_per_epoch": times["online"],
                          "ratio_last_epoch": c / o, "views_ratio_last_epoch": v / o}))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
