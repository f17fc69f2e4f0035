"""The resumable build: list a dataset, decode in workers, encode once, commit atomically.

Flow: manifest listing -> what the store lacks (dataset rows, this encoder's features,
cached images) -> DataLoader workers decode + preprocess (overlapped with the encoder)
-> encoder forward on the image and its horizontal flip -> journal shards (crash-safe)
-> one commit that writes a new copy of the store and renames it over the old one.

Augmented views (``aug_views=K``, `--aug-views K`) are a second stage with its own journal and commit:
the cached images of the (now published) store -> ``featcache.views.apply_params`` with the rows of
``view_params(ids, views, recipe, seed)`` at the encoder's input size -> ``tensor_preprocess`` -> the
encoder -> journal shards -> a commit that adds views K0..K-1 beside the features.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import featcache
from featcache import store as st
from featcache.devices import DeviceError
from featcache.distributed import Context, detect, session
from featcache.encoders import Encoder, EncoderError, create_encoder, fingerprint, preprocess_mode
from featcache.encoders.batched import input_size, tensor_preprocess
from featcache.errors import FerError
from featcache.images import DEFAULT_MAX_PIXELS, ImageError, load_image, resize_uint8
from featcache.journal import Journal, _fsync_dir, discard, pending_plans, store_lock
from featcache.manifests import Item, list_items, load_manifest, manifest_record
from featcache.progress import progress_bar
from featcache.taxonomy import CLASSES
from featcache.views import OFFICIAL, PARAMS, Recipe, apply_params, image_keys, recipe_text, view_params

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
# A shard is written every flush interval or at this size, whichever comes first: on a fast GPU
# with --image-size 224 ten seconds of results would otherwise be gigabytes held in memory.
SHARD_BYTES = int(os.environ.get("FEATCACHE_SHARD_BYTES", 64 << 20))


class BuildError(FerError):
    """A build that cannot go on; the message names the file or row and what to do."""


@dataclass
class BuildReport:
    store: Path
    dataset: str
    encoder_key: str | None
    image_size: int | None
    rows: int = 0
    encoded_now: int = 0
    resumed_from: int = 0
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    up_to_date: bool = False
    seconds: float = 0.0
    aug_views: int = 0            # augmented views the store holds for (dataset, key) after the build
    aug_added: int = 0            # of which added by this build
    aug_encoded_now: int = 0      # (image, view) pairs encoded by this run
    aug_resumed_from: int = 0     # (image, view) pairs found in the journal of an interrupted run
    aug_note: str = ""            # why no view was added, when asked for
    rank: int = 0                 # under torchrun: this process's rank, and the number of ranks; the counts above
    world: int = 1                # are every rank's together

    @property
    def primary(self) -> bool:
        """The process that reports the build (rank 0; the only one without torchrun)."""
        return self.rank == 0


# --------------------------------------------------------------------------- workers
class _DecodeDataset(Dataset):
    """Decodes one image and prepares what the build needs from it; errors become records."""

    def __init__(self, items: list[Item], work_idx: np.ndarray, preprocess, image_size: int | None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.items, self.work_idx = items, work_idx
        self.preprocess, self.image_size = preprocess, image_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.work_idx)

    def __getitem__(self, k: int):
        w = int(self.work_idx[k])
        item = self.items[w]
        try:
            img = load_image(item.path, item.box, max_pixels=self.max_pixels)
        except ImageError as e:
            return w, None, None, str(e)
        try:
            pix = self.preprocess(img) if self.preprocess is not None else None
            thumb = resize_uint8(img, self.image_size) if self.image_size else None
        except Exception as e:  # a decodable image the preprocessing rejects (e.g. 1x1 px)
            return w, None, None, f"{item.path}: preprocessing failed: {e}"
        return w, pix, thumb, ""


def _collate(batch):
    idx = np.array([b[0] for b in batch], dtype=np.int64)
    ok = np.array([not b[3] for b in batch], dtype=bool)
    reasons = np.array([b[3] for b in batch], dtype=str)
    pix = [b[1] for b in batch if not b[3] and b[1] is not None]
    thumbs = [b[2] for b in batch if not b[3] and b[2] is not None]
    return {
        "idx": idx,
        "ok": ok,
        "reason": reasons,
        "pixels": torch.stack(pix) if pix else None,
        "images": np.stack(thumbs) if thumbs else None,
    }


def _worker_init(_, parent: int | None = None):
    """Decode workers die with the build: a build killed with -9 must not leave a worker running
    (writing into a pipe nobody reads, holding files of the store open) until someone kills it."""
    if parent is not None and sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG: SIGKILL when the parent dies
        except (OSError, AttributeError):
            pass
    if parent is not None and os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    torch.set_num_threads(1)  # decode workers must not fight the encoder for cores


# --------------------------------------------------------------------------- helpers
def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return nullcontext(), "fp32"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype), precision


def encode_views(enc: Encoder, pixels: torch.Tensor, device: torch.device, precision: str = "fp32") -> np.ndarray:
    """Features of each image and of its horizontal flip: ``(B, 2, C)`` float32."""
    ctx, _ = _autocast(device, precision)
    with torch.inference_mode(), ctx:
        x = pixels.to(device, non_blocking=True)
        out = enc.module(torch.cat([x, x.flip(-1)]))
    out = out.float().reshape(2, x.shape[0], -1).transpose(0, 1)
    return out.cpu().numpy()


def _listing_hash(items: list[Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.id}\t{it.label}\t{it.split}\t{it.box}\n".encode())
    return h.hexdigest()[:16]


def _default_workers(ranks_here: int = 1) -> int:
    """Cores - 1, at most 8; under torchrun each of the node's ranks gets its share of the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, min(8, cores // max(1, ranks_here) - 1))


