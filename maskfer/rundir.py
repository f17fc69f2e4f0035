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
from safetensors.torch import load_file, save_file
from safetensors import safe_open

CONFIG = "config.json"
METRICS = "metrics.jsonl"
LAST = "checkpoint_last.safetensors"
RESULTS = "results.json"


class RunDirError(Exception):
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


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def _clean(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
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
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_meta = None
    if opt is not None:
        ot, opt_meta = flatten_optimizer(opt)
        tensors.update(ot)
    blob = {"meta": meta, "optimizer": opt_meta}
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        save_file(_clean(tensors), str(tmp), metadata={"maskfer": json.dumps(blob)})
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
