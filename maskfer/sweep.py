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

import csv
import dataclasses
import io
import itertools
import json
import re
import tomllib
from pathlib import Path

import numpy as np
import torch

from featcache import StoreError, open_store
from featcache.distributed import Context, detect, session
from featcache.errors import FerError
from maskfer import rundir
from maskfer.batches import check_drop, check_online_encoder, check_recipe, check_views
from maskfer.config import (AXIS_FIELDS, DATA_FIELDS, OPTIONS, ConfigError, TrainConfig, coerce_value, field_for, flag,
                            split_spec, unknown_key_hint)
from maskfer.data import (DataError, SplitData, holdout_split, parse_holdout, require_aug_views, resolve_encoder,
                          resolve_split)
from maskfer.evaluate import evaluate_run
from maskfer.parallel import group_key, train_parallel
from maskfer.train import Trainer, paper_differences

SWEEP_FILE = "sweep.json"


class SweepError(FerError):
    pass


# ---------------------------------------------------------------------------- parsing
# Axis names, --set keys and [base] keys are the flag spellings of maskfer.config's declaration (lambda,
# noise-std, sigmoid ...; dashes or underscores), and the field names (lam, noise_std) that older sweep
# files used; the sweep axes are config.AXIS_FIELDS (one sweep is one store and one training set).
def field_name(axis: str, what: str = "grid axis", axes_only: bool = True) -> str:
    """A user's spelling of a training option -> its TrainConfig field; SweepError naming the allowed ones.
    ``axes_only=False`` (--set, [base]) also accepts the options that are not axes (cache, train)."""
    name = field_for(axis)
    allowed = AXIS_FIELDS if axes_only else tuple(OPTIONS)
    if name is None:
        hint = unknown_key_hint(axis)
        if hint.startswith("options:"):
            hint = "options: " + ", ".join(flag(n) for n in allowed)
        raise SweepError(f"{what} {axis!r} names no training option; {hint}")
    if name not in allowed:
        raise SweepError(f"{what} {axis!r} is not a sweep axis: one sweep has one --{flag(name)} (set it with "
                         f"--{flag(name)} or in [base]); axes: {', '.join(flag(n) for n in allowed)}")
    return name


def coerce(name: str, value, where: str):
    """A CLI string or TOML value -> the type of TrainConfig.<name> (maskfer.config.coerce_value); SweepError
    prefixed with ``where`` otherwise."""
    try:
        return coerce_value(name, value)
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from None


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
    """TrainConfig field -> the spelling a user types, its flag (lam -> lambda, val_split -> val-split)."""
    return flag(name)


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
    base, spelled = {}, {}
    for k, v in raw.get("base", {}).items():
        name = field_for(k)
        if name is None:
            raise SweepError(f"{path}: [base] option {k!r} is not a training option; {unknown_key_hint(k)}")
        if name in base:
            raise SweepError(f"{path}: [base] option {k!r} is given twice (as {spelled[name]!r} and {k!r})")
        base[name], spelled[name] = coerce(name, v, f"{path} [base] {k}"), k
    grid, spelled = {}, {}
    for k, v in raw.get("grid", {}).items():
        name = field_name(k)
        vals = v if isinstance(v, list) else [v]
        if not vals:
            raise SweepError(f"{path}: [grid] axis {k!r} has no values")
        if name in grid:
            raise SweepError(f"{path}: [grid] axis {k!r} is given twice (as {spelled[name]!r} and {k!r})")
        spelled[name] = k
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

    name, split = split_spec(spec, default)
    ds = store.dataset(name)
    split = resolve_split(ds, split)
    rows = ds.indices(split)
    if rows.size == 0:
        raise DataError(f"split {name}:{split} in {store.path} is empty (dataset {name!r} has {len(ds)} rows)")
    return ds, split, rows


def _check_images(ds, cfg: TrainConfig) -> None:

    if not ds.image_sizes() and not Path(cfg.root or ds.root).exists():
        raise DataError(
            f"dataset {ds.name!r} has no cached images in {ds.store.path} and its root {cfg.root or ds.root} is not "
            "there: pass --set root=DATASET_DIR, or rebuild the store with `featcache build --image-size S`")


