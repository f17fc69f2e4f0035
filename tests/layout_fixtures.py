"""Tiny datasets in every native layout the built-in manifests read, for tests.

``make_<name>(root) -> root`` writes the dataset directly into ``root`` (created if needed)
and returns it as a Path; ``LAYOUT_MAKERS`` maps each built-in manifest name to its maker.
Images are 16x16 (32x32 where a face box is cropped) with seeded random colours, so
every call writes the same bytes. What each fixture should list is in ``EXPECTED``.

The muxspace fixture reproduces the real file's quirk: one image listed twice with
conflicting labels. Listing it with ``on_error="fail"`` raises; use ``"skip"``.
"""
from __future__ import annotations

import csv
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from featcache.taxonomy import CLASSES


def write_image(path: Path, size: int | tuple[int, int] = 16, mode: str = "RGB") -> Path:
    """A small random-colour image; format from the suffix; seeded by the file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").convert(mode).save(path)
    return path


def _write_csv(path: Path, rows: list[list], header: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


# ---------------------------------------------------------------- RAF-DB

RAFDB_ROWS = [("train_00001.jpg", 5), ("train_00002.jpg", 1), ("train_00003.jpg", 4), ("train_00004.jpg", 7),
              ("test_0001.jpg", 1), ("test_0002.jpg", 6), ("test_0003.jpg", 2), ("test_0004.jpg", 3)]


def make_rafdb(root) -> Path:
    root = Path(root)
    label_file = root / "EmoLabel" / "list_patition_label.txt"
    label_file.parent.mkdir(parents=True, exist_ok=True)
    label_file.write_text("".join(f"{name} {code}\n" for name, code in RAFDB_ROWS))
    for name, _ in RAFDB_ROWS:
        stem = name[:-4]
        write_image(root / "Image" / "aligned" / f"{stem}_aligned.jpg")
        write_image(root / "Image" / "original" / name, size=24)
    return root


# ---------------------------------------------------------------- FERPlus

# name -> votes in the column order neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF
FERPLUS_VOTES = {
    "train": {
        "fer0000001.png": [10, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # neutral / neutral
        "fer0000002.png": [0, 6, 1, 1, 0, 0, 0, 0, 2, 0],   # happiness / happiness
        "fer0000003.png": [4, 0, 4, 0, 0, 0, 0, 0, 2, 0],   # no-majority / tie
        "fer0000004.png": [1, 0, 0, 0, 0, 0, 0, 7, 1, 1],   # contempt / contempt
        "fer0000005.png": [0, 0, 0, 0, 0, 0, 0, 0, 2, 8],   # not-a-face / not-a-face
        "fer0000006.png": [3, 1, 0, 1, 0, 1, 4, 0, 0, 0],   # fear only after outlier removal (4 of 7) / fear
        "fer0000007.png": [0, 0, 0, 0, 4, 3, 0, 0, 3, 0],   # no-majority / anger
        "fer0000008.png": [0, 0, 0, 0, 0, 0, 0, 0, 6, 4],   # unknown / unknown
    },
    "val": {
        "fer0028710.png": [0, 0, 9, 0, 0, 0, 0, 0, 1, 0],   # surprise / surprise
        "fer0028711.png": [0, 0, 0, 8, 2, 0, 0, 0, 0, 0],   # sadness / sadness
        "fer0028712.png": [2, 2, 2, 2, 2, 0, 0, 0, 0, 0],   # no-majority / tie
    },
    "test": {
        "fer0032220.png": [0, 0, 0, 0, 0, 10, 0, 0, 0, 0],  # disgust / disgust
        "fer0032221.png": [5, 0, 0, 0, 5, 0, 0, 0, 0, 0],   # no-majority / tie
        "fer0032222.png": [0, 0, 0, 0, 9, 0, 0, 0, 0, 1],   # anger / anger
    },
}
FERPLUS_FOLDERS = {"train": "FER2013Train", "val": "FER2013Valid", "test": "FER2013Test"}
FER2013_USAGE = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}


def make_ferplus(root) -> Path:
    root = Path(root)
    new_rows = []
    for split, votes in FERPLUS_VOTES.items():
        folder = root / "data" / FERPLUS_FOLDERS[split]
        _write_csv(folder / "label.csv", [[name, "(0, 0, 48, 48)", *v] for name, v in votes.items()])
        for name in votes:
            write_image(folder / name, mode="L")
        new_rows += [[FER2013_USAGE[split], name, *v] for name, v in votes.items()]
    new_rows.insert(3, ["Training", "", 0, 0, 0, 0, 0, 0, 0, 0, 0, 10])  # an image FERPlus did not export
    _write_csv(root / "fer2013new.csv", new_rows,
               header=["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger", "disgust",
                       "fear", "contempt", "unknown", "NF"])
    return root


# ---------------------------------------------------------------- AffectNet

AFFECTNET_HEADER = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                    "facial_landmarks", "expression", "valence", "arousal"]
# split -> (subDirectory_filePath, box, expression)
AFFECTNET_ROWS = {
    "train": [("689/a0.jpg", (2, 3, 20, 22), 0), ("689/a1.jpg", (0, 0, 32, 32), 1), ("689/a2.jpg", (4, 4, 16, 16), 2),
              ("12/b3.jpg", (1, 2, 28, 27), 3), ("12/b4.jpg", (5, 5, 20, 20), 4), ("12/b5.JPG", (3, 1, 25, 30), 5),
              ("12/b6.png", (0, 2, 30, 28), 6), ("12/b7.jpg", (0, 0, 32, 32), 7), ("12/b8.jpg", (0, 0, 32, 32), 8),
              ("12/b9.jpg", (0, 0, 32, 32), 9), ("12/b10.jpg", (0, 0, 32, 32), 10)],
    "val": [("3/v0.jpg", (6, 6, 20, 20), 6), ("3/v1.jpg", (0, 0, 32, 32), 0), ("3/v2.jpg", (2, 2, 10, 10), 7)],
}


def make_affectnet(root) -> Path:
    root = Path(root)
    files = {"train": "training.csv", "val": "validation.csv"}
    for split, rows in AFFECTNET_ROWS.items():
        lines = [[path, *box, ";".join(f"{v:.2f}" for v in range(10)), code, "0.25", "-0.5"]
                 for path, box, code in rows]
        _write_csv(root / "Manually_Annotated_file_lists" / files[split], lines, header=AFFECTNET_HEADER)
        for path, _, _ in rows:
            write_image(root / "Manually_Annotated_Images" / path, size=32)
    return root


# split -> {id: expression code}
AFFECTNET_NPY = {"train": {"0": 3, "1": 1, "2": 7, "3": 6, "10": 0}, "val": {"0": 5, "7": 2}}


def make_affectnet_npy(root) -> Path:
    root = Path(root)
    for split, labels in AFFECTNET_NPY.items():
        folder = root / {"train": "train_set", "val": "val_set"}[split]
        (folder / "annotations").mkdir(parents=True, exist_ok=True)
        for stem, code in labels.items():
            write_image(folder / "images" / f"{stem}.jpg")
            np.save(folder / "annotations" / f"{stem}_exp.npy", np.array(str(code)))
            np.save(folder / "annotations" / f"{stem}_val.npy", np.array("0.1"))
            np.save(folder / "annotations" / f"{stem}_aro.npy", np.array("-0.2"))
            np.save(folder / "annotations" / f"{stem}_lnd.npy", np.zeros(136, dtype=np.float32))
    return root


# ---------------------------------------------------------------- class folders

SFEW_CLASSES = ("Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise")
MMA_CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")
CKPLUS48_CLASSES = ("anger", "contempt", "disgust", "fear", "happy", "sadness", "surprise")


def _class_folders(base: Path, classes, per_class: int, suffix: str, mode: str = "RGB") -> None:
    for cls in classes:
        for i in range(per_class):
            write_image(base / cls / f"{cls.lower()}_{i:03d}{suffix}", mode=mode)


def make_sfew(root) -> Path:
    root = Path(root)
    _class_folders(root / "Train", SFEW_CLASSES, 2, ".png")
    _class_folders(root / "Val", SFEW_CLASSES, 1, ".png")
    return root


def make_mma(root) -> Path:
    root = Path(root)
    for split, n in (("train", 2), ("valid", 1), ("test", 1)):
        _class_folders(root / split, MMA_CLASSES, n, ".jpg")
    return root


def make_ckplus48(root) -> Path:
    root = Path(root)
    _class_folders(root, CKPLUS48_CLASSES, 2, ".png", mode="L")
    return root


def make_demo(root) -> Path:
    """The layout `maskfer demo` generates: train/<class>/ and test/<class>/ (taxonomy class names)."""
    root = Path(root)
    _class_folders(root / "train", CLASSES, 2, ".png")
    _class_folders(root / "test", CLASSES, 1, ".png")
    return root


def make_folders(root) -> Path:
    """The generic folders manifest's default: class folders directly under the root."""
    root = Path(root)
    _class_folders(root, ("happy", "Sad", "ANGER", "neutral"), 2, ".jpg")
    (root / "happy" / "notes.txt").write_text("not an image")
    return root


