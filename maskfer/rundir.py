"""A run directory: resolved config, per-epoch metrics (JSON lines), checkpoints, results.

Every file is written atomically (temp file + fsync + rename), so Ctrl-C or kill -9 at any
moment leaves the previous checkpoint intact. A checkpoint is ONE safetensors file holding
the model weights and the optimizer state, with the epoch and a JSON blob of everything
else in its metadata: there is no moment at which weights and optimizer disagree.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from featcache.errors import FerError
from featcache.encoders import preprocess_mode
from featcache.taxonomy import CLASSES
from maskfer.config import ConfigError, TrainConfig, check_types
from maskfer.errors import TrainError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
LAST = "checkpoint_last.safetensors"
RESULTS = "results.json"


class RunDirError(FerError):
    pass


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C mid-write: the old file stays, the half-written temp file goes
        tmp.unlink(missing_ok=True)
        raise


def share_file(path: Path) -> None:
    """Give a file written private (mkstemp, safetensors' save_file: mode 0600) the mode a new file gets under
    the umask: exported models are files to hand on."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_run_config(run: Path):
    """``(stored, cfg)``: a run directory's config.json, checked field by field, and its TrainConfig.

    A damaged or hand-edited file raises RunDirError naming the file and the field (invalid JSON, a
    value of the wrong type or out of range, an unknown method, a feature dim that is not a positive
    integer or disagrees with the encoder's), instead of a traceback from wherever the value is used.
    """
    path = Path(run) / CONFIG

    def bad(field: str, why: str) -> RunDirError:
        return RunDirError(f"{path}: invalid field {field!r}: {why}")

    try:
        stored = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{Path(run)} is not a maskfer run directory (no {CONFIG})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: cannot read it: {e}") from None
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); the file is "
                          "damaged: restore it or train the run again") from None
    if not isinstance(stored, dict):
        raise RunDirError(f"{path}: expected a JSON object, not {type(stored).__name__}")
    raw = stored.get("config")
    if not isinstance(raw, dict):
        raise bad("config", f"expected an object of training options, not {raw!r}")
    try:
        cfg = TrainConfig.from_record(raw)
        check_types(raw)
        cfg.validate(check_files=False)
    except ConfigError as e:
        raise (bad(f"config.{e.field}", str(e)) if e.field else RunDirError(f"{path}: field 'config': {e}")) from None
    dim = stored.get("feat_dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise bad("feat_dim", f"expected a positive integer (the feature dimension), not {dim!r}")
    enc = stored.get("encoder")
    if not isinstance(enc, dict):
        raise bad("encoder", f"expected an object (key, spec, fingerprint, dim), not {enc!r}")
    for k in ("key", "spec", "fingerprint"):
        if enc.get(k) is not None and not isinstance(enc[k], str):
            raise bad(f"encoder.{k}", f"expected a string, not {enc[k]!r}")
    if not isinstance(enc.get("key"), str):
        raise bad("encoder.key", f"expected the store's encoder key (a string), not {enc.get('key')!r}")
    if enc.get("dim") is not None and enc["dim"] != dim:
        raise bad("feat_dim", f"{dim} disagrees with encoder.dim {enc['dim']!r}")
    size = stored.get("source_image_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise bad("source_image_size", f"expected a positive integer or null, not {size!r}")
    if "classes" in stored and stored["classes"] != list(CLASSES):
        raise bad("classes", f"{stored['classes']!r} is not this tool's class order {list(CLASSES)}")
    return stored, cfg


def update_json(path: Path, fn) -> object:
    """Read-modify-write a JSON file atomically: ``fn(old or None) -> new``; concurrent updaters of the same
    file (two `maskfer eval` of one run) are serialised by an advisory lock on its directory, so neither
    loses the other's change. Returns what was written."""
    path = Path(path)
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): the write is still atomic
        fcntl = None
    fd = os.open(path.parent, os.O_RDONLY) if fcntl else None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        old = read_json(path) if path.exists() else None
        new = fn(old)
        write_json(path, new)
        return new
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating tensor holding NaN/inf, or None."""
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return k
    return None


def _clean(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict -> (named tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for pid, s in sd["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, pid, k = name.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for name, v in meta["scalars"].items():
        pid, k = name.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None, meta: dict) -> None:
    save_state(path, model.state_dict(), opt.state_dict() if opt is not None else None, meta)


def save_state(path: Path, model_sd: dict, opt_sd: dict | None, meta: dict) -> None:
    """One checkpoint file from state dicts (a stacked model's slice for one run of a group, say)."""
    tensors = {f"model.{k}": v for k, v in model_sd.items()}
    opt_meta = None
    if opt_sd is not None:
        ot, opt_meta = flatten_optimizer(opt_sd)
        tensors.update(ot)
    blob = {"meta": meta, "optimizer": opt_meta}
    clean = _clean(tensors)
    bad = _nonfinite(clean)  # once per checkpoint, on the CPU copy: the last guard against saving diverged weights
    if bad:
        raise RunDirError(f"refusing to write checkpoint {path}: {bad} holds NaN/inf values (training diverged); "
                          "the previous checkpoint is kept")
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        save_file(clean, str(tmp), metadata={"maskfer": json.dumps(blob)})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C mid-write: the previous checkpoint stays, the partial temp file goes
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    """Returns (model state dict, optimizer state dict or None, meta)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            blob = json.loads(f.metadata()["maskfer"])
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - any decoding error means the same to the user
        raise RunDirError(f"cannot read checkpoint {path}: {e}") from e
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    opt_sd = unflatten_optimizer(tensors, blob["optimizer"]) if blob["optimizer"] else None
    return model_sd, opt_sd, blob["meta"]


def append_metrics(run: Path, row: dict) -> None:
    """Rewrite metrics.jsonl atomically with rows up to this epoch (drops rows a crash left behind)."""
    rows = [r for r in read_metrics(run) if r.get("epoch", -1) < row["epoch"]] + [row]
    atomic_write_text(run / METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def read_metrics(run: Path) -> list[dict]:
    p = Path(run) / METRICS
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


class RunDir:
    """One run directory as training sees it, the same for a lone run and for each run of a parallel group.

    It owns what makes a run kill-safe and honest: the record in config.json (configuration, its
    identity hash, the encoder and its fingerprint, classes, source image size, the parallel group
    when there is one), the refusal to continue a run of another configuration or of other features,
    the clean-up of temp files a kill -9 left, the checkpoint with the metrics history up to its
    epoch, and metrics.jsonl restored from that history on resume.
    """

    def __init__(self, path: Path, cfg, *, feat_dim: int, encoder: dict, source_image_size: int | None = None,
                 group: dict | None = None, views: dict | None = None, log=print):
        self.path, self.cfg, self.log, self.group = Path(path), cfg, log, group
        self.record = {"config": cfg.to_dict(), "config_hash": cfg.identity_hash(), "feat_dim": int(feat_dim),
                       "encoder": {**{k: encoder.get(k) for k in ("key", "spec", "fingerprint", "dim")},
                                   # featcache build --preprocess: predict must feed the encoder the same way
                                   "preprocess": preprocess_mode(encoder.get("metadata") or {})},
                       "classes": list(CLASSES),
                       # size of the uint8 images the training batches were resized from (predict mirrors it)
                       "source_image_size": source_image_size}
        if group is not None:
            self.record["parallel_group"] = group
        if views is not None:  # --views augmented: which stored views the data stream draws from
            self.record["aug_views"] = views

    @property
    def checkpoint(self) -> Path:
        return self.path / LAST

    def prepare(self) -> int:
        """Write the record, or check it against the one there; returns the last finished epoch (-1: none)."""
        out, cfg = self.path, self.cfg
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("*.tmp-*"):  # a write cut short by kill -9 (Ctrl-C cleans up after itself)
            stale.unlink(missing_ok=True)
        cfg_path = out / CONFIG
        if not (cfg_path.exists() and self.checkpoint.exists()):  # nothing trained: a corrected command may replace it
            write_json(cfg_path, self.record)
            return self.last_epoch()
        old, old_cfg = read_run_config(out)  # a damaged file: an error naming it and the field
        diff = []
        if old.get("config_hash") != self.record["config_hash"]:
            # every identity field of both (the record's fields newer than it hold their legacy values), so a
            # switch TO a legacy value, which identity() leaves out, is seen too
            diff = sorted(k for k in cfg.to_dict() if k not in cfg.NON_IDENTITY and getattr(old_cfg, k) != getattr(cfg, k))
            diff = diff or [f"configuration hash ({old.get('config_hash')} there, {self.record['config_hash']} now)"]
        old_fp, new_fp = (old.get("encoder") or {}).get("fingerprint"), self.record["encoder"]["fingerprint"]
        if old_fp != new_fp:
            diff.append(f"encoder features (fingerprint {old_fp} there, {new_fp} in {cfg.cache})")
        if old.get("aug_views") != self.record.get("aug_views"):  # e.g. views added to the store since
            diff.append(f"augmented views ({old.get('aug_views')} there, {self.record.get('aug_views')} in {cfg.cache})")
        if diff:
            raise TrainError(f"run directory {out} holds a run with another configuration (differs in: "
                             f"{', '.join(diff)}). Use a new --out, or delete that directory to start over.")
        if self.group is not None:
            before = (old.get("parallel_group") or {}).get("data_seed", cfg.seed)
            if before != self.group["data_seed"]:
                self.log(f"note: {out} was trained so far with data seed {before}; it continues with this "
                         f"group's data seed {self.group['data_seed']}")
            old["parallel_group"] = self.group
            write_json(cfg_path, old)
        return self.last_epoch()

    def last_epoch(self) -> int:
        """Epoch of the checkpoint from its metadata alone (-1 when there is none)."""
        if not self.checkpoint.exists():
            return -1
        try:
            with safe_open(str(self.checkpoint), framework="pt") as f:
                return int(json.loads(f.metadata()["maskfer"])["meta"]["epoch"])
        except Exception as e:  # noqa: BLE001 - any decoding error means the same to the user
            raise RunDirError(f"cannot read checkpoint {self.checkpoint}: {e}") from e

    def resume(self) -> tuple[dict, dict | None, dict]:
        """(model state, optimizer state, meta) of the checkpoint; metrics.jsonl becomes the rows of the epochs
        the checkpoint holds, no more and no fewer."""
        model_sd, opt_sd, meta = load_checkpoint(self.checkpoint)
        rows = meta.get("metrics") or [r for r in read_metrics(self.path) if r.get("epoch", -1) <= meta["epoch"]]
        atomic_write_text(self.path / METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        return model_sd, opt_sd, meta

    def save_epoch(self, row: dict, model_sd: dict, opt_sd: dict | None, scheduler: dict) -> None:
        """Checkpoint, then metrics.jsonl, for the epoch ``row["epoch"]``. The checkpoint carries the metrics rows
        up to its epoch: a kill between the two writes would otherwise lose this row for good (the resumed run
        starts after it)."""
        epoch = row["epoch"]
        history = [r for r in read_metrics(self.path) if r.get("epoch", -1) < epoch] + [row]
        meta = {"epoch": epoch, "config_hash": self.record["config_hash"], "scheduler": scheduler,
                "feat_dim": self.record["feat_dim"], "metrics": history}
        if self.group is not None:
            meta["parallel_group"] = self.group
        save_state(self.checkpoint, model_sd, opt_sd, meta)
        append_metrics(self.path, row)
