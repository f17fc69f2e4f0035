"""Prediction rows (maskfer.predictor) as text lines, CSV or JSON: one row per face per image or frame."""
from __future__ import annotations

import csv
import io
import json

from featcache.taxonomy import CLASSES

CSV_COLUMNS = ("input", "frame", "time", "face", "x0", "y0", "x1", "y1", "score", "prediction", *CLASSES, "note")


def _csv_row(r: dict) -> list:
    probs = r.get("probabilities") or {}
    box = r.get("box") or ["", "", "", ""]
    return [r["input"], r.get("frame", ""), r.get("time", ""), "" if r.get("face") is None else r["face"], *box,
            r.get("score", ""), r.get("prediction") or "", *[f"{probs[c]:.6f}" if probs else "" for c in CLASSES],
            r.get("error") and f"error: {r['error']}" or r.get("note", "")]


def _text_line(r: dict) -> str:
    where = str(r["input"]) + (f" @{r['time']:.2f}s" if "time" in r else "")
    if "error" in r:
        return f"{where}: ERROR {r['error']}"
    if r.get("face") is None:
        return f"{where}: no face found"
    top = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])[:3]
    box = ",".join(f"{v:.0f}" for v in r["box"])
    return f"{where} face {r['face']} [{box}]: {r['prediction']}  (" + ", ".join(f"{c} {p:.3f}" for c, p in top) + ")"


def format_rows(rows: list[dict], form: str) -> str:
    if form == "json":
        return json.dumps(rows, indent=2) + "\n"
    if form == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        w.writerows(_csv_row(r) for r in rows)
        return buf.getvalue()
    return "".join(_text_line(r) + "\n" for r in rows)
