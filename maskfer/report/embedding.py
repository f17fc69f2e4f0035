"""The features a report's t-SNE shows, and their 2-D embedding.

The representation a run classifies comes from the one prediction loop,
:func:`maskfer.evaluate.predict_logits` (original view, evaluation preprocessing), by architecture
(``cfg.method_spec.architecture``): a mask model's output "masked", an end-to-end model's pooled
backbone vector, and for a linear model the cached feature F itself. scikit-learn (t-SNE, silhouette)
is optional and imported inside the functions that use it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featcache.devices import resolve_device
from maskfer.data import SplitData, load_split
from maskfer.evaluate import load_run, predict_logits
from maskfer.report.errors import ReportError

TSNE_SEED = 0          # subsampling and t-SNE random_state
MIN_TSNE_POINTS = 5


def dataset_of(spec: str) -> str:
    """'domB:test' -> 'domB'."""
    return spec.partition(":")[0]


def pick_tsne_test(train: str, results: dict | None, cfg_tests: list[str], test: str | None) -> str | None:
    """The explicit test, else the first test set (results.json, then config) not from the training dataset."""
    if test:
        return test
    candidates = list((results or {}).get("tests", {})) + list(cfg_tests or [])
    return next((t for t in candidates if dataset_of(t) != dataset_of(train)), None)


def representation(cfg) -> str:
    """What :func:`embed` returns for a run of ``cfg``, as a caption names it."""
    arch = cfg.method_spec.architecture
    if arch == "mask":
        return "masked features sigmoid(M)·F" if cfg.sigmoid else "masked features M·F (no-sigmoid ablation)"
    if arch == "end-to-end":
        return "backbone's global-average-pooled features (before its classifier)"
    if arch == "zero-shot":
        return "L2-normalised cached features F/‖F‖ (what zero-shot compares with the class text embeddings)"
    return f"raw cached features F (a {cfg.method.replace('-', ' ')} has no mask)"


class _PooledBackbone(torch.nn.Module):
    """An end-to-end model's backbone as a model whose output "pooled" is the vector its classifier reads."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor, feats: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {"pooled": self.backbone(images)}


def embed(model, cfg, data: SplitData, device, batch_size: int = 128) -> np.ndarray:
    """The representation a run classifies: CAFE's masked feature, a baseline's pooled backbone feature,
    or (linear probe / head) the cached feature itself; original view, no augmentation."""
    arch = cfg.method_spec.architecture
    if arch == "linear":
        return data.feats[:, 0].float().numpy()
    if arch == "end-to-end":
        model, output = _PooledBackbone(model.backbone), "pooled"
    else:
        output = "masked"
    return predict_logits(model, data, cfg.image_size, device, batch_size, output=output).numpy()


def subsample(n: int, max_points: int, seed: int = TSNE_SEED) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def subset(data: SplitData, idx: np.ndarray) -> SplitData:
    t = torch.as_tensor(idx, dtype=torch.long)
    return dataclasses.replace(data, rows=data.rows[idx], ids=data.ids[idx], labels=data.labels[t], feats=data.feats[t])


@dataclass
class TsneFeatures:
    """The two representations of the same (subsampled) test images that the t-SNE figure compares."""
    name: str                # the test set as loaded ("repB:test")
    n_total: int             # its images before subsampling
    labels: np.ndarray       # (n,) true classes
    left: np.ndarray         # (n, d) this run's representation
    left_name: str
    right: np.ndarray        # (n, d') the baseline run's representation, or the raw cached features F
    right_name: str


def tsne_features(run: Path, spec: str, store: str, *, baseline: Path | None, max_points: int, device: str,
                  log=print) -> TsneFeatures:
    """Load the run (and the baseline run) and compute both representations of ``spec``'s images, subsampled
    to ``max_points`` with a fixed seed. Raises StoreError, DataError, EvalError, ReportError or OSError when
    something cannot be read, DeviceError for a bad ``device``."""
    dev = resolve_device(device)
    model, cfg, stored = load_run(run, dev)
    key = stored["encoder"]["key"]
    data, _ = load_split(store, spec, "test", key, cfg.method_spec.needs_images, cfg.image_size, cfg.root,
                         cfg.workers)
    n_total = len(data)
    idx = subsample(n_total, max_points)
    data = subset(data, idx)
    left = embed(model, cfg, data, dev)
    left_name = f"this run ({cfg.method}): {representation(cfg)}"
    if baseline is not None:
        bmodel, bcfg, _ = load_run(baseline, dev)
        bdata, _ = load_split(store, spec, "test", key, bcfg.method_spec.needs_images, bcfg.image_size, bcfg.root,
                              bcfg.workers)
        bdata = subset(bdata, idx)
        if list(bdata.ids) != list(data.ids):
            raise ReportError(f"the baseline's images of {spec} differ from the run's")
        right = embed(bmodel, bcfg, bdata, dev)
        right_name = f"baseline run {baseline.resolve().name} ({bcfg.method}): {representation(bcfg)}"
        if bcfg.method_spec.needs_features:  # a baseline reads only the images
            log(f"report: note: --baseline {baseline} is a {bcfg.method!r} run, not a baseline run")
    else:
        right = data.feats[:, 0].numpy()
        right_name = f"raw cached features F ({key}), no mask"
    return TsneFeatures(data.name, n_total, data.labels.numpy(), left, left_name, right, right_name)


# ---------------------------------------------------------------------------- t-SNE (scikit-learn)
def tsne_perplexity(n: int) -> float:
    return float(min(30.0, max(2.0, (n - 1) / 3)))


def tsne_2d(x: np.ndarray) -> np.ndarray:
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, perplexity=tsne_perplexity(len(x)), init="pca", learning_rate="auto",
                random_state=TSNE_SEED).fit_transform(np.asarray(x, dtype=np.float64))


def silhouette(x: np.ndarray, y: np.ndarray) -> float | None:
    """Silhouette score by true class in the representation's own space; None with < 2 classes."""
    from sklearn.metrics import silhouette_score

    k = len(np.unique(y))
    if k < 2 or k >= len(y):
        return None
    return float(silhouette_score(np.asarray(x, dtype=np.float64), y))
