"""featcache.manifests and featcache.layouts against generated fixtures in every native layout."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import layout_fixtures as fx
from featcache.layouts import LAYOUTS, ferplus_vote
from featcache.manifests import (Item, ManifestError, builtin_manifests, list_items, load_manifest,
                                 parse_overrides)
from featcache.taxonomy import CLASSES


@pytest.fixture(scope="session")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Every fixture layout, built once; tests that modify a dataset use `fresh` instead."""
    base = tmp_path_factory.mktemp("layouts")
    return {name: make(base / name) for name, make in fx.LAYOUT_MAKERS.items()}


@pytest.fixture
def fresh(tmp_path):
    return lambda name: fx.LAYOUT_MAKERS[name](tmp_path / name)


def labels_of(listing) -> dict[str, str]:
    return {it.id: CLASSES[it.label] for it in listing.items}


# ---------------------------------------------------------------- every built-in manifest

def test_builtin_manifests_cover_every_fixture():
    assert builtin_manifests() == sorted(fx.LAYOUT_MAKERS)
    for name in builtin_manifests():
        m = load_manifest(name)
        assert m.name == name and m.path.name == f"{name}.toml" and m.kind in LAYOUTS and m.description


@pytest.mark.parametrize("name", sorted(fx.LAYOUT_MAKERS))
def test_builtin_manifest_lists_its_fixture(name, datasets):
    root = datasets[name]
    listing = list_items(load_manifest(name), root, on_error="skip")
    splits, dropped, n_problems = fx.EXPECTED[name]
    assert dict(Counter(it.split for it in listing.items)) == splits
    assert listing.dropped == dropped
    assert len(listing.problems) == n_problems
    assert listing.items == sorted(listing.items, key=lambda it: (it.split, it.id))
    assert len({it.id for it in listing.items}) == len(listing.items)
    for it in listing.items:
        assert isinstance(it, Item) and it.path == root / it.id and it.path.is_file()
        assert "\\" not in it.id and not it.id.startswith("/") and 0 <= it.label < len(CLASSES)
    # Listing twice gives the same answer: ids are stable.
    assert list_items(load_manifest(name), root, on_error="skip") == listing


def test_rafdb_ids_labels_splits(datasets):
    listing = list_items(load_manifest("rafdb"), datasets["rafdb"])
    got = {it.id: (CLASSES[it.label], it.split, it.box) for it in listing.items}
    assert got == {
        "Image/aligned/test_0001_aligned.jpg": ("surprise", "test", None),
        "Image/aligned/test_0002_aligned.jpg": ("anger", "test", None),
        "Image/aligned/test_0003_aligned.jpg": ("fear", "test", None),
        "Image/aligned/test_0004_aligned.jpg": ("disgust", "test", None),
        "Image/aligned/train_00001_aligned.jpg": ("sadness", "train", None),
        "Image/aligned/train_00002_aligned.jpg": ("surprise", "train", None),
        "Image/aligned/train_00003_aligned.jpg": ("happiness", "train", None),
        "Image/aligned/train_00004_aligned.jpg": ("neutral", "train", None),
    }
    assert [it.id for it in listing.items][:2] == ["Image/aligned/test_0001_aligned.jpg",
                                                   "Image/aligned/test_0002_aligned.jpg"]


def test_rafdb_original_images_by_override(datasets):
    m = load_manifest("rafdb", {"image_dir": "Image/original", "image_suffix": ""})
    ids = [it.id for it in list_items(m, datasets["rafdb"]).items]
    assert "Image/original/train_00001.jpg" in ids and len(ids) == 8


FERPLUS_MAJORITY = {
    "data/FER2013Train/fer0000001.png": "neutral", "data/FER2013Train/fer0000002.png": "happiness",
    "data/FER2013Train/fer0000006.png": "fear", "data/FER2013Valid/fer0028710.png": "surprise",
    "data/FER2013Valid/fer0028711.png": "sadness", "data/FER2013Test/fer0032220.png": "disgust",
    "data/FER2013Test/fer0032222.png": "anger",
}


def test_ferplus_majority_and_plurality(datasets):
    root = datasets["ferplus"]
    majority = list_items(load_manifest("ferplus"), root)
    assert labels_of(majority) == FERPLUS_MAJORITY
    assert {it.id: it.split for it in majority.items}["data/FER2013Valid/fer0028711.png"] == "val"
    plurality = list_items(load_manifest("ferplus", {"vote_rule": "plurality"}), root)
    assert labels_of(plurality) == {**FERPLUS_MAJORITY, "data/FER2013Train/fer0000007.png": "anger"}
    assert plurality.dropped == {"contempt": 1, "not-a-face": 1, "tie": 3, "unknown": 1}
    assert all(it.box is None for it in plurality.items)


