"""Write a CSV manifest for a random FERPlus subset (labels from the built-in manifest's vote rule).

The real-data experiment (docs/results.md) encodes each image with a real encoder on a 2-core
CPU at a few images/s, so it uses a seeded random subset of FERPlus Train and Test. The CSV and
its manifest are written next to the run outputs, never into the repository.

    python experiments/make_ferplus_subset.py ROOT OUT_DIR --train 2000 --test 1500 --seed 0
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from featcache.manifests import list_items, load_manifest
from featcache.taxonomy import CLASSES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="FERPlus root (with data/FER2013*/label.csv)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    items = list_items(load_manifest("ferplus"), a.root).items
    rng = np.random.default_rng(a.seed)
    rows = []
    for split, n in (("train", a.train), ("test", a.test)):
        pool = [it for it in items if it.split == split]
        pick = sorted(rng.choice(len(pool), size=min(n, len(pool)), replace=False))
        rows += [(pool[i].id, CLASSES[pool[i].label], split) for i in pick]
    a.out.mkdir(parents=True, exist_ok=True)
    with open(a.out / "ferplus_subset.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "split"])
        w.writerows(rows)
    (a.out / "ferplus_subset.toml").write_text(
        'name = "ferplus"\nkind = "csv"\n'
        f'description = "FERPlus subset: {a.train} train + {a.test} test, seed {a.seed}, majority vote rule"\n'
        f'[params]\nfile = "{(a.out / "ferplus_subset.csv").resolve()}"\n'
        'image_column = "image"\nlabel_column = "label"\nsplit_column = "split"\n')
    print(f"wrote {len(rows)} rows to {a.out / 'ferplus_subset.csv'}")


if __name__ == "__main__":
    main()
