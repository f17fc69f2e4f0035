"""Cross-dataset evaluation: metrics per test set and the table (rows = runs, columns = test sets).

Classes missing from a test set (CK+ has no neutral) get no per-class accuracy; mean class
accuracy averages over the classes present, and the result says which were absent.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch

from featcache.devices import resolve_device
from featcache.errors import FerError
from featcache.taxonomy import CLASSES
from maskfer import rundir
from maskfer.augment import prepare_images
from maskfer.config import TrainConfig
from maskfer.data import DataError, SplitData, check_test_sets, load_split
from maskfer.model import create_model
from maskfer.online import OnlineEncoder


class EvalError(FerError):
    pass


def eval_inputs(data: SplitData, pos: torch.Tensor, image_size: int, device: torch.device, encoder=None
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The model inputs of rows ``pos`` at evaluation: the plain image (when the split has images) and the
    original, unflipped view's features, or with ``encoder`` the image's encoding."""
    imgs = data.bank.get(data.rows[pos.numpy()]).to(device) if data.bank is not None else None
    x = prepare_images(imgs, image_size) if imgs is not None else None
    feats = encoder.encode(imgs) if encoder is not None else data.feats[pos, 0].to(device)
    return x, feats


@torch.no_grad()
def predict_logits(model, data: SplitData, image_size: int, device: torch.device, batch_size: int = 128,
                   output: str = "logits", encoder=None) -> torch.Tensor:
    """Logits of every row, batched: (N, L), or (N, K, L) for maskfer.parallel's stacked model. ``output``
    names another entry of the model's output dict to collect instead (MaskModel's "masked": (N, C)).
    ``encoder`` (a maskfer.online.OnlineEncoder; --online-encoder runs): features computed from the images
    instead of read from the store."""
    model.eval()
    out = []
    for s in range(0, len(data), batch_size):
        x, feats = eval_inputs(data, torch.arange(s, min(s + batch_size, len(data))), image_size, device, encoder)
        out.append(model(x, feats)[output].float().cpu())
    return torch.cat(out) if out else torch.empty(0, len(CLASSES) if output == "logits" else 0)


def metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = len(CLASSES)) -> dict:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    support = cm.sum(1)
    present = support > 0
    per_class = {c: (float(cm[i, i] / support[i]) if present[i] else None) for i, c in enumerate(CLASSES)}
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else float("nan"),
        "mean_class_accuracy": float(np.mean([cm[i, i] / support[i] for i in np.flatnonzero(present)])),
        "per_class_accuracy": per_class,
        "support": {c: int(s) for c, s in zip(CLASSES, support)},
        "absent_classes": [c for c, p in zip(CLASSES, present) if not p],
        "confusion": cm.tolist(),  # rows = true class, columns = predicted, in CLASSES order
    }


def evaluate_split(model, data: SplitData, image_size: int, device: torch.device, encoder=None) -> dict:
    logits = predict_logits(model, data, image_size, device, encoder=encoder)
    return metrics(data.labels.numpy(), logits.argmax(1).numpy())


def load_run(run: Path, device: torch.device):
    """(model, config, stored config json) of a run directory's last checkpoint."""
    run = Path(run)
    if not (run / rundir.CONFIG).exists():
        raise EvalError(f"{run} is not a maskfer run directory (no {rundir.CONFIG}); train one with `maskfer train`")
    if not (run / rundir.LAST).exists():
        raise EvalError(f"run {run} has no checkpoint yet (training has not finished an epoch)")
    stored, cfg = rundir.read_run_config(run)
    model = create_model(cfg, int(stored["feat_dim"]))
    sd, _, meta = rundir.load_checkpoint(run / rundir.LAST)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:  # config.json edited, or a checkpoint from another run
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise EvalError(f"checkpoint {run / rundir.LAST} does not fit the model {run / rundir.CONFIG} describes "
                        f"(method {cfg.method}, backbone {cfg.backbone}, feat_dim {stored['feat_dim']}): "
                        f"{first[0].strip()}") from None
    stored["checkpoint_epoch"] = int(meta["epoch"])
    return model.to(device).eval(), cfg, stored


