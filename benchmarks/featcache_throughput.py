"""featcache build throughput: end-to-end build vs encoder-only forward, and peak RSS vs dataset size.

    python benchmarks/featcache_throughput.py [--model SPEC] [--images muxspace|synthetic]
        [--n-ratio 96] [--rounds 3] [--n-small 500] [--n-large 4000] [--rss-model tiny|same|SPEC]
        [--batch-size 32] [--workers N] [--device cpu|cuda|auto] [--precision auto|fp32|fp16|bf16]
        [--image-size S] [--build-py CANDIDATE_build.py] [--skip-ratio] [--skip-rss]

Two measurements, in one run, on the same machine and settings; only ratios are meant to be
compared (there are no absolute-time assertions):

1. **Ratio.** ``featcache.build.build_store`` (progress off) into a fresh temporary store over N
   images, against the encoder alone (``featcache.build.encode_views``: image + horizontal flip,
   exactly as the build calls it) on the same N images already decoded and preprocessed into
   tensors, with the same encoder weights, batch size, device and precision. The two alternate for
   ``--rounds`` rounds so that load from other processes on the machine hits both alike. The build's
   wall time is split into setup (listing + encoder load + journal), pipeline (``_run``: workers ->
   encoder -> journal shards) and commit (``_commit``: HDF5 copy + rename) by wrapping those module
   functions; the ratio is computed on the whole ``build_store`` wall time. Goal: ratio >= 0.9.
   Also printed: the CPU-time ratio (encoder-only CPU seconds / build CPU seconds, reaped DataLoader
   workers included), which moves far less than wall time when other users load the machine.

2. **Peak RSS vs dataset size.** One fresh subprocess per size runs ``build_store`` alone, so the
   sizes cannot contaminate each other. Reported per size: the peak RSS of the build process
   (``VmHWM`` of /proc/self/status; not ``RUSAGE_SELF.ru_maxrss``, which Linux carries across execve
   and so would report this benchmark's own peak), the largest ``ru_maxrss`` among its reaped
   DataLoader workers (RUSAGE_CHILDREN is a max, not a sum), and the peak of the process tree's summed
   PSS sampled from /proc/<pid>/smaps_rollup every 50 ms (PSS splits the pages the forked workers
   share with the parent, so the sum does not count them twice). Goal: flat, i.e. memory independent
   of dataset size. A build of a few hundred images ends before the DataLoader's prefetch queue and
   the heap reach their steady level, so compare sizes of a few thousand (see docs/benchmarks.md).

Encoder. No CLIP weights can be downloaded here, so by default the script builds a RANDOM-INITIALISED
CLIP ViT-B/32 vision tower with projection (transformers ``CLIPVisionConfig`` B/32: hidden 768,
12 layers, 12 heads, MLP 3072, patch 32, image 224, projection_dim 512, quick_gelu), saves it with
``save_pretrained`` next to the real CLIP image processor settings (``CLIPImageProcessorPil``:
shortest_edge 224, bicubic, center crop 224, CLIP mean/std) and loads it through
``create_encoder(path)``, i.e. the same code path and the same compute as
openai/clip-vit-base-patch32. ``--model`` takes any other spec (a real checkpoint directory, a hub
id in the local cache, ``efficientnet-lite0``). The RSS runs use ``--rss-model tiny`` by default: a
2-layer, 64-wide CLIP with the SAME 224 px processor and a 512-d projection, so the pixel tensors,
DataLoader prefetch, journal shards and store rows are the size of B/32's while the forward is cheap
enough to afford thousands of images on a CPU.

Images. ``muxspace`` (default): the real muxspace JPEGs from /work/shared/data/fer (variable sizes up
to 224 px, grey and colour), cycled to reach N, listed through a user-written ``csv`` manifest
(symlinks ``images/img000000.jpg`` -> source, ``labels_<N>.csv``). ``synthetic``: generated 224x224
colour JPEGs (256 distinct files, cycled). ``--image-size S`` also caches S px thumbnails (the build's
``image_size``), which adds the per-image resize and the uint8 image rows to every measurement.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import B32, TINY, loadavg  # noqa: E402 - benchmarks/common.py

DEFAULT_FER = Path(os.environ.get("FER_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared/data/fer")
CLASSES7 = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")


# --------------------------------------------------------------------------- small helpers
def _proc_kb(pid: int, field: str, fname: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{fname}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    """pid and all its descendants, by parent pid from /proc/<p>/stat."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [c for c, p in parent.items() if p in frontier]
        tree += frontier
    return tree


