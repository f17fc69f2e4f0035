"""What finding and aligning a face costs next to classifying it, per face, measured side by side in one run.

The demo's 960x540 group photo (maskfer.demo_photo: a real public-domain portrait that matplotlib ships,
pasted three times: smaller, rotated 15 degrees, mirrored) goes through
BlazeFace (maskfer.faces, full range and short range) and the eye alignment (maskfer.align); each
aligned face then goes through the frozen encoders' preprocessing + forward (a RANDOM-INIT CLIP ViT-B/32
vision tower: the compute of openai/clip-vit-base-patch32 without downloading it; EfficientNet-Lite0
with its ImageNet weights when installed) and the ResNet-18 mask CNN at 112 px. Median of --repeats
after one warm-up; batch 1 (one face at a time, the latency a photo app sees).

    python benchmarks/face_pipeline.py --threads 1
    python benchmarks/face_pipeline.py --device cuda        # the torch parts on the GPU (BlazeFace stays on CPU)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402


def timed(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from featcache.encoders import create_encoder
    from featcache.encoders.random_clip import VIT_B32, save_random_clip
    from maskfer.align import align_face
    from maskfer.backbones import create_backbone
    from maskfer.demo_photo import group_photo, portrait
    from maskfer.faces import create_detector

    face = portrait()
    if face is None:
        raise SystemExit("needs matplotlib (the report extra), which ships the portrait the photo is made of")
    img, _ = group_photo(face)
    dev = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    rows = []
    crop = None
    for name in ("blazeface", "blazeface-short"):
        det = create_detector(name, threads=a.threads)
        faces = det.detect(img)
        rows.append((f"detect: {name} (whole photo / faces found)", timed(lambda: det.detect(img), a.repeats) / len(faces),
                     f"{len(faces)} faces"))
        if crop is None:
            f0 = faces[0]
            rows.append(("align: one face, 224 px crop", timed(lambda: align_face(img, f0), a.repeats), ""))
            crop = Image.fromarray(align_face(img, f0))
    with tempfile.TemporaryDirectory() as tmp:
        specs = [("encoder: CLIP ViT-B/32 (random init), preprocess + forward",
                  str(save_random_clip(Path(tmp) / "vitb32", **VIT_B32)))]
        try:
            import efficientnet_lite_pytorch  # noqa: F401

            specs.append(("encoder: EfficientNet-Lite0, preprocess + forward", "efficientnet-lite0"))
        except ImportError:
            pass
        for label, spec in specs:
            enc = create_encoder(spec, device=str(dev))

            def run(enc=enc):
                with torch.inference_mode():
                    enc.module(enc.preprocess(crop)[None].to(dev))

            rows.append((label, timed(run, a.repeats, sync), ""))
    cnn = create_backbone("resnet18").to(dev).eval()
    x = torch.rand(1, 3, 112, 112, device=dev)

    def cnn_run():
        with torch.inference_mode():
            cnn(x)

    rows.append(("mask CNN: ResNet-18 at 112 px, forward", timed(cnn_run, a.repeats, sync), ""))
    ref = next(ms for label, ms, _ in rows if label.startswith("encoder: CLIP"))
    print(f"# face pipeline, per face, batch 1, median of {a.repeats} -- {platform.processor() or platform.machine()}, "
          f"torch threads {torch.get_num_threads()}, device {dev}")
    print(f"| step | ms per face | / CLIP ViT-B/32 forward | note |\n|---|---|---|---|")
    for label, ms, note in rows:
        print(f"| {label} | {ms:.2f} | {ms / ref:.2f}x | {note} |")


if __name__ == "__main__":
    main()
