"""`maskfer demo`: the whole pipeline on generated data, runnable offline on a fresh machine.

Cartoon faces in two renderings ("domains") of the SAME seven expressions: the geometry of eyes,
brows and mouth per class is shared (one table, EXPRESSIONS); only the rendering differs (STYLES:
colours, light-on-dark ink, outline, shading, striped background, smaller face, thinner lines, blur,
noise). Models are trained on the seen rendering and tested on both, the cross-dataset setting in
miniature. The path is the product's: featcache build -> maskfer train (linear probe, end-to-end
baseline, CAFE) -> maskfer eval's evaluation and table. The encoder is the real ImageNet
EfficientNet-Lite0 whose weights ship in a pip package (offline); a tiny random CLIP can be chosen
for tests, and then the numbers only show that the pipeline runs.

This is a DEMO on generated data: what it shows is said from the numbers it got (demo_reading),
never assumed.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from featcache import open_store
from featcache.build import build_store
from featcache.encoders import EncoderError
from featcache.encoders.random_clip import save_random_clip
from featcache.taxonomy import CLASSES
from maskfer.config import TrainConfig
from maskfer.errors import FerError
from maskfer.evaluate import cross_table, evaluate_run, table_markdown, write_tables
from maskfer.train import train

DEFAULT_ENCODER = "efficientnet-lite0"
TINY_ENCODER = "tiny-random-clip"   # --encoder value: a tiny random CLIP saved in the demo directory
METHODS = ("linear-probe", "baseline", "cafe")
METHOD_NAMES = {"linear-probe": "linear probe", "baseline": "end-to-end baseline", "cafe": "CAFE"}
SEEN, UNSEEN = "demo-seen", "demo-unseen"
SOURCE_SIZE = 64                    # generated image size (the encoder resizes to its own input size)
INSTALL_HINT = "bash scripts/setup.sh  (or: pip install 'cafe-fer[efficientnet]')"

# The expression of each class, in units of the face radius, shared by every rendering: eye radius,
# brow height above the eye, brow tilt (+: inner ends low, a frown), mouth shape.
EXPRESSIONS = {
    "surprise":  {"eye": 0.17, "brow_up": 0.45, "tilt": 0.00, "mouth": "o"},
    "fear":      {"eye": 0.17, "brow_up": 0.40, "tilt": -0.14, "mouth": "zigzag"},
    "disgust":   {"eye": 0.07, "brow_up": 0.26, "tilt": 0.10, "mouth": "slant"},
    "happiness": {"eye": 0.10, "brow_up": 0.32, "tilt": 0.00, "mouth": "smile"},
    "sadness":   {"eye": 0.10, "brow_up": 0.30, "tilt": -0.16, "mouth": "frown"},
    "anger":     {"eye": 0.10, "brow_up": 0.24, "tilt": 0.20, "mouth": "bar"},
    "neutral":   {"eye": 0.10, "brow_up": 0.32, "tilt": 0.00, "mouth": "line"},
}
# How a face is drawn. Colour pairs are ranges each image draws from; scale: the face size range; width: line
# width factor; shading: strength of the face's lighting; gradient: background darkening (levels); blur: std (px).
# Kept to changes an ImageNet encoder partly sees through: with pixel noise (std 4 levels) or a striped background
# added, a linear probe on EfficientNet-Lite0 features fell to 27-33 % on the unseen domain (light ink on a dark
# striped background, noise and blur: all three methods at 14-23 %), and a demo where everything fails shows nothing.
STYLES = {
    "flat": {"bg": ((225, 215, 195), (245, 235, 220)), "skin": ((230, 185, 140), (250, 215, 180)),
             "ink": (45, 30, 25), "outline": False, "shading": 0.0, "gradient": 0, "scale": (0.95, 1.08),
             "width": 1.0, "blur": 0.0},
    "shaded-outlined": {"bg": ((200, 215, 235), (225, 235, 250)), "skin": ((215, 205, 215), (235, 225, 235)),
                        "ink": (30, 40, 90), "outline": True, "shading": 0.3, "gradient": 60,
                        "scale": (0.78, 0.9), "width": 0.7, "blur": 0.5},
}
DOMAINS = {SEEN: "flat", UNSEEN: "shaded-outlined"}   # dataset name in the store -> its rendering


class DemoError(FerError):
    """The demo cannot run as asked (encoder missing, a demo directory made with other settings)."""


# ---------------------------------------------------------------------------- generated faces
def _mix(pair, t: float) -> tuple[int, ...]:
    a, b = np.asarray(pair[0], float), np.asarray(pair[1], float)
    return tuple(int(v) for v in a + (b - a) * t)


def _shaded_disc(d: ImageDraw.ImageDraw, box, skin, strength: float) -> None:
    """A face lit from the upper left: nested ellipses from a dark rim to a light, off-centre spot."""
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    for t in np.linspace(0, 1, 24):
        f = 1 - t * 0.95
        ox, oy = -0.25 * rx * t, -0.3 * ry * t
        d.ellipse([cx + ox - rx * f, cy + oy - ry * f, cx + ox + rx * f, cy + oy + ry * f],
                  fill=tuple(int(c * (1 - strength * (1 - t))) for c in skin))


def _background(st: dict, bg: tuple[int, ...], big: int) -> Image.Image:
    """Flat, or lit from above: darker by ``gradient`` levels towards the bottom."""
    ramp = np.linspace(0, st["gradient"], big, dtype=np.float32)[:, None, None]
    pixels = (np.asarray(bg, np.float32) - ramp).clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.broadcast_to(pixels, (big, big, 3)).copy()).convert("RGBA")


def render_face(expression: str, style: str, rng: np.random.Generator, size: int = SOURCE_SIZE) -> Image.Image:
    """One face: the class geometry of ``expression`` (with +-10 % jitter per quantity) drawn in ``style``."""
    e, st = EXPRESSIONS[expression], STYLES[style]
    ss = 4  # drawn 4x larger, then downsampled: smooth lines of any width
    big = size * ss
    background = _background(st, _mix(st["bg"], rng.uniform()), big)
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))  # the face alone: rotated without dragging the background
    d = ImageDraw.Draw(layer)
    r = big * 0.40 * rng.uniform(*st["scale"])
    cx, cy = big * (0.5 + rng.uniform(-0.05, 0.05)), big * (0.5 + rng.uniform(-0.05, 0.05))
    skin, face = _mix(st["skin"], rng.uniform()), [cx - r, cy - r * 1.1, cx + r, cy + r * 1.1]
    if st["shading"]:
        _shaded_disc(d, face, skin, st["shading"])
    else:
        d.ellipse(face, fill=skin)
    ink, w = st["ink"], max(1, round(r / 12 * st["width"]))
    if st["outline"]:
        d.ellipse(face, outline=ink, width=w)

    def jit(v: float) -> float:
        return v * rng.uniform(0.9, 1.1)

    eye_y, eye_dx, eye_r = cy - r * 0.25, r * 0.4, r * jit(e["eye"])
    for sx in (-1, 1):
        ex = cx + sx * eye_dx
        d.ellipse([ex - eye_r, eye_y - eye_r, ex + eye_r, eye_y + eye_r], fill=ink)
        by, tilt = eye_y - r * jit(e["brow_up"]), jit(e["tilt"]) * r
        d.line([ex - sx * r * 0.22, by + tilt, ex + sx * r * 0.22, by - tilt], fill=ink, width=w)
    my, mw, m = cy + r * 0.45, r * jit(0.45), e["mouth"]
    if m == "smile":
        d.arc([cx - mw, my - mw * 0.7, cx + mw, my + mw * 0.5], 20, 160, fill=ink, width=w + ss)
    elif m == "frown":
        d.arc([cx - mw, my, cx + mw, my + mw * 0.9], 200, 340, fill=ink, width=w + ss)
    elif m == "o":
        d.ellipse([cx - mw * 0.35, my - mw * 0.4, cx + mw * 0.35, my + mw * 0.4], outline=ink, width=w + ss)
    elif m == "zigzag":
        d.line([(cx - mw + k * mw / 3, my + (mw * 0.12 if k % 2 else -mw * 0.12)) for k in range(7)],
               fill=ink, width=w, joint="curve")
    elif m == "slant":
        d.line([cx - mw, my + mw * 0.2, cx, my - mw * 0.1, cx + mw, my - mw * 0.35], fill=ink, width=w + ss,
               joint="curve")
    elif m == "bar":
        d.rectangle([cx - mw * 0.7, my - mw * 0.15, cx + mw * 0.7, my + mw * 0.15], fill=ink)
    else:  # line: neutral
        d.line([cx - mw * 0.7, my, cx + mw * 0.7, my], fill=ink, width=w)
    layer = layer.rotate(rng.uniform(-8, 8), resample=Image.BICUBIC)
    img = Image.alpha_composite(background, layer).convert("RGB").resize((size, size), Image.LANCZOS)
    return img.filter(ImageFilter.GaussianBlur(st["blur"])) if st["blur"] else img


def make_demo_dataset(root: Path, domain: str, per_class: dict[str, int], seed: int = 0) -> Path:
    """Writes <root>/<split>/<class>/<k>.png (the data_manifests/demo.toml layout); a split of 0 images is an
    empty folder (the unseen domain is only tested on)."""
    rng = np.random.default_rng([seed, list(DOMAINS).index(domain)])
    for split, n in per_class.items():
        (Path(root) / split).mkdir(parents=True, exist_ok=True)
        for cls in CLASSES if n else ():
            folder = Path(root) / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                render_face(cls, DOMAINS[domain], rng).save(folder / f"{k:04d}.png")
    return Path(root)


def tiny_clip(path: Path, projection_dim: int = 64) -> Path:
    """A tiny RANDOM CLIP vision tower saved like a hub checkpoint (fast tests; its features mean nothing)."""
    if (path / "config.json").exists():
        return path
    return save_random_clip(path, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                            image_size=64, patch_size=16, projection_dim=projection_dim)


def drop_for(dim: int, num_classes: int = len(CLASSES)) -> int:
    """The paper's 10-of-73 channel drop, scaled to another feature dimension."""
    return max(1, math.floor(10 * (dim // num_classes) / 73))


# ---------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class DemoSettings:
    """What decides the demo's data and runs (recorded in <out>/demo.json; a rerun must match)."""
    encoder: str = DEFAULT_ENCODER
    seed: int = 0
    epochs: int = 12
    image_size: int = 40          # the CNN's input (mask CNN and baseline); the encoder takes its own size
    train_per_class: int = 30
    test_per_class: int = 15
    version: int = 2              # of the generated data (2: one geometry, two renderings)


@dataclass
class DemoRun:
    """What run_demo made. ``runs`` (method -> run directory) is the hook for later steps, e.g. predicting
    with ``runs["cafe"]``; ``results`` are maskfer.evaluate.evaluate_run's, one per method."""
    out: Path
    store: Path
    settings: DemoSettings
    runs: dict[str, Path]
    results: list[dict]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def tiny(self) -> bool:
        return self.settings.encoder == TINY_ENCODER


def _check_settings(out: Path, settings: DemoSettings) -> None:
    """A demo directory holds one generated data set and its runs: another seed or size needs another --out."""
    record = out / "demo.json"
    want = asdict(settings)
    if record.exists():
        try:
            have = json.loads(record.read_text())
        except (OSError, ValueError) as e:
            raise DemoError(f"{record} is unreadable ({e}); delete {out} or use another --out") from None
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            raise DemoError(f"{out} holds a demo made with other settings ("
                            + ", ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in diff)
                            + f"); use another --out, or delete {out}")
        return
    if out.exists() and any(out.iterdir()):
        raise DemoError(f"{out} exists and is not a demo directory (no demo.json): use another --out, or delete "
                        f"it (a demo made before demo.json existed)")
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(want, indent=2) + "\n")


def _build(store: Path, out: Path, settings: DemoSettings, device: str, progress: bool, log) -> str:
    """featcache build of both domains; returns the encoder key."""
    spec = str(tiny_clip(out / "tiny-clip")) if settings.encoder == TINY_ENCODER else settings.encoder
    key = None
    for dom in DOMAINS:
        try:
            # batch 16, not featcache's 64: on a CPU, EfficientNet-Lite0's 224 px activations of 64 images cost
            # more time in page faults than in compute (measured: about twice the encoding time, one thread)
            r = build_store(store, "demo", out / "data" / dom, model=spec, name=dom, image_size=settings.image_size,
                            batch_size=16, workers=0, device=device, progress=progress, log=log)
        except EncoderError as e:  # raised while loading the encoder, before anything is written
            if settings.encoder != DEFAULT_ENCODER:
                raise
            why = e.__cause__ or str(e).splitlines()[0]  # the ImportError when a package is missing
            raise DemoError(f"the demo's encoder {DEFAULT_ENCODER!r} cannot be loaded ({why}). "
                            f"Install it with: {INSTALL_HINT}; or run the pipeline check only with "
                            f"--encoder {TINY_ENCODER} (a random encoder: its numbers mean nothing)") from None
        key = r.encoder_key
        log(f"featcache: {dom}: {r.rows} images in {store}" + (" (already built)" if r.up_to_date else
                                                                  f" ({r.seconds:.0f} s)"))
    return key


def run_demo(out: Path, encoder: str = DEFAULT_ENCODER, seed: int = 0, epochs: int = DemoSettings.epochs,
             image_size: int = DemoSettings.image_size,
             per_class: tuple[int, int] = (DemoSettings.train_per_class, DemoSettings.test_per_class),
             device: str = "auto", progress: bool = True, log=print) -> DemoRun:
    """Generate data -> featcache build -> maskfer train (METHODS) on the seen domain -> evaluate on both.

    ``encoder``: a featcache spec (default the real EfficientNet-Lite0) or TINY_ENCODER. ``per_class``:
    (train, test) images per class of the seen domain; the unseen domain gets ``test`` per class, test only.
    Rerunning with the same settings reuses the data, the store and the finished runs."""
    t0 = time.perf_counter()
    out = Path(out)
    settings = DemoSettings(encoder=str(encoder), seed=int(seed), epochs=int(epochs), image_size=int(image_size),
                            train_per_class=int(per_class[0]), test_per_class=int(per_class[1]))
    _check_settings(out, settings)
    splits = {SEEN: {"train": settings.train_per_class, "test": settings.test_per_class},
              UNSEEN: {"train": 0, "test": settings.test_per_class}}
    for dom in DOMAINS:
        root = out / "data" / dom
        if not (root / "test").exists():  # the test split is written last: present = complete
            make_demo_dataset(root, dom, splits[dom], seed=settings.seed)
    seconds = {"generate": time.perf_counter() - t0}
    store = out / "features.h5"
    key = _build(store, out, settings, device, progress, log)
    seconds["featcache build"] = time.perf_counter() - t0 - sum(seconds.values())
    with open_store(store) as s:
        dim = int(s.dataset(SEEN).encoder_info(key)["dim"])
    runs = {}
    for method in METHODS:
        t1 = time.perf_counter()
        cfg = TrainConfig(cache=str(store), train=SEEN, method=method, encoder=key, epochs=settings.epochs,
                          image_size=settings.image_size, drop=drop_for(dim), seed=settings.seed, device=device)
        log(f"maskfer train --method {method} on {SEEN}: "
            + ("L-BFGS to convergence" if cfg.method_spec.fit == "lbfgs" else
               f"{cfg.epochs} epochs, {cfg.backbone} at {cfg.image_size} px from scratch"))
        runs[method] = out / "runs" / method
        train(cfg, runs[method], progress=progress, log=log, evaluate_tests=False)
        seconds[f"train {method}"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    tests = [f"{SEEN}:test", f"{UNSEEN}:test"]
    results = []
    for m in METHODS:
        log(f"maskfer eval --run {runs[m]} --test {','.join(tests)}")
        results.append(evaluate_run(runs[m], str(store), tests, device=device, log=log))
    if settings.encoder == TINY_ENCODER:
        for r in results:
            r["label"] += " [tiny random CLIP]"
    seconds["evaluate"] = time.perf_counter() - t1
    seconds["total"] = time.perf_counter() - t0
    return DemoRun(out, store, settings, runs, results, seconds)


# ---------------------------------------------------------------------------- what it shows
def demo_table(run: DemoRun, metric: str = "accuracy") -> str:
    """maskfer eval's table, rows = methods, columns = seen- and unseen-domain test accuracy (%)."""
    header, rows = cross_table(run.results, metric)
    header = ["method"] + [f"{c} ({'seen' if c.startswith(SEEN) else 'unseen'} domain)" for c in header[1:-1]]
    return table_markdown(header, [row[:-1] for row in rows])  # the mean of two domains says nothing here


def write_demo_tables(run: DemoRun) -> dict[str, Path]:
    """<out>/table.md, table_*.csv, table.json: maskfer eval --table's files."""
    return write_tables(run.results, run.out / "table")


def _noise(p: float, n: int) -> float:
    """Two standard errors of an accuracy p on n images (binomial), the smallest gap worth a word."""
    return 2 * math.sqrt(max(p * (1 - p), 1e-12) / max(n, 1))


def demo_reading(run: DemoRun) -> str:
    """One sentence that reads the table, from its numbers: in-domain vs chance, then CAFE against the
    other two on the unseen domain, with gaps smaller than the noise of the test set called level."""
    if run.tiny:
        return ("Reading: the encoder is a tiny RANDOM CLIP, so these numbers only show that build -> train -> "
                "evaluate runs end to end; they say nothing about the methods.")
    acc = {r["method"]: (r["tests"][f"{SEEN}:test"]["accuracy"], r["tests"][f"{UNSEEN}:test"]["accuracy"])
           for r in run.results}
    n = run.results[0]["tests"][f"{UNSEEN}:test"]["n"]
    chance = 1 / len(CLASSES)
    above = [METHOD_NAMES[m] for m in METHODS if acc[m][0] - chance > _noise(chance, n)]
    seen = ("all three methods are clearly above chance on the seen domain" if len(above) == len(METHODS) else
            f"on the seen domain only {', '.join(above) or 'none'} clearly beat chance")
    cafe = acc["cafe"][1]

    def versus(m: str) -> str:
        other = acc[m][1]
        gap = (cafe - other) * 100
        if abs(cafe - other) <= math.hypot(_noise(cafe, n), _noise(other, n)):  # 2 standard errors of the gap
            word = "level with"
        else:
            word = "above" if gap > 0 else "below"
        return f"{word} the {METHOD_NAMES[m]}'s {100 * other:.1f} %"

    return (f"Reading: {seen} (chance {100 * chance:.1f} %); on the unseen rendering of the same expressions CAFE "
            f"scores {100 * cafe:.1f} %, {versus('baseline')} and {versus('linear-probe')} ('level' = a gap within "
            f"two standard errors of {n} test images) - one seed of a generated miniature, an illustration of the "
            f"cross-domain setting, not evidence about real data.")
