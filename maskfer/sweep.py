"""`maskfer sweep`: a grid of training configurations over one feature store.

The encoder never runs here: every configuration reads the same cached features, which is
what makes a sweep cheap. Everything is checked before any training starts (axis names,
value types, an empty grid, a sweep directory made by another grid). Finished
configurations are skipped and a partially trained one resumes from its checkpoint, so a
killed sweep continues where it stopped.

Model selection uses only the validation split of the training dataset (`val_split`), never
the test sets: they stand for domains the user has not seen.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import tomllib
import typing
from pathlib import Path

import numpy as np

from maskfer import rundir
from maskfer.config import ConfigError, TrainConfig

SWEEP_FILE = "sweep.json"
ALIASES = {"lambda": "lam"}  # CLI spelling -> TrainConfig field
NOT_AXES = ("cache", "train")  # one sweep = one store and one training set


class SweepError(Exception):
    pass


# ---------------------------------------------------------------------------- parsing
def field_name(axis: str, what: str = "grid axis") -> str:
    name = axis.strip().lstrip("-").replace("-", "_")
    name = ALIASES.get(name, name)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if name not in fields or name in NOT_AXES:
        valid = sorted(({a for a in ALIASES} | fields) - set(NOT_AXES) - {"lam"})
        raise SweepError(f"{what} {axis!r} names no training option; options: {', '.join(valid)}")
    return name


def _field_types() -> dict[str, typing.Any]:
    return typing.get_type_hints(TrainConfig)


def coerce(name: str, value, where: str):
    """Turn a CLI string or TOML value into the type of TrainConfig.<name>; clear error otherwise."""
    tp = _field_types()[name]
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if args else tp
    if typing.get_origin(tp) is list or typing.get_origin(base) is list:
        # a TOML list, or "a+b" / "a,b" (inside --grid the comma separates values, so use '+')
        items = value if isinstance(value, list) else [v.strip() for v in re.split(r"[+,]", str(value)) if v.strip()]
        return [str(v) for v in items]
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("true", "yes", "on", "1"):
                return True
            if s in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            f = float(value)
            if not f.is_integer():
                raise ValueError
            return int(f)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
            return v
        return str(value)
    except (TypeError, ValueError):
        raise SweepError(f"{where}: {value!r} is not a valid {getattr(base, '__name__', base)} for option {name!r}") from None


def parse_grid(pairs: list[str]) -> dict[str, list]:
    """['lambda=0.5,1.5,5', 'seed=0,1,2'] -> {'lam': [0.5, 1.5, 5.0], 'seed': [0, 1, 2]}."""
    grid: dict[str, list] = {}
    for pair in pairs:
        axis, eq, values = pair.partition("=")
        if not eq:
            raise SweepError(f"--grid {pair!r}: expected AXIS=V1,V2,...")
        name = field_name(axis)
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise SweepError(f"--grid {pair!r}: the axis {axis!r} has no values")
        if name in grid:
            raise SweepError(f"--grid: axis {axis!r} given twice")
        grid[name] = _distinct([coerce(name, v, f"--grid {axis}") for v in vals], f"--grid {axis}")
    return grid


def _distinct(values: list, where: str) -> list:
    """The same value twice would be the same run directory twice (and count twice in the summary)."""
    seen = []
    for v in values:
        if v in seen:
            raise SweepError(f"{where}: the value {v!r} is given twice")
        seen.append(v)
    return values


def axis_label(name: str) -> str:
    """TrainConfig field -> the spelling a user types (lam -> lambda)."""
    return {v: k for k, v in ALIASES.items()}.get(name, name)


def load_sweep_file(path: str | Path) -> tuple[dict, dict[str, list]]:
    """A TOML sweep file: [base] options and [grid] axes (lists)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SweepError(f"{path}: cannot read the sweep file: {e}") from None
    unknown = sorted(set(raw) - {"base", "grid"})
    if unknown:
        raise SweepError(f"{path}: unknown table(s) {', '.join(unknown)}; a sweep file has [base] and [grid]")
    for table in ("base", "grid"):
        if not isinstance(raw.get(table, {}), dict):
            raise SweepError(f"{path}: {table!r} must be a table ([{table}]), not a single value")
    base = {}
    for k, v in raw.get("base", {}).items():
        name = ALIASES.get(k.replace("-", "_"), k.replace("-", "_"))
        if name not in _field_types():
            valid = sorted(set(ALIASES) | set(_field_types()) - {"lam"})
            raise SweepError(f"{path}: [base] option {k!r} is not a training option; options: {', '.join(valid)}")
        if name in base:
            raise SweepError(f"{path}: [base] option {k!r} is given twice (as {axis_label(name)!r} and {name!r})")
        base[name] = coerce(name, v, f"{path} [base] {k}")
    grid = {}
    for k, v in raw.get("grid", {}).items():
        name = field_name(k)
        vals = v if isinstance(v, list) else [v]
        if not vals:
            raise SweepError(f"{path}: [grid] axis {k!r} has no values")
        if name in grid:
            raise SweepError(f"{path}: [grid] axis {k!r} is given twice (as {axis_label(name)!r} and {name!r})")
        grid[name] = _distinct([coerce(name, x, f"{path} [grid] {k}") for x in vals], f"{path} [grid] {k}")
    return base, grid


