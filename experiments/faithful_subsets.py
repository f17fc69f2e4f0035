"""The subsets of the issue-10 experiment (docs/results.md §0): 600 FERPlus train + 600 test rows and 800
muxspace rows, drawn with random.Random(0), written as CSV files plus featcache manifests into OUT.

    python experiments/faithful_subsets.py FERPLUS_SUBSET_CSV MUXSPACE_LEGEND_CSV OUT

FERPLUS_SUBSET_CSV is §1's ferplus_subset.csv (experiments/make_ferplus_subset.py);
MUXSPACE_LEGEND_CSV is $DATA/muxspace/data/legend.csv.
"""
from __future__ import annotations

import csv
import random
import sys
from pathlib import Path

MANIFEST = """name = "{name}"
kind = "csv"
description = "{description}"
[params]
file = "{file}"
image_column = "image"
label_column = "{label}"
{extra}"""


def main(ferplus_csv: str, legend_csv: str, out: str) -> None:
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = list(csv.DictReader(open(ferplus_csv)))
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    rng.shuffle(train)
    rng.shuffle(test)
    with open(out_dir / "ferplus_small.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "label", "split"])
        w.writeheader()
        w.writerows(train[:600] + test[:600])
    mux = list(csv.DictReader(open(legend_csv)))
    rng.shuffle(mux)
    with open(out_dir / "muxspace_small.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(mux[0]))
        w.writeheader()
        w.writerows(mux[:800])
    (out_dir / "ferplus_small.toml").write_text(MANIFEST.format(
        name="ferplus", description="FERPlus subset: 600 train + 600 test, random.Random(0)",
        file=out_dir / "ferplus_small.csv", label="label", extra='split_column = "split"\n'))
    (out_dir / "muxspace_small.toml").write_text(MANIFEST.format(
        name="muxspace", description="muxspace subset: 800 rows, random.Random(0); split all",
        file=out_dir / "muxspace_small.csv", label="emotion", extra='image_dir = "images"\n'))


if __name__ == "__main__":
    main(*sys.argv[1:4])
