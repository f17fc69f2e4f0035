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

The modules: collect (what is read from a run or sweep directory; a sweep's summary comes
from maskfer.sweep), embedding (the t-SNE's features, through maskfer.evaluate.predict_logits),
page (HTML blocks, tables, report.css), run_page, tsne_section and sweep_page (the sections);
the figures are maskfer.figures.

The plotting libraries are an optional extra (``pip install 'cafe-fer[report]'``): they are
imported only inside functions. Figures are drawn on ``matplotlib.figure.Figure`` with the
Agg canvas, never through pyplot, so no global backend state is touched.
"""
from __future__ import annotations

from pathlib import Path

from maskfer.figures import pct
from maskfer.report.collect import check_baseline, detect_kind, load_summary
from maskfer.report.embedding import MIN_TSNE_POINTS, embed
from maskfer.report.errors import INSTALL_HINT, ReportError, require_libraries
from maskfer.report.page import pct_pm
from maskfer.report.run_page import run_page
from maskfer.report.sweep_page import heatmap_cells, sweep_page

__all__ = ["write_report", "ReportError", "INSTALL_HINT", "load_summary", "heatmap_cells", "embed", "pct",
           "pct_pm"]

REPORT_DIR = "report"


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
        check_baseline(baseline)
    require_libraries(tsne)
    out = Path(out) if out else path / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    make_page = run_page if kind == "run" else sweep_page
    page = make_page(path, out, baseline=baseline, test=test, max_points=int(max_points), device=device, cache=cache,
                     tsne=tsne, log=log)
    index = page.write(out)
    log(f"report: {index} ({len(page.images())} figure(s))")
    return index