# ---------------------------------------------------------------------------- the plan
def point_id(point: dict) -> str:
    def fmt(v):
        return "+".join(map(str, v)) if isinstance(v, list) else str(v)

    rid = "_".join(f"{('lambda' if k == 'lam' else k)}={fmt(v)}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9_.=+\-]", "-", rid)


def expand(base: TrainConfig, grid: dict[str, list]) -> list[tuple[str, dict, TrainConfig]]:
    if not grid:
        raise SweepError("the grid is empty: give at least one --grid AXIS=V1,V2 (or a [grid] table)")
    points = []
    for combo in itertools.product(*grid.values()):
        point = dict(zip(grid.keys(), combo))
        cfg = dataclasses.replace(base, **point)
        try:
            cfg.validate()
        except ConfigError as e:
            raise SweepError(f"grid point {point_id(point)}: {e}") from None
        points.append((point_id(point), point, cfg))
    ids = [rid for rid, _, _ in points]
    clash = next((rid for rid in ids if ids.count(rid) > 1), None)
    if clash:
        raise SweepError(f"two grid points would share the run directory runs/{clash}: make the axis values "
                         "differ in letters, digits or '._+-=' (other characters become '-')")
    return points


def _stored_order(out: Path, grid: dict[str, list]) -> dict[str, list]:
    """The axis order of an existing sweep directory: run directories are named in axis order, so the same
    grid given with its axes in another order must not start the sweep over under new names."""
    f = out / SWEEP_FILE
    if not f.exists():
        return grid
    axes = rundir.read_json(f).get("axes") or []
    if sorted(axes) != sorted(grid):
        return grid
    return {a: grid[a] for a in axes}


def _check_dir(out: Path, base: TrainConfig, grid: dict, write: bool = True) -> None:
    record = {"base": base.identity(), "grid": grid, "axes": list(grid)}  # json sorts keys; keep axis order
    f = out / SWEEP_FILE
    if f.exists():
        old = rundir.read_json(f)
        if old.get("base") != record["base"] or old.get("grid") != json.loads(json.dumps(grid)):
            diff = [k for k in set(old.get("grid", {})) | set(grid) if old.get("grid", {}).get(k) != grid.get(k)]
            bdiff = [k for k in record["base"] if old.get("base", {}).get(k) != record["base"][k]]
            raise SweepError(
                f"sweep directory {out} was made by another sweep (grid differs in: "
                f"{', '.join(sorted(axis_label(k) for k in diff)) or '-'}; "
                f"base options differ in: {', '.join(sorted(axis_label(k) for k in bdiff)) or '-'}). Use a new --out."
            )
    elif write:
        out.mkdir(parents=True, exist_ok=True)
        rundir.write_json(f, record)


def _rows_of(store, spec: str, default: str):
    """(dataset view, split, rows) of DATASET[:SPLIT] as maskfer.data.load_split resolves it, without reading
    features or images."""
    from maskfer.config import split_spec
    from maskfer.data import DataError, resolve_split

    name, split = split_spec(spec, default)
    ds = store.dataset(name)
    split = resolve_split(ds, split)
    rows = ds.indices(split)
    if rows.size == 0:
        raise DataError(f"split {name}:{split} in {store.path} is empty (dataset {name!r} has {len(ds)} rows)")
    return ds, split, rows


