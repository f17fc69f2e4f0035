"""A run's page: configuration and status, training curves, per test set a confusion matrix and per-class
accuracy, and the t-SNE section."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from featcache.taxonomy import CLASSES
from maskfer.figures import confusion_figure, fmt_num, pct, per_class_figure, training_curves
from maskfer.report.collect import RunFiles, read_run
from maskfer.report.page import CONFIG_LABELS, Page, esc, fmt_cfg, kv_table, slug, table
from maskfer.report.tsne_section import tsne_section


def run_page(run: Path, out: Path, *, baseline=None, test=None, max_points=2000, device="cpu", cache=None,
             tsne=True, log=print) -> Page:
    """Figures of one run into ``out``; returns the page (image paths relative to ``out``)."""
    rf = read_run(run)
    page = Page(f"CAFE report: run {run.resolve().name}")
    _config_section(page, rf)
    _curves_section(page, rf, out)
    _tests_section(page, rf, out)
    page.heading(2, "t-SNE of the features on an unseen test set", "tsne")
    if tsne:
        tsne_section(page, run, out, rf.config, rf.results, baseline=baseline, test=test, max_points=max_points,
                     device=device, cache=cache, log=log)
    else:
        page.note("t-SNE skipped (tsne=False).")
    return page


def run_status(rf: RunFiles) -> str:
    n_done, n_planned, probe, fit = rf.epochs_done, rf.epochs_planned, rf.probe, rf.fit_row
    if fit is not None and fit.get("solver") == "zero-shot":
        return ("finished: CLIP zero-shot from the class prompts (nothing trained), logit scale "
                f"{fmt_num(fit.get('logit_scale'))}")
    if probe is not None:
        return (f"finished: linear probe fit by L-BFGS, L2 {fmt_num(probe.get('probe_lambda'))} chosen on "
                f"{probe.get('selected_on')}" + ("" if probe.get("probe_converged") else " (NOT converged)"))
    if not rf.metrics:
        return f"not started: no epoch finished yet (0 of {n_planned})"
    if n_done < n_planned:
        return f"training: {n_done} of {n_planned} epochs finished (curves so far)"
    return f"finished: {n_done} of {n_planned} epochs"


# ---------------------------------------------------------------------------- sections
def _config_section(page: Page, rf: RunFiles) -> None:
    page.heading(2, "Run and configuration", "config")
    stored, cfg, results = rf.stored, rf.config, rf.results
    enc = stored.get("encoder") or {}
    pairs = [("run directory", str(rf.path)), ("status", run_status(rf)),
             ("evaluated", f"yes, after epoch {results.get('epochs_trained')}" if results else "not evaluated")]
    pairs += [(label, fmt_cfg(cfg.get(k))) for k, label in CONFIG_LABELS if k in cfg]
    pairs += [("encoder", f"{enc.get('key')} (dim {stored.get('feat_dim')}, fingerprint {enc.get('fingerprint')})"),
              ("config hash", stored.get("config_hash", "–"))]
    page.raw(kv_table(pairs, "config-table", per_row=3))
    page.raw("<details><summary>full config.json</summary><pre>"
             + esc(json.dumps(stored, indent=2, sort_keys=True)) + "</pre></details>")
    if results and rf.metrics and int(results.get("epochs_trained", rf.epochs_done)) != rf.epochs_done:
        page.note(f"results.json was written after epoch {results.get('epochs_trained')}, but metrics.jsonl now has "
                  f"{rf.epochs_done} epochs: run `maskfer eval` again for current numbers.")


def _curves_section(page: Page, rf: RunFiles, out: Path) -> None:
    page.heading(2, "Training curves", "curves")
    probe, cfg = rf.probe, rf.config
    if probe is not None:
        page.para("A converged linear probe has no training curve: one full-batch L-BFGS solve per L2 strength "
                  f"(maskfer.probe), chosen by accuracy on {probe.get('selected_on')} (★), then refit with it. "
                  "--epochs and the optimizer options do not apply.")
        page.raw(_probe_table(probe))
    elif rf.fit_row is not None and rf.fit_row.get("solver") == "zero-shot":
        row = rf.fit_row
        page.para("CLIP zero-shot has no training curve: each class is the mean of its prompts' L2-normalised text "
                  f"embeddings (the text tower of {row.get('text_tower')}), renormalised; an image goes to the class "
                  f"of highest cosine. Prompts from {row.get('prompts_file')} (sha256 "
                  f"{str(row.get('prompts_sha256'))[:12]}...). --epochs and the optimizer options do not apply.")
        page.raw('<div class="scroll">' + table(["class", "prompts"], [[c, "; ".join(ps)] for c, ps in
                                                                        zip(CLASSES, row.get("prompts") or [])],
                                                "prompt-table") + "</div>")
    elif rf.metrics:
        training_curves(rf.metrics, cfg, out / "curves.png")
        cap = ("Training curves from metrics.jsonl, one point per finished epoch. Left: training loss, the total "
               f"CE + λ·sep + β·div (λ = {fmt_num(cfg.get('lam'))}, β = {fmt_num(cfg.get('beta'))}) and its "
               "unweighted parts "
               "(ce: classification, sep: channel separation, div: diverse loss). Middle: training accuracy (on "
               "augmented batches) and validation accuracy when a validation split was set. Right: learning rate "
               "after each epoch's scheduler step (log scale when it spans more than a factor 10).")
        if rf.epochs_done < rf.epochs_planned:
            cap += f" The run is still training: {rf.epochs_done} of {rf.epochs_planned} epochs so far."
        page.figure("curves.png", cap, _metrics_table(rf.metrics))
    else:
        page.note("No epoch has finished yet: metrics.jsonl is empty, so there are no curves.")


def _tests_section(page: Page, rf: RunFiles, out: Path) -> None:
    page.heading(2, "Test sets", "tests")
    results = rf.results
    if results is None:
        page.note("Not evaluated: this run has no results.json. Evaluate it with "
                  f"`maskfer eval --run {rf.path} --test DS1,DS2` (or train with --test), then make the report again.")
        return
    if not results.get("tests"):
        page.note("Not evaluated: results.json lists no test sets.")
        return
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


# ---------------------------------------------------------------------------- tables
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
    return '<div class="scroll">' + table(["epoch"] + [c[1] for c in cols], rows, "metrics-table") + "</div>"


def _probe_table(row: dict) -> str:
    """The L2 strengths a linear probe tried (its metrics row's probe_curve), in the order tried."""
    head = ["L2 strength", "val acc %", "val loss", "train acc %", "L-BFGS iterations", "converged"]
    rows = [[("★ " if p.get("lam") == row.get("probe_lambda") else "") + fmt_num(p.get("lam")), pct(p.get("val_acc")),
             "–" if p.get("val_loss") is None else f"{p['val_loss']:.4f}", pct(p.get("train_acc")),
             str(p.get("iterations", "–")), fmt_num(p.get("converged"))] for p in row.get("probe_curve") or []]
    rows.append(["refit " + fmt_num(row.get("probe_lambda")), "–", "–", pct(row.get("train_acc")),
                 str(row.get("probe_iterations", "–")), fmt_num(row.get("probe_converged"))])
    return '<div class="scroll">' + table(head, rows, "probe-curve") + "</div>"


def _overview_table(results: dict) -> str:
    rows = []
    for name, m in results["tests"].items():
        rows.append([name, str(m.get("n", sum(m["support"].values()))), pct(m["accuracy"]),
                     pct(m["mean_class_accuracy"]), ", ".join(m.get("absent_classes") or []) or "–"])
    return table(["test set", "images", "accuracy %", "mean class accuracy %", "absent classes"], rows,
                 "tests-overview")


def _test_table(name: str, m: dict) -> str:
    cm = np.asarray(m["confusion"])
    rows = []
    for i, c in enumerate(CLASSES):
        acc = m["per_class_accuracy"].get(c)
        sup = int(m["support"].get(c, 0))
        rows.append([c, str(sup), str(int(cm[i, i])) if sup else "–",
                     pct(acc) if acc is not None else '<span class="absent">absent</span>'])
    rows = [[esc(r[0]), r[1], r[2], r[3]] for r in rows]
    head = kv_table([("accuracy %", pct(m["accuracy"])), ("mean class accuracy %", pct(m["mean_class_accuracy"])),
                     ("images", str(m.get("n", int(cm.sum()))))], f"summary-{slug(name)}")
    return head + table(["class", "support", "correct", "accuracy %"], rows, f"per-class-{slug(name)}",
                        raw_cells=True)
