"""The t-SNE section of a run's page (the paper's Figure 4): which test set, the figure, its caption, its tables."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache import StoreError
from featcache.taxonomy import CLASSES
from maskfer import rundir
from maskfer.config import TrainConfig
from maskfer.data import DataError
from maskfer.evaluate import EvalError
from maskfer.figures import tsne_figure
from maskfer.report.embedding import (MIN_TSNE_POINTS, TSNE_SEED, dataset_of, pick_tsne_test, silhouette, tsne_2d,
                                      tsne_features, tsne_perplexity)
from maskfer.report.errors import ReportError
from maskfer.report.page import Page, slug, table


def tsne_section(page: Page, run: Path, out: Path, cfg_dict: dict, results: dict | None, *, baseline: Path | None,
                 test: str | None, max_points: int, device: str, cache: str | None, log) -> None:
    """Draw ``tsne_<test>.png`` into ``out`` and add it to ``page``, or a note saying why there is none."""
    cfg = TrainConfig.from_record(cfg_dict)
    spec = pick_tsne_test(cfg.train, results, cfg.test, test)
    if spec is None:
        page.note(f"No t-SNE: this run has no test set outside its training dataset {dataset_of(cfg.train)!r} "
                  "(results.json and config). Pass one with --test DATASET[:SPLIT].")
        return
    if not (run / rundir.LAST).exists():
        page.note("No t-SNE: the run has no checkpoint yet (no epoch finished).")
        return
    store = cache or cfg.cache
    try:
        f = tsne_features(run, spec, store, baseline=baseline, max_points=max_points, device=device, log=log)
    except (StoreError, DataError, EvalError, ReportError, OSError) as e:
        page.note(f"No t-SNE: could not read {spec} from {store}: {e}")
        log(f"report: warning: t-SNE skipped: {e}")
        return
    y = f.labels
    if len(y) < MIN_TSNE_POINTS:
        page.note(f"No t-SNE: {spec} has only {len(y)} images (at least {MIN_TSNE_POINTS} needed).")
        return
    log(f"report: t-SNE of {len(y)} points of {f.name} (two embeddings)")
    left_2d, right_2d = tsne_2d(f.left), tsne_2d(f.right)
    s = slug(f.name)
    file = f"tsne_{s}.png"
    tsne_figure(left_2d, right_2d, y, f.left_name, f.right_name, f.name, out / file)
    sil = [silhouette(f.left, y), silhouette(f.right, y)]
    counts = np.bincount(y, minlength=len(CLASSES))
    side = table(["", "silhouette (by true class)"],
                 [[f.left_name, "–" if sil[0] is None else f"{sil[0]:.3f}"],
                  [f.right_name, "–" if sil[1] is None else f"{sil[1]:.3f}"]], f"tsne-silhouette-{s}")
    side += table(["class", "points"], [[c, str(int(n))] for c, n in zip(CLASSES, counts)], f"tsne-counts-{s}")
    unseen = dataset_of(f.name) != dataset_of(cfg.train)
    sub = (f"a random subsample of {len(y)} of its {f.n_total} images (seed {TSNE_SEED}, max_points {max_points})"
           if len(y) < f.n_total else f"all {len(y)} images")
    second = (f.right_name if baseline is not None else
              "the raw cached CLIP features F of the same images (no baseline run was given; pass --baseline RUN "
              "to compare with a baseline model's features)")
    page.figure(file,
                f"t-SNE (scikit-learn, perplexity {tsne_perplexity(len(y)):.3g}, PCA init, "
                f"random_state {TSNE_SEED}) on {f.name}, "
                + ("a test set from a dataset the run was not trained on" if unseen else
                   "a test set of the TRAINING dataset (chosen explicitly; not unseen)")
                + f", {sub}, original view. Left: {f.left_name}. Right: {second}. Colour: true class. The two "
                "panels are separate embeddings: compare how well each separates the classes, not positions. The "
                "table gives each representation's silhouette score by true class in its original space (higher: "
                "tighter, better separated classes).",
                side)