def _check_images(ds, cfg: TrainConfig) -> None:
    from maskfer.data import DataError

    if not ds.image_sizes() and not Path(cfg.root or ds.root).exists():
        raise DataError(
            f"dataset {ds.name!r} has no cached images in {ds.store.path} and its root {cfg.root or ds.root} is not "
            "there: pass --set root=DATASET_DIR, or rebuild the store with `featcache build --image-size S`")


def _check_data(cfg: TrainConfig, stores: dict) -> None:
    """What only the feature store knows about one configuration (what Trainer and evaluate_run would
    refuse after the sweep has started): datasets, splits, encoder, its feature dim against --drop,
    cached images, the validation split, the test sets."""
    from featcache import open_store
    from maskfer.data import DataError, SplitData, holdout_split, parse_holdout, resolve_encoder
    from maskfer.train import NUM_CLASSES, uses_images

    if cfg.online_encoder and cfg.method in ("baseline", "linear-probe"):
        raise ConfigError("--online-encoder recomputes features for an epoch loop: use it with --method cafe or "
                              "linear-head (baseline uses no features; linear-probe fits the cached ones once)")
    if cfg.cache not in stores:
        stores[cfg.cache] = open_store(cfg.cache)
    store = stores[cfg.cache]
    ds, split, rows = _rows_of(store, cfg.train, "train")
    key = resolve_encoder(ds, cfg.encoder)
    info = ds.encoder_info(key)
    dim = int(info["dim"])
    smallest = dim // NUM_CLASSES
    if cfg.method == "cafe" and cfg.separation and cfg.drop >= smallest:
        raise ConfigError(
            f"--drop {cfg.drop}: features of encoder {key!r} have {dim} channels, so each of the {NUM_CLASSES} "
            f"class groups has {smallest}+ channels; drop at most {smallest - 1}")
    if uses_images(cfg) or cfg.online_encoder:
        _check_images(ds, cfg)
    holdout = parse_holdout(cfg.val_split)
    if holdout:
        import torch

        labels = torch.from_numpy(ds.labels[rows])
        holdout_split(SplitData(f"{ds.name}:{split}", ds.name, split, rows, rows, labels,
                                torch.zeros(len(rows), 0), None), holdout)
    elif cfg.val_split:
        from featcache import StoreError

        try:
            _rows_of(store, f"{ds.name}:{cfg.val_split}", cfg.val_split)
        except (StoreError, DataError) as e:
            raise DataError(f"--val-split {cfg.val_split}: {e}; without a validation split, hold out part of the "
                            "training split with --val-split holdout:0.1") from None
    for spec in cfg.test:
        tds, tsplit, _ = _rows_of(store, spec, "test")
        tinfo = tds.encoder_info(resolve_encoder(tds, key))
        if tinfo.get("fingerprint") != info.get("fingerprint") or int(tinfo["dim"]) != dim:
            raise DataError(
                f"test set {spec} in {cfg.cache} has encoder {key!r} features (dim {tinfo['dim']}, fingerprint "
                f"{tinfo.get('fingerprint')}) unlike the training set {cfg.train} (dim {dim}, fingerprint "
                f"{info.get('fingerprint')}): build the test set with the same --model")
        if uses_images(cfg):
            _check_images(tds, cfg)


_DATA_FIELDS = ("cache", "train", "encoder", "val_split", "test", "method", "separation", "drop", "online_encoder",
                "pretrained", "root")


def check_data(points) -> None:
    """:func:`_check_data` for every configuration (once per distinct set of the fields it reads)."""
    from featcache import StoreError
    from maskfer.data import DataError

    stores: dict = {}
    seen = set()
    try:
        for rid, _, cfg in points:
            key = json.dumps([getattr(cfg, k) for k in _DATA_FIELDS], default=str)
            if key in seen:
                continue
            seen.add(key)
            try:
                _check_data(cfg, stores)
            except ConfigError as e:
                raise SweepError(f"grid point {rid}: {e}") from None
            except (StoreError, DataError) as e:
                raise SweepError(str(e)) from None
    finally:
        for s in stores.values():
            s.close()


