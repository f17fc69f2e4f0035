"""The built-in manifests against the real FERPlus subset and muxspace (README in the data folder)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from featcache.layouts import LAYOUTS
from featcache.manifests import ManifestError, list_items, load_manifest

DATA = Path(os.environ.get("FER_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared/data/fer")

pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not DATA.is_dir(), reason=f"real FER data not found at {DATA} (set FER_DATA_DIR)")]

FERPLUS, MUXSPACE = DATA / "ferplus", DATA / "muxspace"


def test_ferplus_label_rows_per_split():
    rows = list(LAYOUTS["ferplus"].read(FERPLUS, load_manifest("ferplus").params))
    assert len(rows) == 16_152
    assert Counter(r.split for r in rows) == {"train": 9_000, "val": 3_579, "test": 3_573}
    assert not [r for r in rows if r.problem]


def test_ferplus_plurality_matches_the_data_readme():
    listing = list_items(load_manifest("ferplus", {"vote_rule": "plurality"}), FERPLUS)
    assert Counter(it.split for it in listing.items) == {"train": 8_368, "val": 3_370, "test": 3_344}
    assert listing.dropped["contempt"] == 156 + 26 + 27
    assert len(listing.items) + sum(listing.dropped.values()) == 16_152 and not listing.problems


def test_ferplus_majority_labels_fewer_images_than_plurality():
    majority = list_items(load_manifest("ferplus"), FERPLUS)
    plurality = list_items(load_manifest("ferplus", {"vote_rule": "plurality"}), FERPLUS)
    assert len(majority.items) < len(plurality.items)
    assert majority.dropped["no-majority"] > 0 and "tie" not in majority.dropped
    assert len(majority.items) + sum(majority.dropped.values()) == 16_152


def test_ferplus_fer2013new_lists_one_image_twice():
    # fer2013new.csv has two rows for fer0033120.png (neutral votes, then 10 NF votes).
    m = load_manifest("ferplus", {"source": "fer2013new"})
    listing = list_items(m, FERPLUS, on_error="skip")
    (problem,) = listing.problems
    assert problem.item_id == "data/FER2013Test/fer0033120.png" and "fer2013new.csv:13478" in problem.where
    with pytest.raises(ManifestError, match=r"fer2013new\.csv:13478: .*--on-error skip"):
        list_items(m, FERPLUS)


def test_muxspace_images_duplicate_and_contempt():
    manifest = load_manifest("muxspace")
    listing = list_items(manifest, MUXSPACE, on_error="skip")
    images = len(list((MUXSPACE / "images").glob("*.jpg")))
    assert images == 2_325
    (problem,) = listing.problems
    assert problem.item_id == "images/Avinash_30.jpg" and "SURPRISE" in problem.reason and "SADNESS" in problem.reason
    assert listing.dropped == {"contempt": 9}
    assert len(listing.items) == images - 1 - 9
    with pytest.raises(ManifestError) as err:
        list_items(manifest, MUXSPACE)
    assert "legend.csv:1905" in str(err.value) and "1 problem" in str(err.value)