@dataclass
class _AugState:
    """The augmented views stored for one encoder key (attributes of ``encoders/<key>/aug_features``)."""
    views: int
    seed: int
    recipe: dict
    image_size: int
    fp: str


@dataclass
class _Existing:
    dataset_rows: list[str] | None = None  # stored ids, when the dataset is already there
    manifest_sha: str | None = None
    encoder_fp: dict[str, str] = field(default_factory=dict)
    encoder_mode: dict[str, str] = field(default_factory=dict)   # key -> preprocessing mode (clip, official)
    image_sizes: list[int] = field(default_factory=list)
    aug: dict[str, _AugState] = field(default_factory=dict)


def _read_existing(out: Path, ds_name: str) -> _Existing:
    ex = _Existing()
    if not out.exists():
        return ex
    try:
        f = h5py.File(out, "r")
    except OSError as e:
        raise BuildError(f"{out} exists but is not a readable HDF5 file ({e}); choose another --cache") from e
    with f:
        st.check_schema(f, out)
        if ds_name in f["datasets"]:
            g = f["datasets"][ds_name]
            ex.dataset_rows = g["ids"].asstr()[()].tolist()
            ex.manifest_sha = g.attrs.get("manifest_sha256")
            ex.encoder_fp = {k: g["encoders"][k].attrs["fingerprint"] for k in g["encoders"]}
            for k, eg in g["encoders"].items():
                ex.encoder_mode[k] = preprocess_mode(st._attr(eg.attrs.get("metadata", "{}")) or {})
                d = eg.get(st.AUG_FEATURES)
                if isinstance(d, h5py.Dataset):
                    a = {name: st._attr(v) for name, v in d.attrs.items()}
                    ex.aug[k] = _AugState(int(d.shape[1]), int(a.get("seed", 0)), dict(a.get("recipe") or {}),
                                          int(a.get("image_size", 0)), ex.encoder_fp[k])
            ex.image_sizes = [int(k) for k in g["images"]]
    return ex


def _drop_committed_journals(out: Path, ds_name: str, ex: _Existing) -> None:
    """Remove journals whose results the store already holds.

    A build killed after its commit renamed the new store into place, but before it removed its
    journal, leaves one behind; the next build finds the store complete and would otherwise never
    delete it (a journal holds every feature of the dataset)."""
    if ex.dataset_rows is None:
        return
    for plan_dir, plan in pending_plans(out):
        if plan.get("dataset") != ds_name or plan.get("manifest_sha256") != ex.manifest_sha:
            continue
        if plan.get("stage") == AUG_STAGE:
            # An augmented-view journal is dead once the store holds views it cannot extend: its commit went
            # through (the store now has more views than its first one), or views of another seed, recipe,
            # source size or encoder were stored since (this one would be refused).
            a = ex.aug.get(plan.get("key"))
            if a is not None and (a.views != plan.get("first_view") or a.fp != plan.get("encoder")
                                  or a.seed != plan.get("seed") or a.recipe != plan.get("recipe")
                                  or a.image_size != plan.get("image_size")):
                discard(out, plan_dir)
            continue
        if (plan.get("encoder") in (None, *ex.encoder_fp.values())
                and plan.get("image_size") in (None, *ex.image_sizes)):
            discard(out, plan_dir)


def check_name(value: str, what: str, given_by: str) -> str:
    """A dataset name or encoder key becomes one HDF5 group name: one path component, printable,
    not '.' or '..' (``a/b`` would make nested groups that no reader understands)."""
    value = str(value)
    bad = ("is empty" if not value
           else "contains '/'" if "/" in value
           else "is '.' or '..'" if value in (".", "..")
           else "contains a non-printable character" if not value.isprintable()
           else None)
    if bad:
        safe = re.sub(r"[/\\]+|\s+|[^\x20-\x7e]", "-", value).strip(".-") or "mydata"
        raise BuildError(f"invalid {what} {value!r} ({given_by}): it {bad}; it must be one path component of "
                         f"printable characters, without '/', and not '.' or '..' (for example {safe!r})")
    return value


def _h5_errno(e: BaseException) -> int | None:
    """The errno of an OSError, or the one HDF5 puts in its message (h5py raises some I/O failures as
    RuntimeError, or as OSError without errno)."""
    code = getattr(e, "errno", None)
    if code:
        return code
    m = re.search(r"errno = (\d+)", str(e))
    return int(m.group(1)) if m else None