def _finished(run: Path, cfg: TrainConfig) -> bool:
    """Trained to the last epoch (the test results are checked separately: :func:`_has_results`)."""
    rows = rundir.read_metrics(run)
    if cfg.method == "linear-probe":  # one solve, one metrics row (maskfer.probe); an older epoch-trained
        # 'linear-probe' run is not a fitted probe (the Trainer refuses to count it as one)
        return bool(rows) and rows[-1].get("solver") == "lbfgs" and (run / rundir.LAST).exists()
    return len(rows) >= cfg.epochs and (run / rundir.LAST).exists()


def _has_results(run: Path, cfg: TrainConfig) -> bool:
    """results.json holds exactly this configuration's test sets (the sweep may be rerun with another --test)."""
    from maskfer.config import split_spec

    if not cfg.test:
        return True
    if not (run / rundir.RESULTS).exists():
        return False
    have = set(rundir.read_json(run / rundir.RESULTS).get("tests", {}))
    matched = set()
    for spec in cfg.test:
        name, split = split_spec(spec, "test")
        hit = {f"{name}:{split}", *([f"{name}:all"] if split == "test" else [])} & have
        if not hit:
            return False
        matched |= hit
    return matched == have


def plan_sweep(base: TrainConfig, grid: dict[str, list], out: Path, write: bool = True) -> list[tuple[str, dict, TrainConfig]]:
    """Validate everything and (``write``) prepare the directory; no training. ``write=False`` (--dry-run)
    checks the same things, an existing directory included, and creates nothing."""
    out = Path(out)
    if not base.val_split:
        raise SweepError("a sweep selects its model on a validation split of the training dataset: "
                         "give --val-split (e.g. val)")
    grid = _stored_order(out, grid)
    points = expand(base, grid)
    _check_dir(out, base, grid, write=False)  # a wrong directory is reported before the slower data checks
    check_data(points)
    _check_dir(out, base, grid, write=write)
    return points


def run_sweep(base: TrainConfig, grid: dict[str, list], out: str | Path, parallel: int = 1, progress: bool = True,
              log=print, trust_plugins: bool = False) -> dict:
    from maskfer.evaluate import evaluate_run
    from maskfer.train import Trainer

    out = Path(out)
    grid = _stored_order(out, grid)
    points = plan_sweep(base, grid, out)
    todo = [(rid, p, c) for rid, p, c in points if not _finished(out / "runs" / rid, c)]
    log(f"sweep {out}: {len(points)} configurations, {len(points) - len(todo)} already finished")
    # The converged linear probe is one L-BFGS solve, not an epoch loop: nothing to stack.
    stacked = [t for t in todo if t[2].method != "linear-probe"] if parallel > 1 else []
    if stacked:
        from maskfer.parallel import group_key, train_parallel

        groups: dict[str, list] = {}
        for rid, p, c in stacked:
            groups.setdefault(group_key(c), []).append((rid, p, c))
        for members in groups.values():
            for s in range(0, len(members), parallel):
                chunk = members[s:s + parallel]
                log(f"training {len(chunk)} configurations at once: {', '.join(r for r, _, _ in chunk)}")
                train_parallel([c for _, _, c in chunk], [out / "runs" / r for r, _, _ in chunk],
                               progress=progress, log=log, trust_plugins=trust_plugins)
                for rid, _, c in chunk:
                    if c.test:
                        evaluate_run(out / "runs" / rid, c.cache, c.test, device=c.device, log=log, merge=False)
    sequential = [t for t in todo if t not in stacked]
    if sequential:
        for i, (rid, p, c) in enumerate(sequential):
            log(f"[{i + 1}/{len(sequential)}] {rid}")
            trainer = Trainer(c, out / "runs" / rid, progress, log, trust_plugins=trust_plugins)
            trainer.run()
            if c.test:
                evaluate_run(out / "runs" / rid, c.cache, c.test, trainer=trainer, log=log, merge=False)
    # trained earlier but killed before its evaluation, or the sweep is rerun with other --test sets.
    # merge=False everywhere: a sweep run's results.json holds exactly its configuration's test sets.
    for rid, _, c in points:
        if not _has_results(out / "runs" / rid, c):
            evaluate_run(out / "runs" / rid, c.cache, c.test, device=c.device, log=log, merge=False)
    return summarize_sweep(out, points, grid)


