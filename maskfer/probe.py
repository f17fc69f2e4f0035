"""The linear probe worth beating: CLIP's protocol on the cached features.

Features are standardized with training-set statistics; a multinomial logistic regression is
fit by full-batch L-BFGS to convergence; the L2 strength is chosen by accuracy on validation
data of the training dataset (its val split, or a stratified holdout of its train split) and
the probe is then refit on all training rows with that strength. The standardization is folded
into the final weights, so the result is an ordinary ``nn.Linear`` on raw features: evaluation
and prediction need nothing new.

Both stored views of a training image (original and flip) are training rows: the flip is free
in the cache and is the only augmentation the features have. Validation uses the original view,
as evaluation does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from maskfer.model import feature_stats

# L2 strengths tried (on the mean cross-entropy: loss = CE + lam/2 * ||W||^2); CLIP sweeps 1e-6..1e6
# on its C = 1/lam; beyond 1e2 every probe here predicts the majority class.
LAMBDAS = tuple(10.0 ** e for e in range(-6, 3))
REFINE = (0.5, 0.25)  # after the decade grid: the best strength times 10^(+-1/2), then 10^(+-1/4)
MAX_ITER = 1000
GRAD_TOL = 1e-4  # max |gradient| at which L-BFGS counts as converged (float32 reaches it reliably)


@dataclass
class ProbeFit:
    weight: torch.Tensor              # (L, C) on raw features
    bias: torch.Tensor                # (L,)
    lam: float                        # chosen L2 strength
    train_acc: float                  # on the training rows it was refit on (both views)
    train_loss: float                 # their mean cross-entropy (without the L2 term)
    iterations: int
    converged: bool
    val_acc: float | None = None      # of the chosen strength, on the selection data
    curve: list[dict] = field(default_factory=list)  # every strength tried: lam, val_acc, val_loss, train_acc, iterations


def fit_logreg(z: torch.Tensor, y: torch.Tensor, lam: float, num_classes: int,
               init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Full-batch L-BFGS on standardized rows ``z`` (N, C): returns (W (L, C), b (L,), iterations, converged)."""
    w = torch.zeros(num_classes, z.shape[1], dtype=z.dtype) if init is None else init[0].clone()
    b = torch.zeros(num_classes, dtype=z.dtype) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=MAX_ITER, max_eval=2 * MAX_ITER, tolerance_grad=GRAD_TOL,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y) + 0.5 * lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(objective)
    objective()
    grad = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
    iters = int(opt.state[opt._params[0]].get("n_iter", 0))
    return w.detach(), b.detach(), iters, grad <= GRAD_TOL * 10


def _accuracy(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    return float(((z @ w.T + b).argmax(1) == y).double().mean()) if len(y) else float("nan")


def train_rows(feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, V, C) cached views -> (n*V, C) rows and their labels."""
    n, v, c = feats.shape
    return feats.reshape(n * v, c), labels.repeat_interleave(v)


def fit_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, select_feats: torch.Tensor,
              select_labels: torch.Tensor, refit_feats: torch.Tensor | None = None,
              refit_labels: torch.Tensor | None = None, num_classes: int = 7,
              lambdas: tuple[float, ...] = LAMBDAS, refine: tuple[float, ...] = REFINE, log=None) -> ProbeFit:
    """Choose lam on (select_feats (m, C), select_labels) for a probe fit on ``train_feats`` (n, V, C), then
    refit on ``refit_feats`` (default: the same training rows) with it.

    The choice: highest validation accuracy, ties broken by the lower validation cross-entropy, over
    the decade grid ``lambdas`` refined around its best by half and quarter decades.

    Computation is float32 on the CPU (statistics in float64): float64 costs three times as much for
    the same choice of strength, and the gradient tolerance (GRAD_TOL) is within float32's reach.
    """
    x, y = train_rows(train_feats.float().cpu(), train_labels.cpu())
    mean, std = feature_stats(x)
    z, zs = (x - mean) / std, (select_feats.float().cpu() - mean) / std
    ys = select_labels.cpu()
    curve, fits = [], {}

    def point(lam: float, init) -> dict:
        w, b, iters, conv = fit_logreg(z, y, lam, num_classes, init)
        fits[lam] = (w, b)
        logits = zs @ w.T + b
        p = {"lam": lam, "val_acc": _accuracy(zs, ys, w, b), "val_loss": float(F.cross_entropy(logits, ys)),
             "train_acc": _accuracy(z, y, w, b), "iterations": iters, "converged": conv}
        curve.append(p)
        if log:
            log(f"probe lam {lam:.2g}: val acc {p['val_acc']:.4f} (loss {p['val_loss']:.4f}), train acc "
                f"{p['train_acc']:.4f}, {iters} L-BFGS iterations{'' if conv else ' (not converged)'}")
        return p

    def best() -> dict:
        # accuracy first; a few hundred validation images tie often, and the cross-entropy breaks ties
        return max(curve, key=lambda p: (p["val_acc"], -p["val_loss"]))

    init = None
    for lam in sorted(lambdas, reverse=True):  # strong to weak: each fit warm-starts the next
        point(lam, init)
        init = fits[lam]
    for step in refine:  # then around the best, as CLIP's search does: half and quarter decades
        centre = best()["lam"]
        for lam in (centre * 10 ** step, centre / 10 ** step):
            if lam not in fits:
                point(lam, fits[centre])
    chosen = best()
    if refit_feats is not None:
        x, y = train_rows(refit_feats.float().cpu(), refit_labels.cpu())
        mean, std = feature_stats(x)
        z = (x - mean) / std
    w, b, iters, conv = fit_logreg(z, y, chosen["lam"], num_classes)
    train_acc = _accuracy(z, y, w, b)
    train_loss = float(F.cross_entropy(z @ w.T + b, y))
    # Fold the standardization in: W z + b = (W / std) x + (b - (W / std) mean).
    w_raw = w / std
    b_raw = b - w_raw @ mean
    return ProbeFit(weight=w_raw.float(), bias=b_raw.float(), lam=chosen["lam"], train_acc=train_acc, train_loss=train_loss,
                    iterations=iters, converged=conv, val_acc=chosen["val_acc"], curve=curve)