# ---------------------------------------------------------------- CK+

# (subject, sequence, frames, emotion code or None for an unlabelled sequence)
CKPLUS_SEQUENCES = [("S005", "001", 3, 3), ("S010", "002", 4, 7), ("S011", "001", 3, None), ("S022", "003", 2, 2),
                    ("S026", "001", 5, 5)]


def make_ckplus(root) -> Path:
    root = Path(root)
    for subject, seq, frames, code in CKPLUS_SEQUENCES:
        for i in range(1, frames + 1):
            write_image(root / "cohn-kanade-images" / subject / seq / f"{subject}_{seq}_{i:08d}.png", mode="L")
        emotion = root / "Emotion" / subject / seq
        emotion.mkdir(parents=True, exist_ok=True)  # CK+ ships empty folders for unlabelled sequences
        if code is not None:
            (emotion / f"{subject}_{seq}_{frames:08d}_emotion.txt").write_text(f"   {code:.7e}\n")
    return root


# ---------------------------------------------------------------- CSV

# (user.id, image, emotion): mixed case, contempt, and Avinash_30.jpg twice with conflicting labels
MUXSPACE_ROWS = [
    ("628", "facial-expressions_2868588k.jpg", "anger"),
    ("628", "facial-expressions_2868585k.jpg", "surprise"),
    ("628", "facial-expressions_2868584k.jpg", "disgust"),
    ("628", "facial-expressions_2868582k.jpg", "fear"),
    ("dwdii", "Aaron_Eckhart_0001.jpg", "neutral"),
    ("dwdii", "Aaron_Guiel_0001.jpg", "happiness"),
    ("jhamski", "Avinash_28.jpg", "HAPPINESS"),
    ("1905:jhamski", "Avinash_30.jpg", "SURPRISE"),
    ("jhamski", "Avinash_31.jpg", "SADNESS"),
    ("jhamski", "Avinash_32.jpg", "contempt"),
    ("1911:jhamski", "Avinash_30.jpg", "SADNESS"),
    ("jhamski", "Avinash_33.jpg", "ANGER"),
]