def _check_data(cfg: TrainConfig, stores: dict) -> None:
    """What only the feature store knows about one configuration (what Trainer and evaluate_run would
    refuse after the sweep has started): datasets, splits, encoder, its feature dim against --drop,
    cached images, augmented views, the validation split, the test sets."""
    check_online_encoder(cfg)
    check_views(cfg)
    if cfg.cache not in stores:
        stores[cfg.cache] = open_store(cfg.cache)
    store = stores[cfg.cache]
    ds, split, rows = _rows_of(store, cfg.train, "train")
    key = resolve_encoder(ds, cfg.encoder)
    info = ds.encoder_info(key)
    dim = int(info["dim"])
    check_drop(cfg, dim, key)
    if cfg.views == "augmented":
        check_recipe(cfg, require_aug_views(ds, key, cfg.cache), f"{ds.name} in {cfg.cache}")
    if cfg.reads_images:
        _check_images(ds, cfg)
    holdout = parse_holdout(cfg.val_split)
    if holdout:
        labels = torch.from_numpy(ds.labels[rows])
        holdout_split(SplitData(f"{ds.name}:{split}", ds.name, split, rows, rows, labels,
                                torch.zeros(len(rows), 0), None), holdout)
    elif cfg.val_split:

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
        if cfg.reads_images:
            _check_images(tds, cfg)


_DATA_FIELDS = DATA_FIELDS  # maskfer.config declares which fields the store checks read


def check_data(points) -> None:
    """:func:`_check_data` for every configuration (once per distinct set of the fields it reads)."""

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
    if not cfg.method_spec.epoch_trained:  # one solve (maskfer.probe) or zero-shot: one metrics row whose solver
        # names the fit; an older epoch-trained 'linear-probe' run is not a fitted probe (the Trainer refuses it)
        return bool(rows) and rows[-1].get("solver") == cfg.method_spec.fit and (run / rundir.LAST).exists()
    return len(rows) >= cfg.epochs and (run / rundir.LAST).exists()


def _has_results(run: Path, cfg: TrainConfig) -> bool:
    """results.json holds exactly this configuration's test sets (the sweep may be rerun with another --test)."""

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
              log=print, trust_plugins: bool = False, dist_context: Context | None = None) -> dict:
    """Train (or resume) every configuration of the grid, evaluate it on its test sets, write the summary.

    Under torchrun (``WORLD_SIZE`` > 1, or ``dist_context``) every rank calls this with the same arguments: the
    work units (the groups ``parallel`` forms, then lone runs, then runs that only need their evaluation) go
    round-robin to the ranks, each trains its units on its own device, and rank 0 writes the summary once all
    ranks are done (docs/sweep.md, "Several GPUs and nodes: torchrun"). Every rank returns the summary."""
    out = Path(out)
    ctx = detect() if dist_context is None else dist_context
    dev = ctx.device(base.device) if ctx.active else None
    log, progress = ctx.prefixed(log), ctx.progress(progress)
    with session(ctx, dev):
        with ctx.step("checking the sweep", log):
            grid = _stored_order(out, grid)
            points = plan_sweep(base, grid, out, write=ctx.primary)
        with ctx.step("reading which runs are finished", log) as met:
            todo = [(rid, p, c) for rid, p, c in points if not _finished(out / "runs" / rid, c)]
            evaluate = [(rid, p, c) for rid, p, c in points if (rid, p, c) not in todo
                        and not _has_results(out / "runs" / rid, c)]
            met.value = ([rid for rid, _, _ in todo], [rid for rid, _, _ in evaluate])
        ctx.agree("the sweep directory", met.values, f"every node must see the same {out} (a shared file system)")
        if ctx.primary:
            log(f"sweep {out}: {len(points)} configurations, {len(points) - len(todo)} already finished")
        units = _work_units(todo, evaluate, parallel)
        if ctx.active:  # each rank's configurations run on its own device (device is not part of a run's identity)
            units = [(kind, [(rid, p, dataclasses.replace(c, device=str(dev))) for rid, p, c in members])
                     for kind, members in ctx.shard(units)]
            log(f"{sum(len(m) for k, m in units if k != 'evaluate')} of the {len(todo)} configurations to train "
                f"are this rank's, on {dev}")
        with ctx.step("training", log):
            lone = [m[0][0] for k, m in units if k == "train"]
            for kind, members in units:
                if kind == "train":
                    log(f"[{lone.index(members[0][0]) + 1}/{len(lone)}] {members[0][0]}")
                _run_unit(kind, members, out, progress, log, trust_plugins)
        with ctx.step("writing the summary", log):
            if ctx.primary:
                # trained earlier but killed before its evaluation, or rerun with other --test sets: the units
                # above evaluated them; this catches one a rank left without results (merge=False everywhere: a
                # sweep run's results.json holds exactly its configuration's test sets).
                for rid, _, c in points:
                    if not _has_results(out / "runs" / rid, c):
                        evaluate_run(out / "runs" / rid, c.cache, c.test, device=dev if ctx.active else c.device,
                                     log=log, merge=False, trust_plugins=trust_plugins)
                for line in sorted({line for _, _, c in points for line in paper_differences(c)}):
                    log(line)
                summary = summarize_sweep(out, points, grid)
    return summary if ctx.primary else rundir.read_json(out / "summary.json")


