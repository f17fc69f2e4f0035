"""`maskfer report`: figures and one static HTML page for a run directory or a sweep directory.

    from maskfer.report import write_report
    write_report("runs/cafe")                                # -> runs/cafe/report/index.html
    write_report("runs/cafe", baseline="runs/baseline", test="muxspace")
    write_report("sweeps/lam_beta")                          # heat-maps + the selected run's figures

A run report holds the config summary, training curves (metrics.jsonl, so far for a run
still training), a row-normalised confusion matrix and per-class accuracy bars per test set
(results.json), and a t-SNE of the masked features against a baseline's (or the raw cached
features) on an unseen test set, as in the paper's Figure 4. A sweep report holds the
lambda x beta heat-maps of mean validation (and test) accuracy, as in the paper's Figure 3,
the summary table, and the selected configuration's run report. See docs/report.md.

The plotting libraries are an optional extra (``pip install 'cafe-fer[report]'``): they are
imported here only inside functions. Figures are drawn on ``matplotlib.figure.Figure`` with
the Agg canvas, never through pyplot, so no global backend state is touched.
"""
from __future__ import annotations

import dataclasses
import datetime
import html
import itertools
import json
import re
from pathlib import Path

import numpy as np

from featcache.taxonomy import CLASSES
from maskfer import rundir
from maskfer.figures import (confusion_figure, heatmap_figure, fmt_num, per_class_figure, training_curves,
                             tsne_figure, pct)
from maskfer.sweep import test_columns

__all__ = ["write_report", "ReportError", "INSTALL_HINT"]

INSTALL_HINT = "pip install 'cafe-fer[report]'"
REPORT_DIR = "report"
INDEX = "index.html"
SELECTED_DIR = "selected"
TSNE_SEED = 0          # subsampling and t-SNE random_state
MIN_TSNE_POINTS = 5

# One fixed colour per class (CLASSES order), from matplotlib's tab10, so every figure agrees.


class ReportError(Exception):
    pass


# ---------------------------------------------------------------------------- optional libraries
def _require_libraries(tsne: bool = True) -> None:
    """Fail early, before anything is written, when the optional extra is not installed."""
    missing = []
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        missing.append("matplotlib")
    if tsne:
        try:
            import sklearn  # noqa: F401
            from sklearn.manifold import TSNE  # noqa: F401
        except ImportError:
            missing.append("scikit-learn")
    if missing:
        raise ReportError(f"maskfer report needs {' and '.join(missing)}, which are not installed: "
                          f"install the optional extra with  {INSTALL_HINT}")


# ---------------------------------------------------------------------------- small helpers
def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def pct_pm(mean, std) -> str:
    return "–" if mean is None else f"{pct(mean)} ± {pct(std or 0.0)}"


def slug(name: str) -> str:
    """'domB:test' -> 'domB_test' (file-name safe)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _table(header: list[str], rows: list[list], table_id: str | None = None, cls: str = "", raw_cells=False) -> str:
    tid = f' id="{_esc(table_id)}"' if table_id else ""
    c = f' class="{_esc(cls)}"' if cls else ""
    out = [f"<table{tid}{c}><thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for row in rows:
        row_cls = ""
        if isinstance(row, dict):  # {"cells": [...], "class": "selected"}
            row_cls = f' class="{_esc(row["class"])}"' if row.get("class") else ""
            row = row["cells"]
        cells = "".join(f"<td>{cell if raw_cells else _esc(cell)}</td>" for cell in row)
        out.append(f"<tr{row_cls}>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _kv_table(pairs: list[tuple[str, object]], table_id: str | None = None, per_row: int = 1) -> str:
    """Key/value pairs, ``per_row`` pairs to a row (key cells are <th>), no header."""
    tid = f' id="{_esc(table_id)}"' if table_id else ""
    rows = []
    for s in range(0, len(pairs), per_row):
        chunk = pairs[s:s + per_row]
        rows.append("<tr>" + "".join(f"<th>{_esc(k)}</th><td>{_esc(v)}</td>" for k, v in chunk) + "</tr>")
    return f'<table{tid} class="kv"><tbody>' + "".join(rows) + "</tbody></table>"


# ---------------------------------------------------------------------------- the page model
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1280px;padding:16px 24px;
color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{margin-bottom:.3em}.meta{color:#666;font-size:.9em}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:.6em 0}
.figrow{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start;margin:.6em 0 1.2em}
figure{margin:0;display:table;max-width:100%}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{display:table-caption;caption-side:bottom;font-size:.88em;color:#444;margin-top:4px}
.side{flex:1 1 260px;min-width:240px;overflow-x:auto}
table{border-collapse:collapse;font-size:.88em;margin:.3em 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
table.kv th{background:#f7f7f7;font-weight:normal;color:#555;text-align:left}
table.kv td{text-align:left;white-space:normal;max-width:420px;overflow-wrap:break-word}
tr.selected td{background:#fff3b0;font-weight:600}
.absent{color:#999;font-style:italic}
.scroll{max-height:320px;overflow:auto;display:inline-block}
details{margin:.4em 0}pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:.85em}
"""