def make_muxspace(root) -> Path:
    root = Path(root)
    _write_csv(root / "data" / "legend.csv", [list(r) for r in MUXSPACE_ROWS], header=["user.id", "image", "emotion"])
    for _, name, _ in MUXSPACE_ROWS:
        write_image(root / "images" / name, size=(20, 14), mode="L" if name.startswith("Aaron") else "RGB")
    return root


CSV_ROWS = [("img/a.jpg", "happy"), ("img/b.jpg", "Sad"), ("img/c.png", "surprise"), ("img/d.jpg", "contempt")]


def make_csv(root) -> Path:
    """The generic csv manifest's default: labels.csv with image,label columns."""
    root = Path(root)
    _write_csv(root / "labels.csv", [list(r) for r in CSV_ROWS], header=["image", "label"])
    for name, _ in CSV_ROWS:
        write_image(root / name)
    return root


LAYOUT_MAKERS = {
    "rafdb": make_rafdb, "ferplus": make_ferplus, "affectnet": make_affectnet, "affectnet_npy": make_affectnet_npy,
    "sfew": make_sfew, "mma": make_mma, "demo": make_demo, "ckplus": make_ckplus, "ckplus48": make_ckplus48,
    "muxspace": make_muxspace, "folders": make_folders, "csv": make_csv,
}

# What each fixture lists with its built-in manifest's defaults and on_error="skip":
# item count per split, dropped counts, number of problems.
EXPECTED = {
    "rafdb": ({"train": 4, "test": 4}, {}, 0),
    "ferplus": ({"train": 3, "val": 2, "test": 2},
                {"contempt": 1, "no-majority": 4, "not-a-face": 1, "unknown": 1}, 0),
    "affectnet": ({"train": 7, "val": 2}, {"contempt": 2, "none": 1, "unknown": 1, "not-a-face": 1}, 0),
    "affectnet_npy": ({"train": 4, "val": 2}, {"contempt": 1}, 0),
    "sfew": ({"train": 14, "val": 7}, {}, 0),
    "demo": ({"train": 14, "test": 7}, {}, 0),
    "mma": ({"train": 14, "val": 7, "test": 7}, {}, 0),
    "ckplus": ({"all": 3}, {"contempt": 1, "unlabelled": 1}, 0),
    "ckplus48": ({"all": 12}, {"contempt": 2}, 0),
    "muxspace": ({"all": 9}, {"contempt": 1}, 1),
    "folders": ({"all": 8}, {}, 0),
    "csv": ({"all": 3}, {"contempt": 1}, 0),
}