def _store_error_message(e: OSError, out: Path) -> str:
    """One line naming the path and the cause of an OSError on the store, its lock or its journal."""
    code = _h5_errno(e)
    text = str(e)
    m = re.search(r"name = '([^']*)'", text)
    path = str(e.filename) if e.filename else (m.group(1) if m else str(out))
    short = e.strerror if e.strerror and "\n" not in e.strerror and len(e.strerror) < 80 else None
    cause = short or (os.strerror(code) if code else (text.splitlines()[0] if text else type(e).__name__))
    cause += f" [{errno.errorcode[code]}]" if code in errno.errorcode else ""
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = ("the store's folder or file is read-only: make it writable (chmod u+w), "
                  "or write the store elsewhere with --cache")
    elif code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        need = sum(p.stat().st_size for p in [out, *Path(str(out) + ".journal").glob("*/shard-*.npz")]
                   if p.exists())
        size = f", about {need / 2**20:.0f} MiB" if need >= 2**20 else f", about {need / 2**10:.0f} KiB" if need else ""
        advice = ("the disk is full or a file-size limit (ulimit -f) was reached: free space (a commit writes "
                  f"a complete new copy of the store{size}) and run the same command "
                  "again; images encoded so far are kept in the journal")
    else:
        advice = "check the path and run the same command again; finished work is kept in the journal"
    where = f"({cause})" if path == str(out) else f"({path}: {cause})"
    return f"cannot write the feature store {out} {where}; {advice}"


@contextmanager
def _store_errors(out: Path):
    """Any OSError on the store path (folder, lock, journal, commit copy) becomes one BuildError line."""
    try:
        yield
    except OSError as e:
        raise BuildError(_store_error_message(e, out)) from None


def _check_writable(out: Path) -> None:
    """Before encoding anything: a store (or folder) the build cannot replace is refused now, not at the commit."""
    for path, what in ((out, "no write permission on the store file"),
                       (out.parent, "no write permission on the folder")):
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, what, str(path))


@contextmanager
def _open_for_commit(path: Path):
    """``h5py.File(path, "a")`` that is closed safely when a write fails (disk full, EFBIG).

    After a failed write HDF5 cannot close the file (its cache still holds unwritten data), and freeing
    the handle later crashes the interpreter. So on an error the file's descriptor is pointed at
    /dev/null first: the close then "succeeds", and the caller deletes the unfinished copy."""
    f = h5py.File(path, "a")
    try:
        fd = f.id.get_vfd_handle()
    except Exception:  # noqa: BLE001 - a driver without a plain fd
        fd = None
    try:
        yield f
        f.flush()  # all writes happen here, where a failure can still be handled
    except BaseException:
        if isinstance(fd, int) and fd >= 0:
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, fd)
            os.close(null)
        try:
            f.close()
        except Exception:  # noqa: BLE001 - the copy is deleted anyway
            pass
        raise
    f.close()


# --------------------------------------------------------------------------- the build
def build_store(
    out: str | os.PathLike,
    dataset: str,
    root: str | os.PathLike,
    *,
    model: str = DEFAULT_MODEL,
    name: str | None = None,
    encoder_key: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
    workers: int | None = None,
    image_size: int | None = None,
    on_error: str = "fail",
    params: dict[str, str] | None = None,
    precision: str = "auto",
    progress: bool = True,
    flush_seconds: float | None = None,
    log=print,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    preprocess: str = "clip",
    aug_views: int = 0,
    aug_seed: int = 0,
    aug_recipe: Recipe | None = None,
    dist_context: Context | None = None,
) -> BuildReport:
    """Add ``dataset`` (features of ``model``, optionally images) to the store ``out``.

    Adds only what is missing; resumes an interrupted build of the same plan. Images of more than
    ``max_pixels`` pixels (None or 0: no limit) are not decoded: they fail like any broken image.
    ``preprocess``: the encoder's input mode, ``"clip"`` (its own processor) or ``"official"`` (the official
    CAFE input; featcache/encoders/modes.py). ``aug_views=K``: also store K augmented views per image
    (``aug_seed``, ``aug_recipe``, default ``featcache.views.OFFICIAL``), rendered from the cached images
    (``image_size`` or a size the store caches); views already stored are kept, only the missing ones added.

    Under torchrun (``WORLD_SIZE`` > 1 in the environment, or ``dist_context``) every rank calls this with the same
    arguments: each encodes its share on its own device into its own journal part, rank 0 commits the one store
    (docs/sweep.md, "Several GPUs and nodes: torchrun"); every rank returns the report (``report.primary``: rank
    0's).
    """
    t0 = time.perf_counter()
    if on_error not in ("fail", "skip"):
        raise BuildError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    if name is not None:
        check_name(name, "dataset name", "from --name")
    if encoder_key is not None:
        check_name(encoder_key, "encoder key", "from --encoder-key")
    out, root = Path(out), Path(root)
    if int(aug_views) < 0 or int(aug_seed) < 0:
        raise BuildError(f"aug_views and aug_seed must be >= 0 (got {aug_views}, {aug_seed})")
    recipe = aug_recipe or OFFICIAL
    if flush_seconds is None:
        flush_seconds = float(os.environ.get("FEATCACHE_FLUSH_SECONDS", "10"))
    ctx = detect() if dist_context is None else dist_context
    try:
        dev = ctx.device(device)
    except DeviceError as e:
        raise BuildError(str(e)) from None
    log, progress = ctx.prefixed(log), ctx.progress(progress)
    with session(ctx, dev):
        report = _build(out, dataset, root, model, name, encoder_key, batch_size, dev, workers, image_size, on_error,
                        params, precision, progress, flush_seconds, log, max_pixels, preprocess, int(aug_views),
                        int(aug_seed), recipe, ctx)
    report.seconds = time.perf_counter() - t0
    return report