class TreeSampler(threading.Thread):
    """Peak of the summed PSS (and of the summed RSS) of a process tree, sampled every ``period`` s."""

    def __init__(self, pid: int, period: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.peak_pss_kb = self.peak_rss_kb = self.max_procs = 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            tree = _descendants(self.pid)
            pss = sum(_proc_kb(p, "Pss", "smaps_rollup") for p in tree)
            rss = sum(_proc_kb(p, "VmRSS") for p in tree)
            self.peak_pss_kb, self.peak_rss_kb = max(self.peak_pss_kb, pss), max(self.peak_rss_kb, rss)
            self.max_procs = max(self.max_procs, len(tree))
            self._halt.wait(self.period)

    def stop(self):
        self._halt.set()
        self.join()


def mb(kb: float) -> str:
    return f"{kb / 1024:,.0f} MB"


def use_build_py(path: str | None) -> None:
    """Load a candidate copy of featcache/build.py in place of featcache.build (A/B of a proposed fix)."""
    if not path:
        return
    import importlib.util

    import featcache

    spec = importlib.util.spec_from_file_location("featcache.build", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["featcache.build"] = mod
    spec.loader.exec_module(mod)
    featcache.build = mod


# --------------------------------------------------------------------------- encoders
def make_clip(path: Path, arch: dict, seed: int = 0) -> Path:
    """A random-initialised CLIPVisionModelWithProjection + the real CLIP PIL processor at 224 px."""
    from featcache.encoders.random_clip import save_random_clip, save_clip_processor

    save_random_clip(path, seed=seed, **arch)
    save_clip_processor(path, 224)  # the real processor even for the small memory-run tower
    return path


def describe_arch(arch: dict) -> str:
    return (f"hidden {arch['hidden_size']}, {arch['num_hidden_layers']} layers, {arch['num_attention_heads']} heads, "
            f"patch {arch['patch_size']}, image {arch['image_size']}, proj {arch['projection_dim']}")


# --------------------------------------------------------------------------- data
def make_data(root: Path, source: str, fer_root: Path, sizes: list[int]) -> tuple[str, dict[int, Path]]:
    """images/ with max(sizes) files (symlinks or generated), labels_<N>.csv and bench_<N>.toml per size."""
    n_max = max(sizes)
    (root / "images").mkdir(parents=True, exist_ok=True)
    if source == "muxspace":
        src_dir = fer_root / "muxspace" / "images"
        sources = sorted(src_dir.glob("*.jpg"))
        if not sources:
            raise SystemExit(f"no muxspace JPEGs under {src_dir}; pass --fer-root or --images synthetic")
        desc = f"muxspace JPEGs ({len(sources)} distinct files from {src_dir}, cycled)"
    else:
        import numpy as np
        from PIL import Image

        rng = np.random.default_rng(0)
        gen = root / "generated"
        gen.mkdir(exist_ok=True)
        sources = []
        yy, xx = np.mgrid[0:224, 0:224].astype(np.float32) / 223
        for k in range(256):
            a, b, c = rng.uniform(0, 255, 3)
            base = np.stack([a * xx, b * yy, c * (1 - xx * yy)], -1)
            noise = rng.normal(0, 25, (224, 224, 3))
            p = gen / f"gen{k:03d}.jpg"
            Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB").save(p, quality=90)
            sources.append(p)
        desc = "synthetic 224x224 colour JPEGs (256 distinct files, q=90, cycled)"
    names = []
    for k in range(n_max):
        name = f"img{k:06d}.jpg"
        link = root / "images" / name
        if not link.exists():
            link.symlink_to(sources[k % len(sources)].resolve())
        names.append(name)
    manifests = {}
    for n in sorted(set(sizes)):
        with open(root / f"labels_{n}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image", "label"])
            for k in range(n):
                w.writerow([names[k], CLASSES7[k % 7]])
        m = root / f"bench_{n}.toml"
        m.write_text(f'name = "bench-{n}"\nkind = "csv"\ndescription = "featcache throughput benchmark, {n} images"\n\n'
                     f'[params]\nfile = "labels_{n}.csv"\nimage_column = "image"\nlabel_column = "label"\n'
                     f'image_dir = "images"\n')
        manifests[n] = m
    return desc, manifests


# --------------------------------------------------------------------------- measurements
def timed_build(out: Path, manifest: Path, root: Path, model: str, args) -> dict:
    """build_store wall time, split into setup / pipeline (_run) / commit by wrapping module functions."""
    import featcache.build as fb

    phases: dict[str, float] = {}
    orig_run, orig_commit = fb._run, fb._commit

    def timed(fn, phase):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[phase] = time.perf_counter() - t

        return wrapper

    fb._run, fb._commit = timed(orig_run, "pipeline"), timed(orig_commit, "commit")
    try:
        cpu0 = _cpu_seconds()
        t0 = time.perf_counter()
        report = fb.build_store(out, str(manifest), root, model=model, batch_size=args.batch_size, device=args.device,
                                workers=args.workers, image_size=args.image_size or None, precision=args.precision,
                                progress=False, log=lambda *a, **k: None)
        wall = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0  # workers are reaped when the DataLoader shuts down: their CPU is in CHILDREN
    finally:
        fb._run, fb._commit = orig_run, orig_commit
    phases["setup+tail"] = wall - phases.get("pipeline", 0.0) - phases.get("commit", 0.0)
    return {"wall": wall, "cpu": cpu, "rows": report.rows, "phases": phases}


def _cpu_seconds() -> float:
    """user + system CPU seconds of this process and of its reaped children."""
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def encoder_only(enc, batches, dev, precision) -> tuple[float, float]:
    from featcache.build import encode_views

    if dev.type == "cuda":
        import torch
        torch.cuda.synchronize(dev)
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    for x in batches:
        encode_views(enc, x, dev, precision)  # returns numpy: includes the device->host copy, as in the build
    return time.perf_counter() - t0, _cpu_seconds() - cpu0


def ratio_section(args, model: str, model_desc: str, data_desc: str, manifest: Path, root: Path, tmp: Path) -> None:
    import torch

    from featcache.build import _autocast, encode_views, resolve_device
    from featcache.encoders import create_encoder
    from featcache.images import load_image
    from featcache.manifests import list_items, load_manifest

    dev = resolve_device(args.device)
    enc = create_encoder(model, device=str(dev))
    items = list_items(load_manifest(str(manifest)), root).items
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the build's workers (_worker_init): torch-based preprocessing with 2
    try:                      # threads on a busy 2-core machine is ~40x slower per image (OpenMP wake-ups)
        t = time.perf_counter()
        pix = [enc.preprocess(load_image(it.path, it.box)) for it in items]
        prep = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    batches = [torch.stack(pix[i:i + args.batch_size]) for i in range(0, len(pix), args.batch_size)]
    if dev.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    _, used = _autocast(dev, args.precision)
    encode_views(enc, batches[0][: min(4, len(batches[0]))], dev, args.precision)  # warm-up (one-time init)
    n = len(items)
    print(f"\n== 1. end-to-end build vs encoder-only forward: N={n} images, {args.rounds} alternating round(s)")
    print(f"   model={model_desc}  device={dev}  precision={used}  batch={args.batch_size}  "
          f"workers={args.resolved_workers}  views=2 (image + flip)  image_size={args.image_size or 'none'}")
    print(f"   images={data_desc}")
    print(f"   decode+preprocess in one process with 1 torch thread (as a worker does), for reference: "
          f"{prep / n * 1e3:.1f} ms/image ({n / prep:.0f} img/s on 1 core)")
    rows = []
    for r in range(1, args.rounds + 1):
        la0 = loadavg()
        t_enc, c_enc = encoder_only(enc, batches, dev, args.precision)
        b = timed_build(tmp / f"ratio-r{r}.h5", manifest, root, model, args)
        assert b["rows"] == n, b
        e_ips, b_ips = n / t_enc, n / b["wall"]
        p = b["phases"]
        rows.append({"e": e_ips, "b": b_ips, "pipe": n / p["pipeline"], "ratio": b_ips / e_ips,
                     "cpu_ratio": c_enc / b["cpu"]})
        print(f"   round {r}: encoder-only {e_ips:7.2f} img/s ({t_enc:6.1f} s, {c_enc / n * 1e3:6.0f} CPU-ms/img) | "
              f"build {b_ips:7.2f} img/s ({b['wall']:6.1f} s = setup+tail {p['setup+tail']:.1f} + pipeline "
              f"{p['pipeline']:.1f} + commit {p['commit']:.2f}; {b['cpu'] / n * 1e3:6.0f} CPU-ms/img incl. workers) | "
              f"ratio {b_ips / e_ips:.3f} (pipeline phase only {(n / p['pipeline']) / e_ips:.3f}; CPU-time "
              f"{c_enc / b['cpu']:.3f}) | load avg {la0} -> {loadavg()}")
        (tmp / f"ratio-r{r}.h5").unlink(missing_ok=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    per_round = ", ".join(f"{r['ratio']:.3f}" for r in rows)
    print(f"   median over rounds: encoder-only {med['e']:.2f} img/s, build {med['b']:.2f} img/s end-to-end "
          f"({med['pipe']:.2f} img/s in the pipeline phase)")
    print(f"   RATIO build/encoder-only = {med['ratio']:.3f} (median of per-round wall-clock ratios; rounds: "
          f"{per_round})  goal >= 0.9  [device={dev}, workers="
          f"{args.resolved_workers}, batch={args.batch_size}, N={n}, model={Path(model).name}]")
    print(f"   CPU-time ratio (encoder-only CPU s / build CPU s incl. workers; less sensitive to other users' "
          f"load) = {med['cpu_ratio']:.3f}")


def rss_child(args) -> None:
    """Run one build in this fresh process and print its peak memory as JSON (last line of stdout)."""
    import resource

    use_build_py(args.build_py)
    import featcache.build  # noqa: F401  torch + h5py imported, as the build would
    import transformers  # noqa: F401  imported by create_encoder for hf-clip specs

    base_rss = _proc_kb(os.getpid(), "VmRSS")
    t = time.perf_counter()
    b = timed_build(Path(args.rss_child_out), Path(args.rss_child_manifest), Path(args.rss_child_root),
                    args.model, args)
    wall = time.perf_counter() - t
    # VmHWM, not RUSAGE_SELF.ru_maxrss: Linux carries ru_maxrss across execve, so a child started from
    # this benchmark's (large, B/32-holding) parent would report the parent's peak. VmHWM is per address space.
    self_kb = _proc_kb(os.getpid(), "VmHWM")
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # forked workers (no exec): their own peak
    print(json.dumps({"base_rss_kb": base_rss, "self_maxrss_kb": self_kb, "children_maxrss_kb": child_kb,
                      "wall": wall, "rows": b["rows"], "phases": b["phases"]}))


def rss_section(args, rss_model: str, rss_desc: str, data_desc: str, manifests: dict, root: Path, tmp: Path) -> None:
    print(f"\n== 2. peak memory of a build vs dataset size (one fresh subprocess per size)")
    print(f"   model={rss_desc}  device={args.device}  precision={args.precision}  batch={args.batch_size}  "
          f"workers={args.resolved_workers}  image_size={args.image_size or 'none'}  "
          f"FEATCACHE_FLUSH_SECONDS={os.environ.get('FEATCACHE_FLUSH_SECONDS', '10 (default)')}")
    print(f"   images={data_desc}")
    res = {}
    for n in (args.n_small, args.n_large):
        out = tmp / f"rss-{n}.h5"
        cmd = [sys.executable, __file__, "--rss-child", "--model", rss_model, "--batch-size", str(args.batch_size),
               "--device", args.device, "--precision", args.precision, "--image-size", str(args.image_size),
               "--rss-child-out", str(out), "--rss-child-manifest", str(manifests[n]), "--rss-child-root", str(root)]
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        if args.build_py:
            cmd += ["--build-py", args.build_py]
        la0 = loadavg()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        stdout, stderr = proc.communicate()
        sampler.stop()
        if proc.returncode != 0:
            raise SystemExit(f"RSS child for N={n} failed ({proc.returncode}):\n{stderr[-4000:]}")
        r = json.loads(stdout.strip().splitlines()[-1])
        r.update(peak_pss_kb=sampler.peak_pss_kb, peak_rss_sum_kb=sampler.peak_rss_kb, procs=sampler.max_procs)
        res[n] = r
        p = r["phases"]
        print(f"   N={n:>6}: build process peak RSS {mb(r['self_maxrss_kb'])} (after imports {mb(r['base_rss_kb'])}), "
              f"largest worker peak RSS {mb(r['children_maxrss_kb'])}, process-tree peak PSS {mb(r['peak_pss_kb'])} "
              f"(sum of RSS {mb(r['peak_rss_sum_kb'])}, up to {r['procs']} processes) | build {r['wall']:.1f} s = "
              f"{n / r['wall']:.0f} img/s (pipeline {p['pipeline']:.1f} s, commit {p['commit']:.2f} s) "
              f"| load avg {la0} -> {loadavg()}")
        out.unlink(missing_ok=True)
    s, l = res[args.n_small], res[args.n_large]
    for key, what in (("self_maxrss_kb", "build process peak RSS"), ("peak_pss_kb", "process-tree peak PSS")):
        d = l[key] - s[key]
        print(f"   {what}: {mb(s[key])} at N={args.n_small} -> {mb(l[key])} at N={args.n_large}: "
              f"{'+' if d >= 0 else '-'}{mb(abs(d))} ({100 * d / s[key]:+.1f} %) for {args.n_large / args.n_small:.0f}x "
              f"the images")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-b32",
                    help="encoder spec; default 'random-b32' = random-init CLIP ViT-B/32 saved to a temp dir")
    ap.add_argument("--rss-model", default="tiny", help="'tiny' (default), 'same' (= --model) or an encoder spec")
    ap.add_argument("--images", choices=("muxspace", "synthetic"), default="muxspace")
    ap.add_argument("--fer-root", type=Path, default=DEFAULT_FER)
    ap.add_argument("--n-ratio", type=int, default=96, help="images for the build/encoder-only ratio")
    ap.add_argument("--rounds", type=int, default=3, help="alternating encoder-only/build rounds for the ratio")
    ap.add_argument("--n-small", type=int, default=500)
    ap.add_argument("--n-large", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the build's own default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--image-size", type=int, default=0, help="also cache S px thumbnails (0: off, the default)")
    ap.add_argument("--build-py", help="benchmark this copy of featcache/build.py instead (A/B of a fix)")
    ap.add_argument("--skip-ratio", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rss-child-out", help=argparse.SUPPRESS)
    ap.add_argument("--rss-child-manifest", help=argparse.SUPPRESS)
    ap.add_argument("--rss-child-root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args)
        return

    import multiprocessing

    use_build_py(args.build_py)
    import torch
    import transformers

    from featcache.build import _default_workers

    args.resolved_workers = _default_workers() if args.workers is None else args.workers
    t_start = time.perf_counter()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    print("featcache build throughput (benchmarks/featcache_throughput.py)")
    print(f"   command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"   machine: {platform.processor() or platform.machine()}, os.cpu_count()={os.cpu_count()}, "
          f"usable cores={affinity}, cuda={'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}")
    print(f"   python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"   main-process torch threads={torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
          f"DataLoader workers={args.resolved_workers} (1 torch thread each, start method "
          f"{multiprocessing.get_start_method()}), load avg at start {loadavg()} (other users share these cores)")
    if args.build_py:
        print(f"   featcache.build loaded from {args.build_py} (candidate copy, not the repository's)")

    with tempfile.TemporaryDirectory(prefix="featcache-bench-") as td:
        tmp = Path(td)
        sizes = [s for s, on in ((args.n_ratio, not args.skip_ratio), (args.n_small, not args.skip_rss),
                                 (args.n_large, not args.skip_rss)) if on]
        data_desc, manifests = make_data(tmp / "data", args.images, args.fer_root, sizes)

        def resolve(spec: str) -> tuple[str, str]:
            if spec == "random-b32":
                return str(make_clip(tmp / "clip-vit-b32-random", B32)), \
                    f"random-init CLIP ViT-B/32 vision tower + projection ({describe_arch(B32)})"
            if spec == "tiny":
                return str(make_clip(tmp / "clip-tiny-random", TINY)), \
                    f"tiny random CLIP ({describe_arch(TINY)}), same 224 px CLIP processor"
            return spec, spec

        model, model_desc = resolve(args.model)
        if not args.skip_ratio:
            ratio_section(args, model, model_desc, data_desc, manifests[args.n_ratio], tmp / "data", tmp)
        if not args.skip_rss:
            rss_model, rss_desc = (model, model_desc) if args.rss_model == "same" else resolve(args.rss_model)
            rss_section(args, rss_model, rss_desc, data_desc, manifests, tmp / "data", tmp)
    print(f"\n   total benchmark wall time {time.perf_counter() - t_start:.0f} s; load avg at end {loadavg()}")


if __name__ == "__main__":
    main()
