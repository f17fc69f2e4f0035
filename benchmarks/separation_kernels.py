"""Vectorised separation kernels vs the per-group reference, and their share of a training step.

    python benchmarks/separation_kernels.py [--device cpu|cuda] [--repeats N] [--threads N]

"Kernels" means the whole CAFE regulariser in one forward+backward: draw the per-sample channel
drop mask, compute the separation logits on the dropped features and their CE, compute the
diverse loss, then backpropagate ``1.5 * sep + 5 * div`` to the masked features. The reference
does the same with Python loops over groups (maskfer.separation.reference_*). Both pooling
modes are timed: "official" (the paper's code and the default: windows of 73 on channels
0..510, a free view) and "balanced" (the 6 x 73 + 74 mask groups, one gather).

The training step is MaskModel(resnet18) forward + cafe_loss + backward + SGD step on
already-normalised float images (no data loading or augmentation). On CPU a 224 px step of 256
images is too slow to repeat, so CPU uses batch 32 at 112 px; CUDA uses batch 256 at 224 px.
The kernels' share of the step is measured at the step's own batch size.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maskfer.model import MaskModel, cafe_loss  # noqa: E402
from maskfer.separation import (  # noqa: E402
    random_drop_mask,
    reference_diverse_loss,
    reference_drop_mask,
    reference_group_bounds,
    reference_separation_logits,
    separation_losses,
)

NUM_CLASSES, DROP, LAM, BETA = 7, 10, 1.5, 5.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fns: dict, device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time per function. Calls are interleaved, so load from other processes on the
    machine hits every contender alike and the ratios stay fair."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def original_style_drop_mask(batch: int, channels: int, device: torch.device) -> torch.Tensor:
    """CAFE's ``Mask()`` (Python lists + random.shuffle per group), called once per sample to get
    per-sample patterns: what a direct port of the original does. Context only."""
    rows = []
    for _ in range(batch):
        row = []
        for start, end in reference_group_bounds(channels, NUM_CLASSES):
            group = [1.0] * (end - start - DROP) + [0.0] * DROP
            random.shuffle(group)
            row += group
        rows.append(row)
    return torch.tensor(rows, device=device)


def kernel_fns(batch: int, channels: int, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, channels, device=device, generator=gen).requires_grad_()
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device, generator=gen)

    def vectorised(groups):
        def run():
            out = separation_losses(x, y, NUM_CLASSES, drop=DROP, per_sample=True, generator=gen, groups=groups)
            (LAM * out.sep_loss + BETA * out.div_loss).backward()
            x.grad = None
        return run

    def with_mask(make_keep, groups="official"):
        def run():
            keep = make_keep()
            sep = F.cross_entropy(reference_separation_logits(x, NUM_CLASSES, keep, groups), y)
            (LAM * sep + BETA * reference_diverse_loss(x, NUM_CLASSES, groups)).backward()
            x.grad = None
        return run

    per_group = with_mask(lambda: reference_drop_mask(batch, channels, NUM_CLASSES, DROP, generator=gen, device=device))
    per_sample = with_mask(lambda: original_style_drop_mask(batch, channels, device))
    return {"vectorised": vectorised("official"), "vectorised-balanced": vectorised("balanced"),
            "per-group": per_group, "per-sample": per_sample}


def drop_mask_fns(batch: int, channels: int, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    return {
        "vectorised": lambda: random_drop_mask(batch, channels, NUM_CLASSES, DROP, generator=gen, device=device),
        "per-group": lambda: reference_drop_mask(batch, channels, NUM_CLASSES, DROP, generator=gen, device=device),
    }


def train_step_fn(batch: int, size: int, channels: int, device: torch.device):
    torch.manual_seed(0)
    model = MaskModel("resnet18", feat_dim=channels, num_classes=NUM_CLASSES).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, size, size, device=device)
    feats = torch.randn(batch, channels, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def step():
        out = model(images, feats)
        total, _ = cafe_loss(out, y, lam=LAM, beta=BETA, drop=DROP)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=50, help="timed repeats of the kernels (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but CUDA is not available")
    device = torch.device(args.device)
    channels, batch = 512, 256
    step_batch, step_size = (32, 112) if device.type == "cpu" else (256, 224)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    ms = lambda t: f"{t * 1e3:8.3f} ms"  # noqa: E731
    print(f"torch {torch.__version__} on {name}")
    print(f"[kernels] per-sample channel drop ({DROP}/group) + separation CE + diverse loss, forward+backward; "
          f"B={batch}, C={channels}, L={NUM_CLASSES} (drop groups 6x73 + 74; official windows 7x73); "
          f"median of {args.repeats}, interleaved, after 10 warm-up")
    t = median_seconds(kernel_fns(batch, channels, device), device, 10, args.repeats)
    print(f"  vectorised (maskfer.separation.separation_losses)       B={batch}: {ms(t['vectorised'])}"
          "   (official windows, the default)")
    print(f"  vectorised, groups='balanced' (gather of 6x73 + 74)    B={batch}: {ms(t['vectorised-balanced'])}")
    print(f"  per-group reference (loops over the 7 groups)          B={batch}: {ms(t['per-group'])}"
          f"   speed-up {t['per-group'] / t['vectorised']:5.1f}x (goal >= 10x)")
    print(f"  per-sample original-style Mask() (loops over B and L)  B={batch}: {ms(t['per-sample'])}"
          f"   speed-up {t['per-sample'] / t['vectorised']:5.1f}x (context)")
    d = median_seconds(drop_mask_fns(batch, channels, device), device, 10, args.repeats)
    print(f"  of which the drop-mask draw alone: vectorised {ms(d['vectorised'])}, per-group {ms(d['per-group'])}"
          f"  B={batch} (rand + topk vs rand + argsort per group)")

    small = median_seconds(kernel_fns(step_batch, channels, device), device, 10, args.repeats)
    step_repeats = 5 if device.type == "cpu" else 20
    step = median_seconds({"step": train_step_fn(step_batch, step_size, channels, device)}, device, 2, step_repeats)["step"]
    print(f"[training step] MaskModel(resnet18) forward + cafe_loss + backward + SGD step on float images; "
          f"batch {step_batch} at {step_size} px, C={channels}; median of {step_repeats} after 2 warm-up")
    print(f"  full step                                   B={step_batch}, {step_size} px: {step * 1e3:8.1f} ms")
    for key in ("vectorised", "vectorised-balanced", "per-group"):
        print(f"  {key + ' kernels':<42}  B={step_batch}:         {ms(small[key])} = {100 * small[key] / step:5.2f}% of the step")


if __name__ == "__main__":
    main()