def _build(out, dataset, root, model, name, encoder_key, batch_size, dev, workers, image_size, on_error, params,
           precision, progress, flush_seconds, log, max_pixels, preprocess, aug_views, aug_seed, recipe,
           ctx: Context) -> BuildReport:
    """build_store after its argument checks. Under torchrun every rank runs this; the ranks meet at each
    ``ctx.step`` (featcache.distributed), rank 0 holds the store lock and commits, and each rank encodes its
    ``ctx.shard`` of what is left into its own journal part."""
    with ctx.step("listing the dataset and loading the encoder", log) as met:
        manifest = load_manifest(dataset, params)
        ds_name = name or manifest.name
        check_name(ds_name, "dataset name", f"the name of manifest {manifest.path}; store it under another one with --name")
        listing = list_items(manifest, root, on_error=on_error)
        if not listing.items:
            raise BuildError(f"dataset {manifest.name!r} under {root} has no labelled images to encode")
        problems = [(p.item_id or "", p.where, p.reason) for p in listing.problems]
        enc = create_encoder(model, device=str(dev), preprocess=preprocess)  # EncoderError where the mode cannot apply
        key = encoder_key or enc.name
        check_name(key, "encoder key", f"the name of encoder {model!r}; store it under another one with --encoder-key")
        fp = fingerprint(enc.metadata)
        met.value = (manifest.sha256, _listing_hash(listing.items), fp)
    ctx.agree("the dataset listing or the encoder", met.values,
              "every node must see the same --root (a shared file system) and load the same --model")

    with _store_errors(out), ExitStack() as held:
        with ctx.step("taking the store lock", log):
            if ctx.primary:  # one writer per store: rank 0 holds the lock for every rank
                out.parent.mkdir(parents=True, exist_ok=True)
                held.enter_context(store_lock(out))
                for stale in out.parent.glob(out.name + ".tmp-*"):  # a commit cut short by a kill
                    stale.unlink()
        with ctx.step("reading the store", log) as met:
            ex = _read_existing(out, ds_name)
            if ctx.primary:
                _drop_committed_journals(out, ds_name, ex)
            report = BuildReport(out, ds_name, key, image_size, dropped=dict(listing.dropped), rank=ctx.rank,
                                 world=ctx.world)
            new_dataset = ex.dataset_rows is None
            if new_dataset:
                work_items = listing.items
            else:
                if ex.manifest_sha != manifest.sha256:
                    raise BuildError(
                        f"dataset {ds_name!r} in {out} was built from a different manifest "
                        f"(sha256 {ex.manifest_sha} vs {manifest.sha256}: its params or labels differ). "
                        f"Store this one side by side with --name {ds_name}-2, or use another --cache."
                    )
                by_id = {it.id: it for it in listing.items}
                missing = [i for i in ex.dataset_rows if i not in by_id]
                if missing:
                    raise BuildError(
                        f"{len(missing)} image(s) stored for {ds_name!r} in {out} are no longer listed under {root} "
                        f"(first: {missing[0]}); the dataset changed on disk. Build it under another --name."
                    )
                work_items = [by_id[i] for i in ex.dataset_rows]
            if key in ex.encoder_fp and ex.encoder_fp[key] != fp:
                modes = (ex.encoder_mode.get(key, "clip"), preprocess_mode(enc.metadata))
                why = (f": they were made with --preprocess {modes[0]}, this build asks for --preprocess {modes[1]}"
                       if modes[0] != modes[1] else "")
                raise BuildError(
                    f"{out} already holds features for {ds_name!r} under encoder key {key!r} made by another "
                    f"encoder or processor (fingerprint {ex.encoder_fp[key]}, --model {model!r} gives {fp}){why}. "
                    f"Pass --encoder-key NEW_KEY to store these features side by side."
                )
            need_feats = key not in ex.encoder_fp
            need_images = bool(image_size) and image_size not in ex.image_sizes
            aug_size = _check_aug(out, ds_name, key, enc, ex, aug_views, aug_seed, recipe, image_size,
                                  report) if aug_views else None
            up_to_date = not (new_dataset or need_feats or need_images or aug_size)
            if not up_to_date:
                _check_writable(out)
            plan = {
                "dataset": ds_name,
                "manifest_sha256": manifest.sha256,
                "listing": _listing_hash(work_items),
                "new_dataset": new_dataset,
                "encoder": fp if need_feats else None,
                "image_size": image_size if need_images else None,
                "tool_version": featcache.__version__,
            }
            met.value = (plan, aug_size, up_to_date)
        ctx.agree("the store", met.values, f"every node must see the same {out} (a shared file system)")
        if up_to_date:
            report.up_to_date, report.rows = True, len(work_items)
            return report
        if not (new_dataset or need_feats or need_images):  # only views to add
            report.rows = len(work_items)
            _build_aug(out, ds_name, key, enc, fp, dev, precision, aug_views, aug_seed, recipe, aug_size,
                       batch_size, flush_seconds, progress, log, report, ctx)
            return report

        n = len(work_items)
        journal = Journal(out, plan, part=ctx.journal_part)
        with ctx.step("opening the journal", log):
            journal.open(primary=ctx.primary)
        with ctx.step("reading the journal", log) as met:
            done = journal.done_mask(n)
            met.value = hashlib.sha256(np.packbits(done).tobytes()).hexdigest()
        ctx.agree("the journal", met.values, f"every node must see the same {journal.dir} (a shared file system)")
        report.resumed_from = int(done.sum())
        if report.resumed_from and ctx.primary:
            log(f"resuming: {report.resumed_from}/{n} images already encoded in {journal.dir}")
        todo = np.flatnonzero(~done)
        mine = ctx.shard(todo)  # the work left, split afresh: a rerun after a kill spreads it over every rank
        if ctx.active:
            log(f"encoding {len(mine)} of the {len(todo)} images left on {dev}")
        with ctx.step("encoding", log) as met:
            encoded = 0
            if len(mine):
                encoded = _run(
                    enc, dev, precision, work_items, mine, journal, need_feats, image_size if need_images else None,
                    batch_size, _default_workers(ctx.local_world) if workers is None else workers, on_error,
                    flush_seconds, progress, ds_name, allow_skip=new_dataset, max_pixels=max_pixels,
                )
            met.value = (encoded, [str(p) for p in journal.written])
        report.encoded_now = sum(v[0] for v in met.values)
        journal.reported = {Path(p) for v in met.values for p in v[1]}
        with ctx.step("committing the store", log) as met:
            if ctx.primary:
                _commit(out, journal, manifest, root, ds_name, work_items, new_dataset, listing.dropped, problems,
                        key if need_feats else None, enc, fp, precision, dev, image_size if need_images else None,
                        report)
                journal.remove()
                met.value = (report.rows, report.skipped)
        report.rows, report.skipped = met.values[0]
        if aug_size:  # the views are rendered from the cached images that the commit above just published
            _build_aug(out, ds_name, key, enc, fp, dev, precision, aug_views, aug_seed, recipe, aug_size,
                       batch_size, flush_seconds, progress, log, report, ctx)
    return report