class Page:
    """Blocks of a page; figure sources are rendered with a prefix so a run's blocks embed in a sweep page."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str, anchor: str | None = None) -> None:
        self.blocks.append(("h", level, text, anchor))

    def note(self, text: str) -> None:
        self.blocks.append(("raw", f'<p class="note">{_esc(text)}</p>'))

    def para(self, text: str, raw: bool = False) -> None:
        self.blocks.append(("raw", f"<p>{text if raw else _esc(text)}</p>"))

    def raw(self, fragment: str) -> None:
        self.blocks.append(("raw", fragment))

    def figure(self, file: str, caption: str, side_html: str = "", alt: str = "") -> None:
        self.blocks.append(("fig", file, caption, side_html, alt or caption.split(".")[0]))

    def embed(self, other: "Page", prefix: str, shift: int = 1) -> None:
        self.blocks.append(("embed", other, prefix, shift))

    def images(self, prefix: str = "") -> list[str]:
        out = []
        for b in self.blocks:
            if b[0] == "fig":
                out.append(prefix + b[1])
            elif b[0] == "embed":
                out += b[1].images(prefix + b[2])
        return out

    def body(self, prefix: str = "", shift: int = 0) -> str:
        parts = []
        for b in self.blocks:
            if b[0] == "h":
                _, level, text, anchor = b
                lv = min(6, level + shift)
                a = f' id="{_esc(anchor)}"' if anchor else ""
                parts.append(f"<h{lv}{a}>{_esc(text)}</h{lv}>")
            elif b[0] == "raw":
                parts.append(b[1])
            elif b[0] == "fig":
                _, file, caption, side, alt = b
                src = _esc(prefix + file)
                fig = (f'<figure><a href="{src}"><img src="{src}" alt="{_esc(alt)}"></a>'
                       f"<figcaption>{_esc(caption)}</figcaption></figure>")
                parts.append(f'<div class="figrow">{fig}' + (f'<div class="side">{side}</div>' if side else "")
                             + "</div>")
            elif b[0] == "embed":
                _, other, pre, sh = b
                parts.append(other.body(prefix + pre, shift + sh))
        return "\n".join(parts)

    def html(self) -> str:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{_esc(self.title)}</title><style>{CSS}</style></head>\n<body>\n"
                f"<h1>{_esc(self.title)}</h1>\n<p class=\"meta\">generated {stamp} by <code>maskfer report</code></p>\n"
                f"{self.body()}\n</body></html>\n")


# ---------------------------------------------------------------------------- entry point
def write_report(path, out=None, baseline=None, test: str | None = None, max_points: int = 2000,
                 device: str = "cpu", *, cache: str | None = None, tsne: bool = True, log=print) -> Path:
    """Write figures and ``index.html`` for a run directory or a sweep directory; returns the index path.

    path        a run directory (config.json) or a sweep directory (sweep.json / summary.json)
    out         output folder [default: ``<path>/report``]; figures are PNG files next to index.html
    baseline    a run directory (a ``--method baseline`` run) whose backbone features are the t-SNE's
                second panel [default: the raw cached features F of the same images]
    test        DATASET[:SPLIT] for the t-SNE [default: the first test set in results.json (else the
                config's tests) whose dataset is not the training dataset]
    max_points  t-SNE subsample size (fixed seed)
    device      where the models run for the t-SNE features ("cpu", "cuda", "auto")
    cache       feature store to read the t-SNE images/features from [default: the run's own]
    tsne        False skips the t-SNE (and the need for scikit-learn)
    """
    path = Path(path)
    if max_points < MIN_TSNE_POINTS:
        raise ReportError(f"max_points must be at least {MIN_TSNE_POINTS}, got {max_points}")
    kind = detect_kind(path)
    baseline = Path(baseline) if baseline else None
    if baseline is not None:
        _check_baseline(baseline)
    _require_libraries(tsne)
    out = Path(out) if out else path / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    opts = dict(baseline=baseline, test=test, max_points=int(max_points), device=device, cache=cache, tsne=tsne,
                log=log)
    if kind == "run":
        page = run_page(path, out, **opts)
    else:
        page = sweep_page(path, out, **opts)
    index = out / INDEX
    rundir.atomic_write_text(index, page.html())
    log(f"report: {index} ({len(page.images())} figure(s))")
    return index


def detect_kind(path: Path) -> str:
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory: give a run directory (maskfer train --out) "
                          "or a sweep directory (maskfer sweep --out)")
    if (path / rundir.CONFIG).exists():
        return "run"
    if (path / "sweep.json").exists() or (path / "summary.json").exists():
        return "sweep"
    raise ReportError(f"{path} is neither a run directory (no {rundir.CONFIG}) nor a sweep directory "
                      "(no sweep.json or summary.json)")


def _check_baseline(baseline: Path) -> None:
    if not (baseline / rundir.CONFIG).exists():
        raise ReportError(f"--baseline {baseline} is not a run directory (no {rundir.CONFIG}); "
                          "train one with `maskfer train --method baseline`")
    if not (baseline / rundir.LAST).exists():
        raise ReportError(f"--baseline {baseline} has no checkpoint yet (training has not finished an epoch)")


# ---------------------------------------------------------------------------- run report
CONFIG_SUMMARY = [
    ("train", "training set"), ("val_split", "validation split"), ("test", "test sets"), ("method", "method"),
    ("backbone", "backbone"), ("pretrained", "pretrained backbone"), ("epochs", "epochs"),
    ("batch_size", "batch size"), ("image_size", "image size"), ("lr", "learning rate (Adam)"),
    ("weight_decay", "weight decay"), ("gamma", "lr decay per epoch"), ("lam", "λ (separation)"),
    ("beta", "β (diverse)"), ("drop", "channels dropped / group"), ("drop_mode", "drop mode"),
    ("sigmoid", "sigmoid mask"), ("separation", "separation loss"), ("diverse", "diverse loss"),
    ("mask_map", "mask map"), ("flip", "flips"), ("erasing", "random erasing p"), ("noise_std", "noise std"),
    ("balanced", "balanced sampling"), ("seed", "seed"), ("cache", "feature store"),
]


def run_page(run: Path, out: Path, *, baseline=None, test=None, max_points=2000, device="cpu", cache=None,
             tsne=True, log=print) -> Page:
    """Figures of one run into ``out``; returns the page (image paths relative to ``out``)."""
    stored, _ = rundir.read_run_config(run)  # a damaged config.json is one line naming the field, not a traceback
    cfg = stored.get("config", {})
    metrics = rundir.read_metrics(run)
    results = rundir.read_json(run / rundir.RESULTS) if (run / rundir.RESULTS).exists() else None
    page = Page(f"CAFE report: run {run.resolve().name}")

    # -- config summary
    page.heading(2, "Run and configuration", "config")
    n_done, n_planned = len(metrics), int(cfg.get("epochs", 0) or 0)
    # --method linear-probe: one L-BFGS solve, one metrics row that stands for every epoch (maskfer.probe)
    probe = next((r for r in metrics if r.get("solver") == "lbfgs"), None)
    if probe is not None:
        n_done = int(probe.get("epoch", n_planned - 1)) + 1  # what its checkpoint (and results.json) count
        status = (f"finished: linear probe fit by L-BFGS, L2 {fmt_num(probe.get('probe_lambda'))} chosen on "
                  f"{probe.get('selected_on')}" + ("" if probe.get("probe_converged") else " (NOT converged)"))
    elif not metrics:
        status = f"not started: no epoch finished yet (0 of {n_planned})"
    elif n_done < n_planned:
        status = f"training: {n_done} of {n_planned} epochs finished (curves so far)"
    else:
        status = f"finished: {n_done} of {n_planned} epochs"
    enc = stored.get("encoder") or {}
    pairs = [("run directory", str(run)), ("status", status),
             ("evaluated", f"yes, after epoch {results.get('epochs_trained')}" if results else "not evaluated")]
    pairs += [(label, _fmt_cfg(cfg.get(k))) for k, label in CONFIG_SUMMARY if k in cfg]
    pairs += [("encoder", f"{enc.get('key')} (dim {stored.get('feat_dim')}, fingerprint {enc.get('fingerprint')})"),
              ("config hash", stored.get("config_hash", "–"))]
    page.raw(_kv_table(pairs, "config-table", per_row=3))
    page.raw("<details><summary>full config.json</summary><pre>"
             + _esc(json.dumps(stored, indent=2, sort_keys=True)) + "</pre></details>")
    if results and metrics and int(results.get("epochs_trained", n_done)) != n_done:
        page.note(f"results.json was written after epoch {results.get('epochs_trained')}, but metrics.jsonl now has "
                  f"{n_done} epochs: run `maskfer eval` again for current numbers.")

    # -- training curves
    page.heading(2, "Training curves", "curves")
    if probe is not None:
        page.para("A converged linear probe has no training curve: one full-batch L-BFGS solve per L2 strength "
                  f"(maskfer.probe), chosen by accuracy on {probe.get('selected_on')} (★), then refit with it. "
                  "--epochs and the optimizer options do not apply.")
        page.raw(_probe_table(probe))
    elif metrics:
        training_curves(metrics, cfg, out / "curves.png")
        cap = ("Training curves from metrics.jsonl, one point per finished epoch. Left: training loss, the total "
               f"CE + λ·sep + β·div (λ = {fmt_num(cfg.get('lam'))}, β = {fmt_num(cfg.get('beta'))}) and its unweighted "
               "parts "
               "(ce: classification, sep: channel separation, div: diverse loss). Middle: training accuracy (on "
               "augmented batches) and validation accuracy when a validation split was set. Right: learning rate "
               "after each epoch's scheduler step (log scale when it spans more than a factor 10).")
        if n_done < n_planned:
            cap += f" The run is still training: {n_done} of {n_planned} epochs so far."
        page.figure("curves.png", cap, _metrics_table(metrics))
    else:
        page.note("No epoch has finished yet: metrics.jsonl is empty, so there are no curves.")

    # -- per test set
    page.heading(2, "Test sets", "tests")
    if results is None:
        page.note("Not evaluated: this run has no results.json. Evaluate it with "
                  f"`maskfer eval --run {run} --test DS1,DS2` (or train with --test), then make the report again.")
    elif not results.get("tests"):
        page.note("Not evaluated: results.json lists no test sets.")
    else:
        page.raw(_overview_table(results))
        for name, m in results["tests"].items():
            s = slug(name)
            page.heading(3, f"{name}", f"test-{s}")
            confusion_figure(name, m, out / f"confusion_{s}.png")
            absent = m.get("absent_classes") or []
            page.figure(
                f"confusion_{s}.png",
                f"Confusion matrix on {name} ({m.get('n', sum(m['support'].values()))} images). Rows: true class, "
                "columns: predicted class. Colour: each row normalised to sum to 1 (the fraction of the true class "
                "predicted as each class); numbers: image counts."
                + (f" Absent from this test set: {', '.join(absent)} (grey rows)." if absent else ""),
                _test_table(name, m))
            per_class_figure(name, m, out / f"per_class_{s}.png")
            page.figure(
                f"per_class_{s}.png",
                f"Per-class accuracy (recall, %) on {name}; dashed line: mean class accuracy "
                f"{pct(m['mean_class_accuracy'])}% (the mean over the classes present). "
                + ("Classes absent from the test set are marked 'absent' (hatched, no accuracy), not 0." if absent else
                   "Every class is present in this test set."))

    # -- t-SNE
    page.heading(2, "t-SNE of the features on an unseen test set", "tsne")
    if tsne:
        _tsne_section(page, run, out, stored, cfg, results, baseline=baseline, test=test, max_points=max_points,
                      device=device, cache=cache, log=log)
    else:
        page.note("t-SNE skipped (tsne=False).")
    return page


def _fmt_cfg(v) -> str:
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "–"
    return "–" if v is None else fmt_num(v)


def _metrics_table(metrics: list[dict]) -> str:
    cols = [("train_loss", "loss", "f"), ("train_ce", "ce", "f"), ("train_sep", "sep", "f"), ("train_div", "div", "f"),
            ("train_acc", "train acc %", "p"), ("val_acc", "val acc %", "p"), ("lr", "lr", "g"),
            ("images_per_s", "img/s", "i")]
    cols = [c for c in cols if any(c[0] in r for r in metrics)]

    def cell(r, key, f):
        v = r.get(key)
        if v is None:
            return "–"
        return {"f": f"{v:.4f}", "p": pct(v), "g": f"{v:.3g}", "i": f"{v:.0f}"}[f]

    rows = [[str(int(r.get("epoch", i)) + 1)] + [cell(r, k, f) for k, _, f in cols] for i, r in enumerate(metrics)]
    return '<div class="scroll">' + _table(["epoch"] + [c[1] for c in cols], rows, "metrics-table") + "</div>"


def _probe_table(row: dict) -> str:
    """The L2 strengths a linear probe tried (its metrics row's probe_curve), in the order tried."""
    head = ["L2 strength", "val acc %", "val loss", "train acc %", "L-BFGS iterations", "converged"]
    rows = [[("★ " if p.get("lam") == row.get("probe_lambda") else "") + fmt_num(p.get("lam")), pct(p.get("val_acc")),
             "–" if p.get("val_loss") is None else f"{p['val_loss']:.4f}", pct(p.get("train_acc")),
             str(p.get("iterations", "–")), fmt_num(p.get("converged"))] for p in row.get("probe_curve") or []]
    rows.append(["refit " + fmt_num(row.get("probe_lambda")), "–", "–", pct(row.get("train_acc")),
                 str(row.get("probe_iterations", "–")), fmt_num(row.get("probe_converged"))])
    return '<div class="scroll">' + _table(head, rows, "probe-curve") + "</div>"


def _overview_table(results: dict) -> str:
    rows = []
    for name, m in results["tests"].items():
        rows.append([name, str(m.get("n", sum(m["support"].values()))), pct(m["accuracy"]),
                     pct(m["mean_class_accuracy"]), ", ".join(m.get("absent_classes") or []) or "–"])
    return _table(["test set", "images", "accuracy %", "mean class accuracy %", "absent classes"], rows,
                  "tests-overview")


def _test_table(name: str, m: dict) -> str:
    cm = np.asarray(m["confusion"])
    rows = []
    for i, c in enumerate(CLASSES):
        acc = m["per_class_accuracy"].get(c)
        sup = int(m["support"].get(c, 0))
        rows.append([c, str(sup), str(int(cm[i, i])) if sup else "–",
                     pct(acc) if acc is not None else '<span class="absent">absent</span>'])
    rows = [[_esc(r[0]), r[1], r[2], r[3]] for r in rows]
    head = _kv_table([("accuracy %", pct(m["accuracy"])), ("mean class accuracy %", pct(m["mean_class_accuracy"])),
                      ("images", str(m.get("n", int(cm.sum()))))], f"summary-{slug(name)}")
    return head + _table(["class", "support", "correct", "accuracy %"], rows, f"per-class-{slug(name)}",
                         raw_cells=True)


# ---------------------------------------------------------------------------- run figures


# ---------------------------------------------------------------------------- t-SNE
def _dataset(spec: str) -> str:
    return spec.partition(":")[0]


def pick_tsne_test(train: str, results: dict | None, cfg_tests: list[str], test: str | None) -> str | None:
    """The explicit test, else the first test set (results.json, then config) not from the training dataset."""
    if test:
        return test
    candidates = list((results or {}).get("tests", {})) + list(cfg_tests or [])
    return next((t for t in candidates if _dataset(t) != _dataset(train)), None)


def _representation(cfg) -> str:
    return {"cafe": "masked features sigmoid(M)·F" if cfg.sigmoid else "masked features M·F (no-sigmoid ablation)",
            "baseline": "backbone's global-average-pooled features (before its classifier)",
            "linear-probe": "raw cached features F (a linear probe has no mask)",
            "linear-head": "raw cached features F (a linear head has no mask)"}[cfg.method]


def embed(model, cfg, data, device, batch_size: int = 128) -> np.ndarray:
    """The representation a run classifies: CAFE's masked feature, a baseline's pooled backbone feature,
    or (linear probe) the cached feature itself; original view, no augmentation."""
    import torch

    from maskfer.augment import prepare_images

    out = []
    model.eval()
    with torch.no_grad():
        for s in range(0, len(data), batch_size):
            pos = torch.arange(s, min(s + batch_size, len(data)))
            feats = data.feats[pos, 0].to(device)
            if cfg.method in ("linear-probe", "linear-head"):
                out.append(feats.float().cpu())
                continue
            x = prepare_images(data.bank.get(data.rows[pos.numpy()]).to(device), cfg.image_size)
            if cfg.method == "baseline":
                out.append(model.backbone(x).float().cpu())
            else:
                out.append(model(x, feats)["masked"].float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def subsample(n: int, max_points: int, seed: int = TSNE_SEED) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def _subset(data, idx: np.ndarray):
    import torch

    t = torch.as_tensor(idx, dtype=torch.long)
    return dataclasses.replace(data, rows=data.rows[idx], ids=data.ids[idx], labels=data.labels[t], feats=data.feats[t])


def tsne_perplexity(n: int) -> float:
    return float(min(30.0, max(2.0, (n - 1) / 3)))


def tsne_2d(x: np.ndarray) -> np.ndarray:
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, perplexity=tsne_perplexity(len(x)), init="pca", learning_rate="auto",
                random_state=TSNE_SEED).fit_transform(np.asarray(x, dtype=np.float64))


def _silhouette(x: np.ndarray, y: np.ndarray):
    from sklearn.metrics import silhouette_score

    k = len(np.unique(y))
    if k < 2 or k >= len(y):
        return None
    return float(silhouette_score(np.asarray(x, dtype=np.float64), y))


def _tsne_section(page: Page, run: Path, out: Path, stored: dict, cfg_dict: dict, results, *, baseline, test,
                  max_points, device, cache, log) -> None:
    from featcache import StoreError
    from maskfer.config import TrainConfig
    from maskfer.data import DataError, load_split
    from maskfer.evaluate import EvalError, load_run
    from maskfer.train import resolve_device, uses_images

    cfg = TrainConfig.from_dict(cfg_dict)
    spec = pick_tsne_test(cfg.train, results, cfg.test, test)
    if spec is None:
        page.note(f"No t-SNE: this run has no test set outside its training dataset {_dataset(cfg.train)!r} "
                  "(results.json and config). Pass one with --test DATASET[:SPLIT].")
        return
    if not (run / rundir.LAST).exists():
        page.note("No t-SNE: the run has no checkpoint yet (no epoch finished).")
        return
    store = cache or cfg.cache
    try:
        dev = resolve_device(device)
        model, cfg, stored = load_run(run, dev)
        data, _ = load_split(store, spec, "test", stored["encoder"]["key"], uses_images(cfg), cfg.image_size,
                             cfg.root, cfg.workers)
        n_total = len(data)
        idx = subsample(n_total, max_points)
        data = _subset(data, idx)
        left = embed(model, cfg, data, dev)
        if baseline is not None:
            bmodel, bcfg, _ = load_run(baseline, dev)
            bdata, _ = load_split(store, spec, "test", stored["encoder"]["key"], uses_images(bcfg), bcfg.image_size,
                                  bcfg.root, bcfg.workers)
            bdata = _subset(bdata, idx)
            if list(bdata.ids) != list(data.ids):
                raise ReportError(f"the baseline's images of {spec} differ from the run's")
            right = embed(bmodel, bcfg, bdata, dev)
            right_name = f"baseline run {baseline.resolve().name} ({bcfg.method}): {_representation(bcfg)}"
            if bcfg.method != "baseline":
                log(f"report: note: --baseline {baseline} is a {bcfg.method!r} run, not a baseline run")
        else:
            right = data.feats[:, 0].numpy()
            right_name = f"raw cached features F ({stored['encoder']['key']}), no mask"
    except (StoreError, DataError, EvalError, ReportError, OSError) as e:
        page.note(f"No t-SNE: could not read {spec} from {store}: {e}")
        log(f"report: warning: t-SNE skipped: {e}")
        return
    y = data.labels.numpy()
    if len(y) < MIN_TSNE_POINTS:
        page.note(f"No t-SNE: {spec} has only {len(y)} images (at least {MIN_TSNE_POINTS} needed).")
        return
    log(f"report: t-SNE of {len(y)} points of {data.name} (two embeddings)")
    left_2d, right_2d = tsne_2d(left), tsne_2d(right)
    left_name = f"this run ({cfg.method}): {_representation(cfg)}"
    s = slug(data.name)
    file = f"tsne_{s}.png"
    tsne_figure(left_2d, right_2d, y, left_name, right_name, data.name, out / file)
    sil = [_silhouette(left, y), _silhouette(right, y)]
    counts = np.bincount(y, minlength=len(CLASSES))
    side = _table(["", "silhouette (by true class)"],
                  [[left_name, "–" if sil[0] is None else f"{sil[0]:.3f}"],
                   [right_name, "–" if sil[1] is None else f"{sil[1]:.3f}"]], f"tsne-silhouette-{s}")
    side += _table(["class", "points"], [[c, str(int(n))] for c, n in zip(CLASSES, counts)], f"tsne-counts-{s}")
    unseen = _dataset(data.name) != _dataset(cfg.train)
    sub = (f"a random subsample of {len(y)} of its {n_total} images (seed {TSNE_SEED}, max_points {max_points})"
           if len(y) < n_total else f"all {len(y)} images")
    second = (right_name if baseline is not None else
              "the raw cached CLIP features F of the same images (no baseline run was given; pass --baseline RUN "
              "to compare with a baseline model's features)")
    page.figure(file,
                f"t-SNE (scikit-learn, perplexity {tsne_perplexity(len(y)):.3g}, PCA init, "
                f"random_state {TSNE_SEED}) on {data.name}, "
                + ("a test set from a dataset the run was not trained on" if unseen else
                   "a test set of the TRAINING dataset (chosen explicitly; not unseen)")
                + f", {sub}, original view. Left: {left_name}. Right: {second}. Colour: true class. The two panels "
                "are separate embeddings: compare how well each separates the classes, not positions. The table gives "
                "each representation's silhouette score by true class in its original space (higher: tighter, "
                "better separated classes).",
                side)


# ---------------------------------------------------------------------------- sweep report
def load_summary(sweep: Path) -> tuple[dict, bool]:
    """(summary, derived): summary.json, or (sweep still running) the same rows derived from the run dirs."""
    if (sweep / "summary.json").exists():
        return rundir.read_json(sweep / "summary.json"), False
    if not (sweep / "sweep.json").exists():
        raise ReportError(f"{sweep}: neither summary.json nor sweep.json")
    from maskfer.sweep import point_id

    grid = _grid_in_run_order(sweep, rundir.read_json(sweep / "sweep.json").get("grid", {}))
    axes = [a for a in grid if a != "seed"]
    by_conf: dict[str, dict] = {}
    for combo in itertools.product(*grid.values()):
        point = dict(zip(grid, combo))
        run = sweep / "runs" / point_id(point)
        conf = {a: point[a] for a in axes}
        entry = by_conf.setdefault(json.dumps(conf, sort_keys=True),
                                   {"config": conf, "runs": [], "val": [], "tests": {}})
        entry["runs"].append(f"runs/{point_id(point)}")
        metrics = rundir.read_metrics(run)
        if metrics and "val_acc" in metrics[-1]:
            entry["val"].append(metrics[-1]["val_acc"])
        if (run / rundir.RESULTS).exists():
            for t, m in rundir.read_json(run / rundir.RESULTS)["tests"].items():
                entry["tests"].setdefault(t, []).append(m["accuracy"])

    def mean(v):
        return float(np.mean(v)) if v else None

    def std(v):
        return float(np.std(v, ddof=1)) if len(v) > 1 else (0.0 if v else None)

    rows = [{"config": e["config"], "runs": e["runs"], "n_seeds": len(e["runs"]), "val_mean": mean(e["val"]),
             "val_std": std(e["val"]),
             "tests": {t: {"mean": mean(v), "std": std(v), "n": len(v)} for t, v in e["tests"].items()}}
            for e in by_conf.values()]
    complete = [r for r in rows if r["val_mean"] is not None]
    best = max(complete, key=lambda r: r["val_mean"]) if complete else None
    for r in rows:
        r["selected"] = r is best
    return {"axes": axes, "grid": grid, "selection": "highest mean validation accuracy over seeds", "rows": rows}, True


def _grid_in_run_order(sweep: Path, grid: dict) -> dict:
    """sweep.json stores the grid with sorted keys, but run directories are named in the CLI's axis order:
    take the axis order whose point ids name the most existing run directories."""
    from maskfer.sweep import point_id

    if len(grid) > 6:
        return grid

    def found(order):
        return sum((sweep / "runs" / point_id({a: v for a, v in zip(order, combo)})).is_dir()
                   for combo in itertools.product(*(grid[a] for a in order)))

    best = max(itertools.permutations(grid), key=found)  # ties keep the first (stored) order
    return {a: grid[a] for a in best}


def _grid_order(summary: dict) -> list[str]:
    """Grid axes in the sweep's own order (summary.json stores the grid with sorted keys; 'axes' keeps the order)."""
    axes = [a for a in summary.get("axes", []) if a in summary["grid"]]
    return axes + [a for a in summary["grid"] if a not in axes]


def _axis_label(a: str) -> str:
    return {"lam": "λ (lambda)", "beta": "β (beta)"}.get(a, a)


def heatmap_cells(summary: dict, base: dict) -> dict | None:
    """The λ × β grid: per cell, the row (configuration) with the best mean validation accuracy.

    Returns {"lams", "betas", "best": {(i, j): row}, "others": [other axes]} or None when the sweep
    varies neither lam nor beta. An axis that is not varied takes its base value (one row/column).
    """
    axes = summary.get("axes", [])
    if "lam" not in axes and "beta" not in axes:
        return None

    def values(a):
        if a in axes:
            seen = {float(r["config"][a]) for r in summary["rows"]}
            return sorted(seen | {float(v) for v in summary["grid"].get(a, [])})
        return [float(base.get(a, {"lam": 1.5, "beta": 5.0}[a]))]

    lams, betas = values("lam"), values("beta")
    best: dict[tuple[int, int], dict] = {}
    for r in summary["rows"]:
        lam = float(r["config"].get("lam", lams[0]))
        beta = float(r["config"].get("beta", betas[0]))
        key = (lams.index(lam), betas.index(beta))
        cur = best.get(key)
        if r["val_mean"] is None:
            if cur is None:
                best[key] = r  # a cell with nothing evaluated yet keeps a row (shown as '–')
            continue
        if cur is None or cur["val_mean"] is None or r["val_mean"] > cur["val_mean"]:
            best[key] = r
    others = [a for a in axes if a not in ("lam", "beta")]
    return {"lams": lams, "betas": betas, "best": best, "others": others}


def sweep_page(sweep: Path, out: Path, *, baseline=None, test=None, max_points=2000, device="cpu", cache=None,
               tsne=True, log=print) -> Page:
    summary, derived = load_summary(sweep)
    record = rundir.read_json(sweep / "sweep.json") if (sweep / "sweep.json").exists() else {}
    base = record.get("base", {})
    page = Page(f"CAFE report: sweep {sweep.resolve().name}")
    tests = test_columns(summary)

    page.heading(2, "Sweep", "config")
    n_runs = sum(len(r["runs"]) for r in summary["rows"])
    pairs = [("sweep directory", str(sweep)), ("configurations", f"{len(summary['rows'])} ({n_runs} runs)"),
             ("grid", "; ".join(f"{_axis_label(a)} = {', '.join(map(fmt_num, summary['grid'][a]))}"
                               for a in _grid_order(summary))),
             ("selection", summary.get("selection", "") + " (validation split only; test sets never select)")]
    pairs += [(label, _fmt_cfg(base.get(k))) for k, label in CONFIG_SUMMARY if k in base and k not in summary["grid"]]
    page.raw(_kv_table(pairs, "sweep-config", per_row=3))
    if derived:
        page.note("summary.json is not written yet (the sweep is still running or was stopped): the numbers below "
                  "come from the run directories finished so far.")

    # -- heat-maps
    page.heading(2, "λ × β heat-maps", "heatmaps")
    cells = heatmap_cells(summary, base)
    sel = next((r for r in summary["rows"] if r.get("selected")), None)
    if cells is None:
        page.note(f"This sweep does not vary lam or beta (its axes: {', '.join(summary.get('axes') or ['seed only'])}),"
                  " so there is no λ × β heat-map.")
    else:
        if cells["others"]:
            marg = (f"Other axes ({', '.join(cells['others'])}) are marginalised by taking, for each cell, the "
                    "configuration with the best mean validation accuracy; the test heat-maps show that same "
                    "configuration's test accuracy (so test sets never choose anything).")
        else:
            marg = "Each cell is one configuration (no other axes besides the seed)."
        seeds = sorted({r["n_seeds"] for r in summary["rows"]})
        seed_txt = f"mean over {'/'.join(map(str, seeds))} seed(s)"
        panels = [("val", "validation", lambda r: (r["val_mean"], r["val_std"]))]

        def test_value(t):
            return lambda r: (r["tests"].get(t, {}).get("mean"), r["tests"].get(t, {}).get("std"))

        panels += [(t, t, test_value(t)) for t in tests]
        for key, title, get in panels:
            name = "val" if key == "val" else f"test_{slug(key)}"  # a test set named "val" cannot collide
            file = f"heatmap_{name}.png"
            grid_vals = heatmap_figure(cells, get, sel, f"{title} accuracy (%)", out / file)
            cap = (f"Mean {title} accuracy (%, {seed_txt}; small numbers: std) for each (λ, β) pair"
                   + (", on the validation split of the training dataset." if key == "val" else
                      f", on the test set {title}.")
                   + f" {marg} The selected configuration (best mean validation accuracy) is framed in red.")
            page.figure(file, cap, _heatmap_table(cells, grid_vals, sel, f"heatmap-{name}"))

    # -- summary table
    page.heading(2, "All configurations", "summary")
    page.raw(_summary_table(summary, tests))
    page.para("Accuracy %, mean ± std over seeds. Selection: " + _esc(summary.get("selection", ""))
              + ", on the validation split of the training dataset only.", raw=True)

    # -- the selected run
    page.heading(2, "The selected configuration's run", "selected")
    if sel is None:
        page.note("No configuration is selected yet (no run has a validation accuracy).")
        return page
    run = sweep / sel["runs"][0]
    if not (run / rundir.CONFIG).exists():
        page.note(f"The selected run {run} has no config.json.")
        return page
    sub = out / SELECTED_DIR
    sub.mkdir(parents=True, exist_ok=True)
    conf = ", ".join(f"{_axis_label(a)} = {fmt_num(sel['config'][a])}"
                     for a in summary.get("axes", []) if a in sel["config"])
    page.para(f"Selected configuration: {_esc(conf)}. Figures of its run <code>{_esc(sel['runs'][0])}</code>"
              + (" (the first of its seeds)" if len(sel["runs"]) > 1 else "")
              + f', also as a page of its own: <a href="{SELECTED_DIR}/{INDEX}">{SELECTED_DIR}/{INDEX}</a>.', raw=True)
    run_pg = run_page(run, sub, baseline=baseline, test=test, max_points=max_points, device=device, cache=cache,
                      tsne=tsne, log=log)
    rundir.atomic_write_text(sub / INDEX, run_pg.html())
    page.embed(run_pg, SELECTED_DIR + "/", shift=1)
    return page


def _heatmap_table(cells: dict, vals: np.ndarray, sel, table_id: str) -> str:
    lams, betas, best = cells["lams"], cells["betas"], cells["best"]
    rows = []
    for i, lam in enumerate(lams):
        row = [f"λ = {fmt_num(lam)}"]
        for j in range(len(betas)):
            r = best.get((i, j))
            txt = "–" if not np.isfinite(vals[i, j]) else f"{vals[i, j]:.2f}"
            if r is not None and sel is not None and r.get("config") == sel.get("config"):
                txt = f"<b>{txt} ★</b>"
            if r is not None and cells["others"]:
                title = ", ".join(f"{a} = {fmt_num(r['config'].get(a))}" for a in cells["others"])
                txt = f'<span title="{_esc(title)}">{txt}</span>'
            row.append(txt)
        rows.append([_esc(row[0])] + row[1:])
    return _table([""] + [f"β = {fmt_num(b)}" for b in betas], rows, table_id, raw_cells=True) + (
        '<p class="meta">★ selected; hover a cell for the other axes of its best configuration.</p>'
        if cells["others"] else '<p class="meta">★ selected configuration.</p>')


def _summary_table(summary: dict, tests: list[str]) -> str:
    axes = summary.get("axes", [])
    header = ["", *[_axis_label(a) for a in axes], "seeds", "val % (select)", *[f"{t} %" for t in tests]]
    rows = []
    for r in summary["rows"]:
        cells = ["★ selected" if r.get("selected") else "", *[fmt_num(r["config"].get(a)) for a in axes],
                 str(r["n_seeds"]), pct_pm(r["val_mean"], r["val_std"])]
        cells += [pct_pm(r["tests"].get(t, {}).get("mean"), r["tests"].get(t, {}).get("std")) for t in tests]
        rows.append({"cells": cells, "class": "selected" if r.get("selected") else ""})
    return _table(header, rows, "summary-table")