# ---------------------------------------------------------------------------- summary
def summarize_sweep(out: Path, points, grid: dict[str, list]) -> dict:
    """Per configuration (grid point without seed): mean ± std over seeds of val and test accuracy."""
    axes = [a for a in grid if a != "seed"]
    by_conf: dict[str, dict] = {}
    for rid, point, cfg in points:
        run = out / "runs" / rid
        conf = {a: point[a] for a in axes}
        key = json.dumps(conf, sort_keys=True)
        entry = by_conf.setdefault(key, {"config": conf, "runs": [], "val": [], "tests": {}})
        metrics = rundir.read_metrics(run)
        entry["runs"].append(str(run.relative_to(out)))
        if metrics and "val_acc" in metrics[-1]:
            entry["val"].append(metrics[-1]["val_acc"])
        res = rundir.read_json(run / rundir.RESULTS) if (run / rundir.RESULTS).exists() else {"tests": {}}
        for t, m in res["tests"].items():
            entry["tests"].setdefault(t, []).append(m["accuracy"])
    rows = []
    for entry in by_conf.values():
        rows.append({
            "config": entry["config"], "runs": entry["runs"], "n_seeds": len(entry["runs"]),
            "val_mean": _mean(entry["val"]), "val_std": _std(entry["val"]),
            "tests": {t: {"mean": _mean(v), "std": _std(v), "n": len(v)} for t, v in entry["tests"].items()},
        })
    complete = [r for r in rows if r["val_mean"] is not None]
    best = max(complete, key=lambda r: r["val_mean"]) if complete else None
    for r in rows:
        r["selected"] = r is best
    summary = {"axes": axes, "grid": grid, "selection": "highest mean validation accuracy over seeds",
               "rows": rows}
    rundir.write_json(out / "summary.json", summary)
    rundir.atomic_write_text(out / "summary.md", summary_markdown(summary))
    rundir.atomic_write_text(out / "summary.csv", summary_csv(summary))
    return summary


def _mean(v):
    return float(np.mean(v)) if v else None


def _std(v):
    return float(np.std(v, ddof=1)) if len(v) > 1 else (0.0 if v else None)


def test_columns(summary: dict) -> list[str]:
    """The test sets of a summary, in first-seen order."""
    seen: list[str] = []
    for r in summary["rows"]:
        for t in r["tests"]:
            if t not in seen:
                seen.append(t)
    return seen


def _pm(m, s):
    return "–" if m is None else f"{100 * m:.2f} ± {100 * (s or 0):.2f}"


def summary_markdown(summary: dict) -> str:
    tests = test_columns(summary)
    head = ["", *[("lambda" if a == "lam" else a) for a in summary["axes"]], "seeds", "val (select)", *tests]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        cells = ["**selected**" if r["selected"] else "", *[str(r["config"][a]) for a in summary["axes"]],
                 str(r["n_seeds"]), _pm(r["val_mean"], r["val_std"])]
        cells += [_pm(r["tests"].get(t, {}).get("mean"), r["tests"].get(t, {}).get("std")) for t in tests]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\nAccuracy %, mean ± std over seeds. Selection: " + summary["selection"]
            + " (validation split of the training dataset only; test sets are never used to select).\n")
    return "\n".join(lines) + "\n" + note


def summary_csv(summary: dict) -> str:
    import csv
    import io

    tests = test_columns(summary)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["selected", *summary["axes"], "n_seeds", "val_mean", "val_std",
                *[f"{t}_{s}" for t in tests for s in ("mean", "std")]])
    for r in summary["rows"]:
        w.writerow([int(r["selected"]), *[r["config"][a] for a in summary["axes"]], r["n_seeds"],
                    r["val_mean"], r["val_std"],
                    *[r["tests"].get(t, {}).get(s) for t in tests for s in ("mean", "std")]])
    return buf.getvalue()