def _work_units(todo, evaluate, parallel: int) -> list[tuple[str, list]]:
    """The sweep's work in a fixed order: ("parallel", a chunk of <= ``parallel`` configurations of one group),
    ("train", one configuration), ("evaluate", one trained configuration without its test results). The same
    todo gives the same units, so every rank of a torchrun launch computes the same list and takes its share."""
    # The converged linear probe is one L-BFGS solve, not an epoch loop: nothing to stack.
    stacked = [t for t in todo if t[2].method_spec.epoch_trained] if parallel > 1 else []
    groups: dict[str, list] = {}
    for rid, p, c in stacked:
        groups.setdefault(group_key(c), []).append((rid, p, c))
    units = [("parallel", members[s:s + parallel]) for members in groups.values()
             for s in range(0, len(members), parallel)]
    units += [("train", [t]) for t in todo if t not in stacked]
    return units + [("evaluate", [t]) for t in evaluate]


def _run_unit(kind: str, members: list, out: Path, progress: bool, log, trust_plugins: bool) -> None:
    if kind == "parallel":
        log(f"training {len(members)} configurations at once: {', '.join(r for r, _, _ in members)}")
        train_parallel([c for _, _, c in members], [out / "runs" / r for r, _, _ in members],
                       progress=progress, log=log, trust_plugins=trust_plugins)
        device = members[0][2].device
    elif kind == "train":
        rid, _, c = members[0]
        trainer = Trainer(c, out / "runs" / rid, progress, log, trust_plugins=trust_plugins)
        trainer.run()
        device = trainer.device
    else:
        device = members[0][2].device
    for rid, _, c in members:
        if c.test:
            evaluate_run(out / "runs" / rid, c.cache, c.test, device=device, log=log, merge=False,
                         trust_plugins=trust_plugins)


# ---------------------------------------------------------------------------- summary
def summarize_sweep(out: Path, points, grid: dict[str, list]) -> dict:
    """Per configuration (grid point without seed): mean ± std over seeds of val and test accuracy; written
    to summary.json / .md / .csv."""
    summary = _summary(Path(out), [p for _, p, _ in points], grid)
    rundir.write_json(out / "summary.json", summary)
    rundir.atomic_write_text(out / "summary.md", summary_markdown(summary))
    rundir.atomic_write_text(out / "summary.csv", summary_csv(summary))
    return summary


def _summary(out: Path, points: list[dict], grid: dict[str, list]) -> dict:
    axes = [a for a in grid if a != "seed"]
    by_conf: dict[str, dict] = {}
    for point in points:
        run = out / "runs" / point_id(point)
        conf = {a: point[a] for a in axes}
        entry = by_conf.setdefault(json.dumps(conf, sort_keys=True), {"config": conf, "runs": [], "val": [], "tests": {}})
        entry["runs"].append(str(run.relative_to(out)))
        metrics = rundir.read_metrics(run)
        if metrics and "val_acc" in metrics[-1]:
            entry["val"].append(metrics[-1]["val_acc"])
        res = rundir.read_json(run / rundir.RESULTS) if (run / rundir.RESULTS).exists() else {"tests": {}}
        for t, m in res["tests"].items():
            entry["tests"].setdefault(t, []).append(m["accuracy"])
    rows = [{"config": e["config"], "runs": e["runs"], "n_seeds": len(e["runs"]), "val_mean": _mean(e["val"]),
             "val_std": _std(e["val"]), "tests": {t: {"mean": _mean(v), "std": _std(v), "n": len(v)}
                                                  for t, v in e["tests"].items()}}
            for e in by_conf.values()]
    complete = [r for r in rows if r["val_mean"] is not None]
    best = max(complete, key=lambda r: r["val_mean"]) if complete else None
    for r in rows:
        r["selected"] = r is best
    return {"axes": axes, "grid": grid, "selection": "highest mean validation accuracy over seeds", "rows": rows}


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


def summary_so_far(out: str | Path) -> dict:
    """The summary :func:`summarize_sweep` writes when a sweep ends, computed from the run directories finished
    so far and written nowhere (``maskfer report`` on a sweep still running). The grid and its axis order are
    the ones stored in the directory's sweep.json, so the run directories are found under their own names."""
    out = Path(out)
    grid = _stored_order(out, rundir.read_json(out / SWEEP_FILE).get("grid", {}))
    return _summary(out, [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())], grid)