def test_ferplus_fer2013new_source_matches_label_csv(datasets):
    root = datasets["ferplus"]
    label_csv = list_items(load_manifest("ferplus"), root)
    new = list_items(load_manifest("ferplus", {"source": "fer2013new"}), root)
    assert new.items == label_csv.items
    assert new.dropped == {**label_csv.dropped, "no-image": 1}


@pytest.mark.parametrize("votes, majority, plurality", [
    ([10, 0, 0, 0, 0, 0, 0, 0, 0, 0], "neutral", "neutral"),
    ([0, 5, 1, 1, 1, 1, 1, 0, 0, 0], "happiness", "happiness"),  # 5 of 10, but 5 of 5 after single votes go
    ([0, 5, 2, 1, 1, 1, 0, 0, 0, 0], "happiness", "happiness"),  # 5 > 7/2
    ([0, 4, 4, 2, 0, 0, 0, 0, 0, 0], "no-majority", "tie"),
    ([3, 3, 2, 2, 0, 0, 0, 0, 0, 0], "no-majority", "tie"),
    ([4, 0, 0, 0, 3, 0, 0, 0, 3, 0], "no-majority", "neutral"),
    ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], "no-majority", "tie"),      # every vote an outlier
    ([0, 0, 0, 0, 0, 0, 0, 1, 8, 1], "unknown", "unknown"),
    ([0, 1, 0, 0, 0, 0, 0, 0, 0, 9], "NF", "NF"),
    ([0, 0, 0, 0, 0, 0, 1, 6, 3, 0], "contempt", "contempt"),
    ([0, 0, 0, 0, 0, 0, 0, 0, 0, 0], "no-majority", "tie"),
])
def test_ferplus_vote_rules(votes, majority, plurality):
    assert ferplus_vote(votes, "majority").tolist() == [majority]
    assert ferplus_vote(votes, "plurality").tolist() == [plurality]


def test_ferplus_vote_is_vectorised_and_checks_the_rule():
    votes = np.array([[10, 0, 0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 3, 3, 0, 0, 0, 0, 4, 0]])
    assert ferplus_vote(votes, "majority").tolist() == ["neutral", "no-majority"]
    with pytest.raises(ValueError):
        ferplus_vote(votes, "mean")


def test_ferplus_winner_drops_through_taxonomy(datasets):
    listing = list_items(load_manifest("ferplus"), datasets["ferplus"])
    assert {"contempt", "unknown", "not-a-face"} <= set(listing.dropped)
    assert "data/FER2013Train/fer0000004.png" not in labels_of(listing)


def test_affectnet_boxes_and_codes(datasets):
    listing = list_items(load_manifest("affectnet"), datasets["affectnet"])
    got = {it.id: (CLASSES[it.label], it.split, it.box) for it in listing.items}
    assert got["Manually_Annotated_Images/689/a0.jpg"] == ("neutral", "train", (2, 3, 20, 22))
    assert got["Manually_Annotated_Images/12/b5.JPG"] == ("disgust", "train", (3, 1, 25, 30))
    assert got["Manually_Annotated_Images/3/v0.jpg"] == ("anger", "val", (6, 6, 20, 20))
    assert [CLASSES[it.label] for it in listing.items if it.split == "train"].count("contempt") == 0


def test_affectnet_headerless_validation_csv_and_moved_files(fresh):
    root = fresh("affectnet")
    val = root / "Manually_Annotated_file_lists" / "validation.csv"
    moved = root / "lists" / "val.csv"
    moved.parent.mkdir()
    moved.write_text("".join(val.read_text().splitlines(keepends=True)[1:]))
    val.unlink()
    with pytest.raises(ManifestError, match="validation.csv"):
        list_items(load_manifest("affectnet"), root)
    m = load_manifest("affectnet", {"csv.val": "lists/val.csv"})
    assert m.params["csv"] == {"train": "Manually_Annotated_file_lists/training.csv", "val": "lists/val.csv"}
    listing = list_items(m, root)
    assert dict(Counter(it.split for it in listing.items)) == {"train": 7, "val": 2}


