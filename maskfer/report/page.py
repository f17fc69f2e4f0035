"""The HTML of a report: a page of blocks (headings, notes, figures, embedded pages), tables, the stylesheet.

A page is one static ``index.html`` with relative ``<img>`` links and the stylesheet (report.css, package
data) inlined, so it opens in any browser without a server.
"""
from __future__ import annotations

import datetime
import functools
import html
import importlib.resources
import re
from pathlib import Path

from maskfer import rundir
from maskfer.figures import fmt_num, pct

INDEX = "index.html"
STYLESHEET = "report.css"

# TrainConfig field -> its label in the run's and the sweep's configuration tables, in this order
CONFIG_LABELS = [
    ("train", "training set"), ("val_split", "validation split"), ("test", "test sets"), ("method", "method"),
    ("backbone", "backbone"), ("pretrained", "pretrained backbone"), ("epochs", "epochs"),
    ("batch_size", "batch size"), ("image_size", "image size"), ("lr", "learning rate (Adam)"),
    ("weight_decay", "weight decay"), ("gamma", "lr decay per epoch"), ("lam", "λ (separation)"),
    ("beta", "β (diverse)"), ("drop", "channels dropped / group"), ("drop_mode", "drop mode"),
    ("sigmoid", "sigmoid mask"), ("separation", "separation loss"), ("diverse", "diverse loss"),
    ("mask_map", "mask map"), ("flip", "flips"), ("erasing", "random erasing p"), ("noise_std", "noise std"),
    ("balanced", "balanced sampling"), ("seed", "seed"), ("cache", "feature store"),
]


@functools.cache
def stylesheet() -> str:
    """report.css, shipped as package data next to this module."""
    return importlib.resources.files(__package__).joinpath(STYLESHEET).read_text(encoding="utf-8")


# ---------------------------------------------------------------------------- text and tables
def esc(v) -> str:
    return html.escape(str(v), quote=True)


def pct_pm(mean, std) -> str:
    return "–" if mean is None else f"{pct(mean)} ± {pct(std or 0.0)}"


def fmt_cfg(v) -> str:
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "–"
    return "–" if v is None else fmt_num(v)


def slug(name: str) -> str:
    """'domB:test' -> 'domB_test' (file-name safe)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def table(header: list[str], rows: list, table_id: str | None = None, cls: str = "", raw_cells=False) -> str:
    """A table with a header row; a row is a list of cells or {"cells": [...], "class": "selected"}."""
    tid = f' id="{esc(table_id)}"' if table_id else ""
    c = f' class="{esc(cls)}"' if cls else ""
    out = [f"<table{tid}{c}><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for row in rows:
        row_cls = ""
        if isinstance(row, dict):
            row_cls = f' class="{esc(row["class"])}"' if row.get("class") else ""
            row = row["cells"]
        cells = "".join(f"<td>{cell if raw_cells else esc(cell)}</td>" for cell in row)
        out.append(f"<tr{row_cls}>{cells}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def kv_table(pairs: list[tuple[str, object]], table_id: str | None = None, per_row: int = 1) -> str:
    """Key/value pairs, ``per_row`` pairs to a row (key cells are <th>), no header."""
    tid = f' id="{esc(table_id)}"' if table_id else ""
    rows = []
    for s in range(0, len(pairs), per_row):
        chunk = pairs[s:s + per_row]
        rows.append("<tr>" + "".join(f"<th>{esc(k)}</th><td>{esc(v)}</td>" for k, v in chunk) + "</tr>")
    return f'<table{tid} class="kv"><tbody>' + "".join(rows) + "</tbody></table>"


# ---------------------------------------------------------------------------- the page
class Page:
    """Blocks of a page; figure sources are rendered with a prefix so a run's blocks embed in a sweep page."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str, anchor: str | None = None) -> None:
        self.blocks.append(("h", level, text, anchor))

    def note(self, text: str) -> None:
        self.blocks.append(("raw", f'<p class="note">{esc(text)}</p>'))

    def para(self, text: str, raw: bool = False) -> None:
        self.blocks.append(("raw", f"<p>{text if raw else esc(text)}</p>"))

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
                a = f' id="{esc(anchor)}"' if anchor else ""
                parts.append(f"<h{lv}{a}>{esc(text)}</h{lv}>")
            elif b[0] == "raw":
                parts.append(b[1])
            elif b[0] == "fig":
                _, file, caption, side, alt = b
                src = esc(prefix + file)
                fig = (f'<figure><a href="{src}"><img src="{src}" alt="{esc(alt)}"></a>'
                       f"<figcaption>{esc(caption)}</figcaption></figure>")
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
                f"<title>{esc(self.title)}</title><style>\n{stylesheet().strip()}\n</style></head>\n<body>\n"
                f"<h1>{esc(self.title)}</h1>\n<p class=\"meta\">generated {stamp} by <code>maskfer report</code></p>\n"
                f"{self.body()}\n</body></html>\n")

    def write(self, folder: Path) -> Path:
        """``folder/index.html``, written atomically; returns its path."""
        index = Path(folder) / INDEX
        rundir.atomic_write_text(index, self.html())
        return index