class _ShardWriter:
    """Batches of encoded records gathered into journal shards: one is written every ``flush_seconds`` or at
    SHARD_BYTES, whichever comes first, and on any exit of the block, so a finished batch is never lost."""

    def __init__(self, journal: Journal, flush_seconds: float):
        self.journal, self.flush_seconds = journal, flush_seconds
        self.seq, self.pending, self.bytes, self.last = journal.next_seq(), [], 0, time.monotonic()

    def add(self, rec: dict[str, np.ndarray]) -> None:
        self.pending.append(rec)
        self.bytes += sum(a.nbytes for a in rec.values())
        if time.monotonic() - self.last >= self.flush_seconds or self.bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.journal.write_shard(self.seq, **{k: np.concatenate([p[k] for p in self.pending])
                                                  for k in self.pending[0]})
            self.seq, self.pending, self.bytes = self.seq + 1, [], 0
        self.last = time.monotonic()

    def __enter__(self) -> "_ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.flush()


def _run(enc, dev, precision, items, todo, journal, need_feats, image_size, batch_size, workers, on_error,
         flush_seconds, progress, ds_name, allow_skip, max_pixels=DEFAULT_MAX_PIXELS) -> int:
    dataset = _DecodeDataset(items, todo, enc.preprocess if need_feats else None, image_size, max_pixels)
    import multiprocessing

    # fork and spawn workers are children of this process; a forkserver's are not (no parent check then)
    parent = os.getpid() if multiprocessing.get_start_method() in ("fork", "spawn") else None
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
        worker_init_fn=functools.partial(_worker_init, parent=parent) if workers else None,
        pin_memory=dev.type == "cuda",
        prefetch_factor=4 if workers else None, persistent_workers=False,
    )
    encoded = 0
    with progress_bar(f"encoding {ds_name}", total=len(todo), enabled=progress) as advance, \
            _ShardWriter(journal, flush_seconds) as shards:
        for batch in loader:
            ok = batch["ok"]
            if not ok.all():
                bad = int(np.flatnonzero(~ok)[0])
                reason = str(batch["reason"][bad])
                if on_error == "fail" or not allow_skip:
                    hint = (
                        "rerun with --on-error skip to record and skip it"
                        if allow_skip
                        else "this image is already a row of the stored dataset, so it cannot be skipped now: "
                        "fix or restore the file"
                    )
                    raise BuildError(f"cannot encode {reason}; {hint}. Images encoded so far are kept.")
            rec = {"idx": batch["idx"], "ok": ok, "reason": batch["reason"]}
            if need_feats:
                feats = np.zeros((len(ok), 2, enc.dim), dtype=np.float32)
                if batch["pixels"] is not None:
                    feats[ok] = encode_views(enc, batch["pixels"], dev, precision)
                rec["feats"] = feats
            if image_size:
                imgs = np.zeros((len(ok), image_size, image_size, 3), dtype=np.uint8)
                if batch["images"] is not None:
                    imgs[ok] = batch["images"]
                rec["images"] = imgs
            shards.add(rec)
            encoded += int(ok.sum())
            advance(len(ok))
    return encoded