def test_affectnet_malformed_box_is_a_problem(fresh):
    root = fresh("affectnet")
    csv = root / "Manually_Annotated_file_lists" / "training.csv"
    csv.write_text(csv.read_text() + "689/a0.jpg,1,2,0,5,,3,0,0\n689/zz.jpg,x,2,3,5,,3,0,0\n")
    listing = list_items(load_manifest("affectnet"), root, on_error="skip")
    assert [p.where for p in listing.problems] == [f"{csv}:13", f"{csv}:14"]
    assert "empty face box" in listing.problems[0].reason


def test_affectnet_npy(fresh):
    root = fresh("affectnet_npy")
    fx.write_image(root / "train_set" / "images" / "99.jpg")  # an image without annotations
    listing = list_items(load_manifest("affectnet_npy"), root)
    got = {it.id: (CLASSES[it.label], it.split) for it in listing.items}
    assert got == {"train_set/images/0.jpg": ("surprise", "train"), "train_set/images/1.jpg": ("happiness", "train"),
                   "train_set/images/3.jpg": ("anger", "train"), "train_set/images/10.jpg": ("neutral", "train"),
                   "val_set/images/0.jpg": ("disgust", "val"), "val_set/images/7.jpg": ("sadness", "val")}
    assert listing.dropped == {"contempt": 1, "unlabelled": 1}


def test_folders_sfew_mma_ckplus48(datasets):
    sfew = labels_of(list_items(load_manifest("sfew"), datasets["sfew"]))
    assert sfew["Train/Angry/angry_000.png"] == "anger" and sfew["Val/Happy/happy_000.png"] == "happiness"
    mma = list_items(load_manifest("mma"), datasets["mma"])
    assert {it.id: it.split for it in mma.items}["valid/sad/sad_000.jpg"] == "val"
    ck48 = labels_of(list_items(load_manifest("ckplus48"), datasets["ckplus48"]))
    assert ck48["happy/happy_001.png"] == "happiness" and "contempt/contempt_000.png" not in ck48


def test_folders_split_dirs_by_override(fresh):
    root = fresh("mma")
    m = load_manifest("folders", {"split_dirs.train": "train", "split_dirs.test": "test"})
    listing = list_items(m, root)
    assert dict(Counter(it.split for it in listing.items)) == {"train": 14, "test": 7}


def test_folders_unknown_class_folder_is_a_problem(fresh):
    root = fresh("folders")
    fx.write_image(root / "smirk" / "x.jpg")
    listing = list_items(load_manifest("folders"), root, on_error="skip")
    assert [(p.item_id, p.where) for p in listing.problems] == [("smirk/x.jpg", str(root / "smirk" / "x.jpg"))]
    assert "unknown label 'smirk'" in listing.problems[0].reason


def test_ckplus_peak_frames_and_neutral_first_frame(datasets):
    root = datasets["ckplus"]
    peak = labels_of(list_items(load_manifest("ckplus"), root))
    assert peak == {"cohn-kanade-images/S005/001/S005_001_00000003.png": "disgust",
                    "cohn-kanade-images/S010/002/S010_002_00000004.png": "surprise",
                    "cohn-kanade-images/S026/001/S026_001_00000005.png": "happiness"}
    both = list_items(load_manifest("ckplus", {"neutral_first_frame": "true"}), root)
    firsts = {i: c for i, c in labels_of(both).items() if i.endswith("00000001.png")}
    assert set(firsts.values()) == {"neutral"} and len(firsts) == 4  # S022's contempt sequence too
    assert both.dropped == {"contempt": 1, "unlabelled": 1}


def test_muxspace_mixed_case_and_conflicting_duplicate(datasets):
    root = datasets["muxspace"]
    listing = list_items(load_manifest("muxspace"), root, on_error="skip")
    labels = labels_of(listing)
    assert labels["images/Avinash_28.jpg"] == "happiness" and labels["images/Avinash_33.jpg"] == "anger"
    assert "images/Avinash_30.jpg" not in labels
    (problem,) = listing.problems
    legend = root / "data" / "legend.csv"
    assert problem.item_id == "images/Avinash_30.jpg" and problem.where == f"{legend}:9"
    assert f"{legend}:9 says SURPRISE" in problem.reason and f"{legend}:12 says SADNESS" in problem.reason
    with pytest.raises(ManifestError) as err:
        list_items(load_manifest("muxspace"), root)
    message = str(err.value)
    assert message.startswith(f"{legend}:9:") and "1 problem in total" in message and "--on-error skip" in message


