"""A sweep's page: its grid, the λ × β heat-maps (the paper's Figure 3), the summary table, and the selected
configuration's run page (embedded, and as ``selected/index.html``)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from maskfer import rundir
from maskfer.figures import fmt_num, heatmap_figure
from maskfer.report.collect import load_summary, sweep_base
from maskfer.report.page import CONFIG_LABELS, INDEX, Page, esc, fmt_cfg, kv_table, pct_pm, slug, table
from maskfer.report.run_page import run_page
from maskfer.sweep import test_columns

SELECTED_DIR = "selected"


def sweep_page(sweep: Path, out: Path, *, baseline=None, test=None, max_points=2000, device="cpu", cache=None,
               tsne=True, log=print) -> Page:
    """Figures of a sweep into ``out`` (the selected run's into ``out/selected``); returns the page."""
    summary, derived = load_summary(sweep)
    base = sweep_base(sweep)
    page = Page(f"CAFE report: sweep {sweep.resolve().name}")
    tests = test_columns(summary)

    page.heading(2, "Sweep", "config")
    n_runs = sum(len(r["runs"]) for r in summary["rows"])
    pairs = [("sweep directory", str(sweep)), ("configurations", f"{len(summary['rows'])} ({n_runs} runs)"),
             ("grid", "; ".join(f"{axis_label(a)} = {', '.join(map(fmt_num, summary['grid'][a]))}"
                               for a in grid_order(summary))),
             ("selection", summary.get("selection", "") + " (validation split only; test sets never select)")]
    pairs += [(label, fmt_cfg(base.get(k))) for k, label in CONFIG_LABELS if k in base and k not in summary["grid"]]
    page.raw(kv_table(pairs, "sweep-config", per_row=3))
    if derived:
        page.note("summary.json is not written yet (the sweep is still running or was stopped): the numbers below "
                  "come from the run directories finished so far.")

    sel = next((r for r in summary["rows"] if r.get("selected")), None)
    _heatmaps_section(page, summary, base, tests, sel, out)

    page.heading(2, "All configurations", "summary")
    page.raw(_summary_table(summary, tests))
    page.para("Accuracy %, mean ± std over seeds. Selection: " + esc(summary.get("selection", ""))
              + ", on the validation split of the training dataset only.", raw=True)

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
    conf = ", ".join(f"{axis_label(a)} = {fmt_num(sel['config'][a])}"
                     for a in summary.get("axes", []) if a in sel["config"])
    page.para(f"Selected configuration: {esc(conf)}. Figures of its run <code>{esc(sel['runs'][0])}</code>"
              + (" (the first of its seeds)" if len(sel["runs"]) > 1 else "")
              + f', also as a page of its own: <a href="{SELECTED_DIR}/{INDEX}">{SELECTED_DIR}/{INDEX}</a>.', raw=True)
    run_pg = run_page(run, sub, baseline=baseline, test=test, max_points=max_points, device=device, cache=cache,
                      tsne=tsne, log=log)
    run_pg.write(sub)
    page.embed(run_pg, SELECTED_DIR + "/", shift=1)
    return page


def grid_order(summary: dict) -> list[str]:
    """Grid axes in the sweep's own order (summary.json stores the grid with sorted keys; 'axes' keeps the order)."""
    axes = [a for a in summary.get("axes", []) if a in summary["grid"]]
    return axes + [a for a in summary["grid"] if a not in axes]


def axis_label(a: str) -> str:
    return {"lam": "λ (lambda)", "beta": "β (beta)"}.get(a, a)


# ---------------------------------------------------------------------------- heat-maps
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


def _heatmaps_section(page: Page, summary: dict, base: dict, tests: list[str], sel: dict | None, out: Path) -> None:
    page.heading(2, "λ × β heat-maps", "heatmaps")
    cells = heatmap_cells(summary, base)
    if cells is None:
        page.note(f"This sweep does not vary lam or beta (its axes: {', '.join(summary.get('axes') or ['seed only'])}),"
                  " so there is no λ × β heat-map.")
        return
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
                txt = f'<span title="{esc(title)}">{txt}</span>'
            row.append(txt)
        rows.append([esc(row[0])] + row[1:])
    return table([""] + [f"β = {fmt_num(b)}" for b in betas], rows, table_id, raw_cells=True) + (
        '<p class="meta">★ selected; hover a cell for the other axes of its best configuration.</p>'
        if cells["others"] else '<p class="meta">★ selected configuration.</p>')


# ---------------------------------------------------------------------------- summary table
def _summary_table(summary: dict, tests: list[str]) -> str:
    axes = summary.get("axes", [])
    header = ["", *[axis_label(a) for a in axes], "seeds", "val % (select)", *[f"{t} %" for t in tests]]
    rows = []
    for r in summary["rows"]:
        cells = ["★ selected" if r.get("selected") else "", *[fmt_num(r["config"].get(a)) for a in axes],
                 str(r["n_seeds"]), pct_pm(r["val_mean"], r["val_std"])]
        cells += [pct_pm(r["tests"].get(t, {}).get("mean"), r["tests"].get(t, {}).get("std")) for t in tests]
        rows.append({"cells": cells, "class": "selected" if r.get("selected") else ""})
    return table(header, rows, "summary-table")