@contextmanager
def _new_copy(out: Path):
    """Yield a temp path beside ``out`` to write a new copy of the store into; when the block ends, publish it
    (fsync, atomic rename over ``out``, the rename on disk before the caller deletes its journal). On any
    failure the temp copy goes, and a write error that HDF5 reports as RuntimeError becomes its OSError."""
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        code = _h5_errno(e) if isinstance(e, (OSError, RuntimeError)) else None
        if code and not isinstance(e, OSError):  # h5py reports some write failures as RuntimeError
            raise OSError(code, os.strerror(code), str(tmp)) from None
        raise


def _commit(out, journal, manifest, root, ds_name, items, new_dataset, dropped, problems, feat_key, enc, fp,
            precision, dev, image_size, report) -> None:
    """Write a new copy of the store with the journal's results and rename it over the old one."""
    n = len(items)
    ok = np.zeros(n, dtype=bool)
    covered = np.zeros(n, dtype=bool)
    reasons = np.full(n, "", dtype=object)
    for path in journal.shard_paths():  # only the small columns: features and images are read once, below
        with np.load(path, allow_pickle=False) as z:
            idx = z["idx"]
            ok[idx] = z["ok"]
            covered[idx] = True
            reasons[idx] = z["reason"]
    if not covered.all():  # an item missing from the journal would silently lose its row: a bug, never input
        raise BuildError(f"internal error: {int((~covered).sum())} images of {ds_name!r} are missing from the journal "
                         f"{journal.dir}; run the same command again")
    failed = [(items[i].id, str(items[i].path), str(reasons[i])) for i in np.flatnonzero(~ok)]
    if not ok.any():
        raise BuildError(f"no image of {ds_name!r} could be encoded ({len(failed)} failed; first: {failed[0][2]}); "
                         "nothing was added to the store")
    row_of = np.cumsum(ok) - 1  # work index -> store row (failed items get no row)
    with _new_copy(out) as tmp:
        if out.exists():
            shutil.copyfile(out, tmp)  # inside the block: a copy cut short by a full disk is deleted too
        with _open_for_commit(tmp) as f:
            st.init_file(f, featcache.__version__)
            if new_dataset:
                kept = [items[i] for i in np.flatnonzero(ok)]
                g = st.write_dataset(
                    f, ds_name,
                    ids=[it.id for it in kept],
                    labels=np.array([it.label for it in kept], dtype=np.int8),
                    splits=[it.split for it in kept],
                    skipped=list(problems) + failed,
                    attrs={
                        "manifest_name": manifest.name,
                        "manifest_sha256": manifest.sha256,
                        "manifest": manifest_record(manifest),
                        "root": str(root.resolve()),
                        "class_names": list(CLASSES),
                        "dropped": dropped,
                        "tool_version": featcache.__version__,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    },
                )
            else:
                g = f["datasets"][ds_name]
            rows = int(ok.sum())
            fdset = idset = None
            if feat_key:
                _, used = _autocast(dev, precision)
                fdset = st.create_features(g, feat_key, rows, enc.dim, {
                    "metadata": enc.metadata, "fingerprint": fp, "dim": enc.dim, "dtype": "float32",
                    "views": list(st.VIEWS), "compute_precision": used, "device": dev.type,
                    "spec": enc.metadata.get("model", ""), "tool_version": featcache.__version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                })
            if image_size:
                idset = st.create_images(g, image_size, rows)
            crcs = {k: st.checksums_of(d) for k, d in (("feats", fdset), ("images", idset)) if d is not None}
            for path in journal.shard_paths():  # one array of one shard in memory at a time
                with np.load(path, allow_pickle=False) as z:
                    good = z["ok"]
                    r = row_of[z["idx"][good]]
                    if not len(r):
                        continue
                    order = np.argsort(r, kind="stable")
                    r = r[order]
                    sel = slice(int(r[0]), int(r[-1]) + 1) if r[-1] - r[0] + 1 == len(r) else r
                    in_place = bool(good.all()) and bool((order == np.arange(len(order))).all())
                    for dset, key in ((fdset, "feats"), (idset, "images")):
                        if dset is not None:
                            a = z[key]
                            a = a if in_place else a[good][order]
                            dset[sel] = a
                            crcs[key][sel] = st.row_crc32(a)  # CRC-32 of every row, checked by verify
    report.rows = int(ok.sum())
    report.skipped = list(problems) + failed