def test_duplicate_with_the_same_label_is_merged(fresh):
    root = fresh("csv")
    (root / "labels.csv").write_text((root / "labels.csv").read_text() + "img/a.jpg,HAPPY\nimg/d.jpg,contempt\n")
    listing = list_items(load_manifest("csv"), root)
    assert labels_of(listing)["img/a.jpg"] == "happiness" and len(listing.items) == 3
    assert listing.dropped == {"contempt": 1, "duplicate-row": 2}


def test_missing_image_unknown_label_and_malformed_row(fresh):
    root = fresh("rafdb")
    (root / "Image" / "aligned" / "train_00003_aligned.jpg").unlink()
    label_file = root / "EmoLabel" / "list_patition_label.txt"
    fx.write_image(root / "Image" / "aligned" / "train_00009_aligned.jpg")
    label_file.write_text(label_file.read_text() + "train_00009.jpg 9\nnot a valid line\n\nval_0001.jpg 1\n")
    listing = list_items(load_manifest("rafdb"), root, on_error="skip")
    assert [p.where for p in listing.problems] == [f"{label_file}:{n}" for n in (3, 9, 10, 12)]
    assert listing.problems[0].item_id == "Image/aligned/train_00003_aligned.jpg"
    assert "missing" in listing.problems[0].reason
    assert "unknown label '9'" in listing.problems[1].reason
    assert "malformed" in listing.problems[2].reason and "malformed" in listing.problems[3].reason
    assert len(listing.items) == 7
    with pytest.raises(ManifestError, match=r"list_patition_label\.txt:3: .*4 problems in total.*--on-error skip"):
        list_items(load_manifest("rafdb"), root)


def test_listing_never_decodes_images(fresh):
    root = fresh("sfew")
    (root / "Train" / "Angry" / "angry_000.png").write_bytes(b"")  # broken, but it exists
    assert len(list_items(load_manifest("sfew"), root).items) == 21


@pytest.mark.parametrize("name, wrong, expected", [
    ("rafdb", "ferplus", "EmoLabel/list_patition_label.txt"),
    ("ferplus", "rafdb", "data/FER2013Train/label.csv"),
    ("affectnet", "sfew", "Manually_Annotated_file_lists/training.csv"),
    ("affectnet_npy", "mma", "train_set/images"),
    ("sfew", "mma", "Train"),
    ("ckplus", "ckplus48", "cohn-kanade-images"),
    ("muxspace", "csv", "data/legend.csv"),
    ("ckplus48", "ferplus", "no images"),
])
def test_wrong_root_says_what_is_missing(name, wrong, expected, datasets):
    with pytest.raises(ManifestError) as err:
        list_items(load_manifest(name), datasets[wrong])
    message = str(err.value)
    assert expected in message and str(datasets[wrong]) in message and f"'{name}' layout" in message


def test_root_that_does_not_exist(tmp_path):
    with pytest.raises(ManifestError, match="is not a folder.*'rafdb' layout"):
        list_items(load_manifest("rafdb"), tmp_path / "nowhere")


def test_sfew_without_val_folder(fresh):
    root = fresh("sfew")
    shutil.rmtree(root / "Val")
    with pytest.raises(ManifestError, match="missing folder 'Val' under root"):
        list_items(load_manifest("sfew"), root)


def test_on_error_must_be_fail_or_skip(datasets):
    with pytest.raises(ValueError):
        list_items(load_manifest("csv"), datasets["csv"], on_error="ignore")


# ---------------------------------------------------------------- user manifests, overrides, sha256

USER_MANIFEST = '''
name = "my-faces"
kind = "csv"
description = "tab-separated, no header, split column"

[params]
file = "meta/list.tsv"
image_column = 0
label_column = 2
split_column = 1
image_dir = "pics"
delimiter = "\\t"
has_header = false

[labels]
smile = "happiness"
frown = "sadness"
'''


def test_user_written_manifest(tmp_path):
    path = tmp_path / "my.toml"
    path.write_text(USER_MANIFEST)
    root = tmp_path / "data"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "list.tsv").write_text("a.png\ttrain\tsmile\nb.png\ttest\tfrown\nc.png\ttest\tangry\n")
    for name in "abc":
        fx.write_image(root / "pics" / f"{name}.png")
    m = load_manifest(str(path))
    assert (m.name, m.kind, m.path) == ("my-faces", "csv", path)
    listing = list_items(m, root)
    got = {it.id: (CLASSES[it.label], it.split) for it in listing.items}
    # Names outside the [labels] map still resolve through the taxonomy.
    assert got == {"pics/a.png": ("happiness", "train"), "pics/b.png": ("sadness", "test"),
                   "pics/c.png": ("anger", "test")}
    assert load_manifest(path).sha256 == m.sha256


