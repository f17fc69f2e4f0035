"""The figures of `maskfer report` (matplotlib, drawn on Figure objects with the Agg canvas).

Plotting is an optional extra (`pip install 'cafe-fer[report]'`): matplotlib is imported inside
the functions, so importing this module costs nothing. maskfer.report assembles the page.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from featcache.taxonomy import CLASSES

CLASS_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#7f7f7f"]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # the Agg canvas is attached by savefig; pyplot is never used

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100, format="png")
    tmp.replace(path)


def pct(v) -> str:
    """Accuracy in [0, 1] -> '81.25' (percent, 2 decimals); None/NaN -> '–'. The page's number format."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * float(v):.2f}"


def fmt_num(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def training_curves(metrics: list[dict], cfg: dict, path: Path) -> None:
    ep = [int(r.get("epoch", i)) + 1 for i, r in enumerate(metrics)]
    marker = "o" if len(ep) <= 30 else None
    fig = _figure(13, 3.6)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    for key, label, style, mk in (("train_loss", "total", "-", "o"), ("train_ce", "ce", "--", "s"),
                                  ("train_sep", "sep", "--", "^"), ("train_div", "div", "--", "v")):
        xs = [e for e, r in zip(ep, metrics) if key in r]
        if xs:
            ax_loss.plot(xs, [r[key] for r in metrics if key in r], style, marker=marker and mk, label=label)
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    ax_loss.legend(fontsize=8)
    for key, label, style, mk in (("train_acc", "train", "-", "o"), ("val_acc", "validation", "--", "s")):
        xs = [e for e, r in zip(ep, metrics) if key in r]
        if xs:
            ax_acc.plot(xs, [100 * r[key] for r in metrics if key in r], style, marker=marker and mk, label=label)
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 101))
    ax_acc.legend(fontsize=8)
    xs = [e for e, r in zip(ep, metrics) if "lr" in r]
    if xs:
        lrs = [r["lr"] for r in metrics if "lr" in r]
        ax_lr.plot(xs, lrs, marker=marker, color="#555")
        if min(lrs) > 0 and max(lrs) / min(lrs) > 10:
            ax_lr.set_yscale("log")
        else:
            ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.set(title="learning rate", xlabel="epoch", ylabel="lr")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        if len(ep) <= 12:
            ax.set_xticks(ep)
    _save(fig, path)


def confusion_figure(name: str, m: dict, path: Path) -> None:
    cm = np.asarray(m["confusion"], dtype=float)
    support = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = cm / support[:, None]
    norm[support == 0] = np.nan
    fig = _figure(6.6, 5.6)
    ax = fig.subplots()
    import matplotlib

    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#e6e6e6")
    im = ax.imshow(np.ma.masked_invalid(norm), cmap=cmap, vmin=0, vmax=1)
    k = len(CLASSES)
    for i in range(k):
        if support[i] == 0:
            ax.text((k - 1) / 2, i, "absent from this test set", ha="center", va="center", color="#777",
                    fontsize=9, style="italic")
            continue
        for j in range(k):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=9,
                    color="white" if norm[i, j] > 0.55 else "#222")
    ax.set_xticks(range(k), CLASSES, rotation=40, ha="right")
    ax.set_yticks(range(k), [f"{c} ({int(s)})" for c, s in zip(CLASSES, support)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (support)")
    ax.set_title(f"{name}: accuracy {pct(m['accuracy'])}%, mean class {pct(m['mean_class_accuracy'])}%", fontsize=10)
    cb = fig.colorbar(im, ax=ax, shrink=0.85)
    cb.set_label("fraction of the true class (row-normalised)")
    _save(fig, path)


def per_class_figure(name: str, m: dict, path: Path) -> None:
    fig = _figure(7.2, 3.8)
    ax = fig.subplots()
    per = m["per_class_accuracy"]
    for i, c in enumerate(CLASSES):
        acc = per.get(c)
        if acc is None:
            ax.bar(i, 100, width=0.7, color="none", edgecolor="#bbbbbb", hatch="///", lw=0.8)
            ax.text(i, 50, "absent", rotation=90, ha="center", va="center", color="#666", fontsize=10,
                    style="italic", bbox=dict(facecolor="white", edgecolor="none", pad=1.5))
            continue
        ax.bar(i, 100 * acc, color=CLASS_COLOURS[i], width=0.7)
        ax.text(i, 100 * acc + 1.5, f"{100 * acc:.1f}", ha="center", va="bottom", fontsize=8)
    mca = m["mean_class_accuracy"]
    if mca is not None and not math.isnan(mca):
        ax.axhline(100 * mca, ls="--", color="#333", lw=1, label=f"mean class accuracy {pct(mca)}%")
        ax.legend(fontsize=8, loc="upper right")
    ax.set_xticks(range(len(CLASSES)), [f"{c}\n(n={m['support'].get(c, 0)})" for c in CLASSES], fontsize=8)
    ax.set_ylim(0, 112)
    ax.set_xlim(-0.6, len(CLASSES) - 0.4)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"per-class accuracy on {name}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def tsne_figure(a: np.ndarray, b: np.ndarray, y: np.ndarray, left: str, right: str, name: str, path: Path) -> None:
    fig = _figure(12.5, 5.6)
    axes = fig.subplots(1, 2)
    size = 30 if len(y) <= 300 else (12 if len(y) <= 1000 else 6)
    for ax, pts, title in ((axes[0], a, left), (axes[1], b, right)):
        for k, c in enumerate(CLASSES):
            sel = y == k
            if sel.any():
                ax.scatter(pts[sel, 0], pts[sel, 1], s=size, color=CLASS_COLOURS[k], label=c, alpha=0.8,
                           edgecolors="none")
        ax.set_title(_wrap(title, 60), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), fontsize=9, markerscale=1.5)
    fig.suptitle(f"t-SNE on {name}", fontsize=11)
    _save(fig, path)


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def heatmap_figure(cells: dict, get, sel, label: str, path: Path) -> np.ndarray:
    lams, betas, best = cells["lams"], cells["betas"], cells["best"]
    vals = np.full((len(lams), len(betas)), np.nan)
    stds = np.full_like(vals, np.nan)
    for (i, j), r in best.items():
        m, s = get(r)
        if m is not None:
            vals[i, j], stds[i, j] = 100 * m, 100 * (s or 0.0)
    import matplotlib
    from matplotlib.patches import Rectangle

    fig = _figure(max(4.8, 1.8 + 1.2 * len(betas)), max(3.6, 1.5 + 0.8 * len(lams)))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e6e6e6")
    finite = vals[np.isfinite(vals)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 1, vmax + 1
    im = ax.imshow(np.ma.masked_invalid(vals), cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
    for i in range(len(lams)):
        for j in range(len(betas)):
            if np.isfinite(vals[i, j]):
                bright = (vals[i, j] - vmin) / (vmax - vmin) > 0.6
                ax.text(j, i, f"{vals[i, j]:.1f}\n±{stds[i, j]:.1f}", ha="center", va="center", fontsize=9,
                        color="#111" if bright else "white")
            else:
                ax.text(j, i, "–", ha="center", va="center", color="#777")
    if sel is not None:
        for (i, j), r in best.items():
            if r is sel or r.get("config") == sel.get("config"):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2.5))
    ax.set_xticks(range(len(betas)), [fmt_num(b) for b in betas])
    ax.set_yticks(range(len(lams)), [fmt_num(v) for v in lams])
    ax.set_xlabel("β (diverse loss weight)")
    ax.set_ylabel("λ (separation loss weight)")
    ax.set_title(label, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.9)
    _save(fig, path)
    return vals