# --------------------------------------------------------------------------- augmented views
AUG_STAGE = "aug-views"  # the "stage" of an augmented-view journal's plan (the feature build's plans have none)


def _check_aug(out: Path, ds_name: str, key: str, enc: Encoder, ex: _Existing, views: int, seed: int,
               recipe: Recipe, image_size: int | None, report: BuildReport) -> int | None:
    """Before anything is encoded: the cached image size the views are rendered from, or None when the store
    already holds ``views`` of them (noted in the report). Refuses what cannot be built or would not fit."""
    stored = ex.aug.get(key)
    if stored is not None:
        report.aug_views = stored.views
        want = {"seed": seed, "recipe": recipe.to_dict()}
        have = {"seed": stored.seed, "recipe": stored.recipe}
        if want != have:
            what = "--aug-seed" if stored.recipe == want["recipe"] else "recipe"
            fix = (f"pass --aug-seed {stored.seed} to add views to the stored ones, or "
                   if what == "--aug-seed" else "")
            raise BuildError(
                f"{out} already holds {stored.views} augmented views of {ds_name!r} (encoder {key!r}) drawn with "
                f"{recipe_text(stored.recipe, stored.seed)}; this build asks for {recipe_text(want['recipe'], seed)}. "
                f"Views of another {what} cannot join them: {fix}build these views into a new --cache.")
        if views <= stored.views:
            report.aug_note = (f"the store already holds {stored.views} augmented views (>= --aug-views {views}); "
                               "none added")
            return None
        return stored.image_size
    if image_size:
        size = int(image_size)
    elif len(ex.image_sizes) == 1:
        size = ex.image_sizes[0]
    elif ex.image_sizes:
        sizes = ", ".join(map(str, sorted(ex.image_sizes)))
        raise BuildError(
            f"--aug-views: dataset {ds_name!r} in {out} caches images of sizes {sizes}; "
            "pass --image-size S to choose the size the augmented views are rendered from (train maskfer with "
            "that size's cached images, so its CNN sees the same augmentation)")
    else:
        where = f"dataset {ds_name!r} in {out} has none" if ex.dataset_rows is not None else "none are being cached"
        raise BuildError(
            f"--aug-views needs cached images (the views are rendered from them, and maskfer re-applies each view to "
            f"the same cached image), but {where}: add --image-size S to this command, e.g. --image-size 112")
    try:
        tensor_preprocess(enc)
        input_size(enc)
    except EncoderError as e:
        raise BuildError(f"--aug-views: {e}") from None
    return size


def _ids_hash(ids) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(str(i).encode() + b"\n")
    return h.hexdigest()[:16]


def _build_aug(out: Path, ds_name: str, key: str, enc: Encoder, fp: str, dev: torch.device, precision: str,
               views: int, seed: int, recipe: Recipe, size: int, batch_size: int, flush_seconds: float,
               progress: bool, log, report: BuildReport, ctx: Context) -> None:
    """Encode views K0..views-1 of every row from the store's cached ``size`` px images, journal them and
    commit. Work item ``t`` of the journal is (view K0 + t // n, row t % n), so a rerun with a larger K resumes
    the same journal and only adds the items it lacks."""
    with ctx.step("reading the store's images for the augmented views", log) as met:
        with h5py.File(out, "r") as f:
            g = f["datasets"][ds_name]
            ids = g["ids"].asstr()[()]
            manifest_sha = g.attrs.get("manifest_sha256")
            d = g["encoders"][key].get(st.AUG_FEATURES)
            k0 = int(d.shape[1]) if isinstance(d, h5py.Dataset) else 0
        n, insize = len(ids), input_size(enc)
        plan = {"stage": AUG_STAGE, "dataset": ds_name, "manifest_sha256": manifest_sha, "ids": _ids_hash(ids),
                "encoder": fp, "key": key, "first_view": k0, "seed": seed, "recipe": recipe.to_dict(),
                "image_size": size, "input_size": insize, "tool_version": featcache.__version__}
        journal = Journal(out, plan, part=ctx.journal_part)
        journal.open(primary=ctx.primary)
        met.value = plan
    ctx.agree("the store", met.values, f"every node must see the same {out} (a shared file system)")
    m = (views - k0) * n
    with ctx.step("reading the journal of the augmented views", log) as met:
        done = journal.done_mask(m)
        met.value = hashlib.sha256(np.packbits(done).tobytes()).hexdigest()
    ctx.agree("the journal", met.values, f"every node must see the same {journal.dir} (a shared file system)")
    report.aug_resumed_from = int(done.sum())
    if report.aug_resumed_from and ctx.primary:
        log(f"resuming: {report.aug_resumed_from}/{m} augmented views already encoded in {journal.dir}")
    todo = np.flatnonzero(~done)
    v_rel, rows = np.divmod(todo, n)
    todo = todo[np.lexsort((v_rel, rows))]  # row by row, every view of a row together: each image is read once
    mine = ctx.shard(todo)
    if ctx.active:
        log(f"encoding {len(mine)} of the {len(todo)} augmented views left on {dev}")
    with ctx.step("encoding augmented views", log) as met:
        encoded = 0
        if len(mine):
            encoded = _run_aug(out, ds_name, enc, dev, precision, ids, k0, views, seed, recipe, size, insize, mine,
                               journal, batch_size, flush_seconds, progress)
        met.value = (encoded, [str(p) for p in journal.written])
    report.aug_encoded_now = sum(v[0] for v in met.values)
    journal.reported = {Path(p) for v in met.values for p in v[1]}
    with ctx.step("committing the augmented views", log):
        if ctx.primary:
            _commit_aug(out, journal, ds_name, key, n, k0, views, seed, recipe, size, insize, enc, dev, precision)
            journal.remove()
    report.aug_views, report.aug_added = views, views - k0