def test_overrides_change_params_and_sha256():
    base = load_manifest("ferplus")
    plurality = load_manifest("ferplus", {"vote_rule": "plurality"})
    assert base.params["vote_rule"] == "majority" and plurality.params["vote_rule"] == "plurality"
    assert plurality.sha256 != base.sha256
    assert load_manifest("ferplus", {"vote_rule": "majority"}).sha256 == base.sha256
    ck = load_manifest("ckplus", {"neutral_first_frame": "yes"})
    assert ck.params["neutral_first_frame"] is True and ck.sha256 != load_manifest("ckplus").sha256
    csv = load_manifest("csv", {"has_header": "false", "image_column": "0"})
    assert csv.params["has_header"] is False and csv.params["image_column"] == "0"
    assert load_manifest("sfew", {"extensions": ".png, .JPG"}).params["extensions"] == [".png", ".JPG"]


def test_stored_params_reload_to_the_same_manifest():
    # build stores Manifest.params; inspection reloads with them as overrides.
    m = load_manifest("ferplus", {"vote_rule": "plurality", "folders.val": "data/Valid"})
    again = load_manifest("ferplus", m.params)
    assert again.params == m.params and again.sha256 == m.sha256
    assert load_manifest("sfew", load_manifest("sfew").params).sha256 == load_manifest("sfew").sha256


def test_labels_change_sha256(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text(USER_MANIFEST)
    before = load_manifest(path).sha256
    path.write_text(USER_MANIFEST.replace('frown = "sadness"', 'frown = "anger"'))
    assert load_manifest(path).sha256 != before
    path.write_text(USER_MANIFEST.replace("tab-separated", "changed words only"))
    assert load_manifest(path).sha256 == before


@pytest.mark.parametrize("overrides, match", [
    ({"vote_rul": "plurality"}, "unknown param 'vote_rul'.*known: fer2013new"),
    ({"vote_rule": "mean"}, "choose one of majority, plurality"),
    ({"folders": "x"}, "folders is a table"),
    ({"source.x": "y"}, "source is not a table"),
])
def test_bad_overrides(overrides, match):
    with pytest.raises(ManifestError, match=match) as err:
        load_manifest("ferplus", overrides)
    assert "ferplus.toml" in str(err.value)


def test_bool_override_must_be_a_bool():
    with pytest.raises(ManifestError, match="expected true or false"):
        load_manifest("ckplus", {"neutral_first_frame": "maybe"})


def test_parse_overrides():
    assert parse_overrides(["vote_rule=plurality", "split_dirs.val = Valid", "image_suffix="]) == {
        "vote_rule": "plurality", "split_dirs.val": " Valid", "image_suffix": ""}
    with pytest.raises(ManifestError, match="key=value"):
        parse_overrides(["novalue"])


@pytest.mark.parametrize("text, match", [
    ('name = "x"\nkind = "nosuch"\n', "unknown kind 'nosuch'; known kinds: .*raf_basic"),
    ('kind = "csv"\n', "missing key.*name"),
    ('name = "x"\nkind = "csv"\n[params\n', "not valid TOML"),
    ('name = "x"\nkind = "csv"\n[label]\na = "happy"\n', "unknown key.*label"),
    ('name = "x"\nkind = "csv"\n[labels]\na = "suprise"\n', r"\[labels\] a = 'suprise'"),
    ('name = "x"\nkind = "raf_basic"\n', "needs a \\[labels\\] table"),
    ('name = "x"\nkind = "csv"\n[params]\nhas_header = "yes"\n', "has_header.*must be a bool"),
    ('name = "x"\nkind = "csv"\n[params]\nimage_colum = "a"\n', "unknown param.*image_colum"),
])
def test_bad_manifest_files_name_the_file(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ManifestError, match=match) as err:
        load_manifest(path)
    assert str(path) in str(err.value)


def test_unknown_builtin_and_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="no built-in manifest 'rafd'.*rafdb"):
        load_manifest("rafd")
    with pytest.raises(ManifestError, match="manifest file not found"):
        load_manifest(tmp_path / "none.toml")