def evaluate_run(run: Path, cache: str | None, tests: list[str], device: str | torch.device = "auto", log=print,
                 merge: bool = True, trust_plugins: bool = False) -> dict:
    """Evaluate a run on test sets of a store; returns the results and merges them into results.json
    (see :func:`_merge_results`; ``merge=False`` replaces the file). A run trained with --online-encoder is
    evaluated online too: the encoder computes the features from the images (``trust_plugins``: its spec
    may name a plug-in)."""
    run = Path(run)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    model, cfg, stored = load_run(run, dev)
    cache = cache or cfg.cache
    need_images = cfg.reads_images
    res = {"run": str(run), "train": cfg.train, "method": cfg.method, "label": run_label(cfg),
           "epochs_trained": stored["checkpoint_epoch"] + 1, "config_hash": stored.get("config_hash"),
           "encoder": stored["encoder"], "tests": {}}
    try:  # every test set must exist before the first is evaluated
        check_test_sets(cache, tests, stored["encoder"]["key"], stored["encoder"].get("fingerprint"),
                        int(stored["feat_dim"]), need_images, cfg.root, trained=f"run {run}")
    except DataError as e:
        raise EvalError(str(e)) from None
    encoder = None
    for spec in tests:
        try:
            data, info = load_split(cache, spec, "test", stored["encoder"]["key"], need_images, cfg.image_size,
                                    cfg.root, cfg.workers)
        except DataError as e:
            raise EvalError(str(e)) from None
        if cfg.online_encoder and encoder is None:
            encoder = OnlineEncoder(info, dev, trust_plugins=trust_plugins,
                                    source=f"{cache} (attribute 'spec' of encoder {info['key']!r} of {data.dataset})")
        m = evaluate_split(model, data, cfg.image_size, dev, encoder=encoder)
        res["tests"][data.name] = m
        note = f" (absent classes: {', '.join(m['absent_classes'])})" if m["absent_classes"] else ""
        log(f"{data.name}: accuracy {m['accuracy']:.4f}, mean class accuracy {m['mean_class_accuracy']:.4f}"
            f" on {m['n']} images{note}")
    _merge_results(run, res, merge, log)
    return res


def _merge_results(run: Path, res: dict, merge: bool, log) -> dict:
    """Write results.json: the test sets just evaluated replace their own entries; entries of other test
    sets stay when they were evaluated on the same checkpoint of the same configuration (else they are
    stale and dropped, with a note). ``merge=False`` keeps only this evaluation's test sets. The
    read-merge-write holds a lock, so two evaluations of one run at once both land."""
    def update(old):
        if not merge or not isinstance(old, dict) or not isinstance(old.get("tests"), dict):
            return res
        # results.json files older than config_hash in it: the epoch, training set and method must agree
        keys = ("epochs_trained", "train", "method") + (("config_hash",) if "config_hash" in old else ())
        same = all(old.get(k) == res[k] for k in keys)
        kept = {t: m for t, m in old["tests"].items() if t not in res["tests"]}
        if kept and not same:
            log(f"note: dropping results for {', '.join(kept)} from {run / rundir.RESULTS}: they were evaluated on "
                f"another checkpoint (after epoch {old.get('epochs_trained')}; now epoch {res['epochs_trained']}, "
                f"config hash {res['config_hash']})")
            kept = {}
        return {**res, "tests": {**kept, **res["tests"]}}

    try:
        return rundir.update_json(run / rundir.RESULTS, update)
    except ValueError as e:  # an unreadable results.json (JSONDecodeError): replace it, saying so
        log(f"note: {run / rundir.RESULTS} was unreadable ({e}); it now holds only this evaluation")
        rundir.write_json(run / rundir.RESULTS, res)
        return res


def run_label(cfg: TrainConfig) -> str:
    tags = []
    if cfg.method_spec.loss == "cafe":
        tags += [t for t, on in (("no-sigmoid", cfg.sigmoid), ("no-sep", cfg.separation), ("no-div", cfg.diverse)) if not on]
    if cfg.feature_norm != "none" and cfg.method_spec.needs_features:
        tags.append(f"feature-norm {cfg.feature_norm}")
    return f"{cfg.train} / {cfg.method}" + (f" ({', '.join(tags)})" if tags else "")


# ---------------------------------------------------------------------------- the table
def cross_table(results: list[dict], metric: str = "accuracy") -> tuple[list[str], list[list]]:
    """Columns = every test set seen (in first-seen order) + mean; rows = one per run."""
    cols: list[str] = []
    for r in results:
        for t in r["tests"]:
            if t not in cols:
                cols.append(t)
    rows = []
    for r in results:
        vals = [r["tests"][c][metric] if c in r["tests"] else None for c in cols]
        present = [v for v in vals if v is not None]
        rows.append([r["label"]] + vals + [float(np.mean(present)) if present else None])
    return ["run"] + cols + ["mean"], rows


def table_markdown(header, rows) -> str:
    fmt = lambda v: "–" if v is None else (f"{100 * v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def table_csv(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows([[("" if v is None else (f"{v:.6f}" if isinstance(v, float) else v)) for v in row] for row in rows])
    return buf.getvalue()


def write_tables(results: list[dict], out_prefix: Path) -> dict[str, Path]:
    """Writes <prefix>.md/.csv/.json for accuracy and mean class accuracy."""
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = {}
    md = []
    for metric in ("accuracy", "mean_class_accuracy"):
        header, rows = cross_table(results, metric)
        md.append(f"### {metric.replace('_', ' ')} (%)\n\n" + table_markdown(header, rows))
        p = out_prefix.with_name(out_prefix.name + f"_{metric}.csv")
        rundir.atomic_write_text(p, table_csv(header, rows))
        paths[f"csv_{metric}"] = p
    # with_name, not with_suffix: a prefix like "results/table.v1" must not lose its ".v1"
    p = out_prefix.with_name(out_prefix.name + ".md")
    rundir.atomic_write_text(p, "\n".join(md))
    paths["markdown"] = p
    p = out_prefix.with_name(out_prefix.name + ".json")
    rundir.atomic_write_text(p, json.dumps(results, indent=2))
    paths["json"] = p
    return paths