def _run_aug(out, ds_name, enc, dev, precision, ids, k0, views, seed, recipe, size, insize, todo, journal,
             batch_size, flush_seconds, progress) -> int:
    n = len(ids)
    keys = image_keys(ids)
    params = view_params(keys, range(k0, views), recipe, seed)  # (n, views - k0, len(PARAMS))
    prep = tensor_preprocess(enc)
    ctx, _ = _autocast(dev, precision)
    encoded = 0
    with h5py.File(out, "r") as f, progress_bar(f"augmented views {ds_name}", total=len(todo),
                                                  enabled=progress) as advance, \
            _ShardWriter(journal, flush_seconds) as shards:
        images = f["datasets"][ds_name]["images"][str(size)]
        for start in range(0, len(todo), batch_size):
            t = todo[start:start + batch_size]
            v_rel, rows = np.divmod(t, n)
            p = params[torch.from_numpy(rows), torch.from_numpy(v_rel)]
            x = torch.from_numpy(st._take(images, rows)).to(dev, non_blocking=True)
            with torch.inference_mode():
                pix = prep(apply_params(x, p, insize, recipe.noise_std))
                with ctx:
                    feats = enc.module(pix)
            shards.add({"idx": t, "feats": feats.float().cpu().numpy(), "params": p.numpy()})
            encoded += len(t)
            advance(len(t))
    return encoded


def _commit_aug(out, journal, ds_name, key, n, k0, views, seed, recipe, size, insize, enc, dev, precision) -> None:
    """A new copy of the store with views k0..views-1 added (earlier views untouched), renamed over the old one."""
    m = (views - k0) * n
    covered = np.zeros(m, dtype=bool)
    for path in journal.shard_paths():
        with np.load(path, allow_pickle=False) as z:
            idx = z["idx"]
            covered[idx[idx < m]] = True
    if not covered.all():  # every item is encoded before the commit: this is a bug, never a user error
        raise BuildError(f"internal error: {int((~covered).sum())} augmented views of {ds_name!r} are missing from "
                         f"the journal {journal.dir}; run the same command again")
    with _new_copy(out) as tmp:
        shutil.copyfile(out, tmp)
        with _open_for_commit(tmp) as f:
            st.init_file(f, featcache.__version__)
            eg = f["datasets"][ds_name]["encoders"][key]
            if st.AUG_FEATURES not in eg:
                st.create_aug(eg, n, enc.dim, len(PARAMS), dtype=eg["features"].dtype)
            st.grow_aug(eg, views)
            arrays = {"feats": (eg[st.AUG_FEATURES], eg[st.AUG_CRC[st.AUG_FEATURES]]),
                      "params": (eg[st.AUG_PARAMS], eg[st.AUG_CRC[st.AUG_PARAMS]])}
            for path in journal.shard_paths():  # one shard in memory at a time
                with np.load(path, allow_pickle=False) as z:
                    idx = z["idx"]
                    keep = idx < m  # a journal resumed with a smaller K holds views beyond it
                    v_rel, rows = np.divmod(idx[keep], n)
                    data = {k: z[k][keep] for k in arrays}
                for v in np.unique(v_rel):
                    sel = np.flatnonzero(v_rel == v)
                    sel = sel[np.argsort(rows[sel], kind="stable")]
                    r = rows[sel]
                    where = slice(int(r[0]), int(r[-1]) + 1) if r[-1] - r[0] + 1 == len(r) else r
                    for k, (dset, crc) in arrays.items():
                        a = data[k][sel].astype(dset.dtype, copy=False)
                        dset[where, k0 + int(v)] = a
                        crc[where, k0 + int(v)] = st.row_crc32(a)
            fd = eg[st.AUG_FEATURES]
            for k, v in {"recipe": json.dumps(recipe.to_dict(), sort_keys=True), "seed": int(seed),
                         "views": int(views), "image_size": int(size), "input_size": int(insize),
                         "params": json.dumps(list(PARAMS)), "compute_precision": _autocast(dev, precision)[1],
                         "device": dev.type, "tool_version": featcache.__version__,
                         "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}.items():
                fd.attrs[k] = v
