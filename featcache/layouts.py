"""Layout readers: one function per way a dataset ships its images and labels.

A reader turns a dataset root into :class:`Row` records (one per label row, per image of a
folder layout, or per unlabelled sequence) without opening any image. Readers know file
formats, not classes: labels stay native (a code such as ``"5"`` or a name such as
``"HAPPINESS"``) and :mod:`featcache.manifests` resolves them through the manifest's
``[labels]`` table and :mod:`featcache.taxonomy`, checks that images exist, merges
duplicates and sorts. A new kind is one decorated function; nothing dispatches on kinds.
"""
from __future__ import annotations

import csv
import errno
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import numpy as np

IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"]


class LayoutError(Exception):
    """The root does not look like the layout: a missing file or folder, an unusable header."""


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()  # default of a param every manifest must set


@dataclass(frozen=True)
class Row:
    where: str                       # "label/file.csv:17", an annotation file, or the image itself
    image: str | None                # POSIX path relative to the root; None if the row names no image
    split: str
    label: str | None = None         # native label, resolved later
    box: tuple[int, int, int, int] | None = None
    dropped: str | None = None       # the layout itself drops the row (FERPlus vote rule, "no-image")
    problem: str | None = None       # malformed row


@dataclass(frozen=True)
class Layout:
    kind: str
    read: Callable[[Path, dict], Iterator[Row]]
    defaults: dict                   # every param the kind accepts -> default (or REQUIRED)
    choices: dict                    # param -> allowed values
    types: dict                      # param -> accepted types where the default's type is too narrow
    needs_labels: bool               # native labels are codes: the manifest must map them
    summary: str                     # expected tree in one line, for wrong-root messages


LAYOUTS: dict[str, Layout] = {}


def layout(kind: str, *, summary: str, defaults: dict | None = None, choices: dict | None = None,
           types: dict | None = None, needs_labels: bool = False):
    """Register a reader ``read(root, params) -> Iterator[Row]`` under ``kind``."""
    def register(read):
        LAYOUTS[kind] = Layout(kind, read, dict(defaults or {}), dict(choices or {}), dict(types or {}),
                               needs_labels, summary)
        return read
    return register


# ---------------------------------------------------------------- helpers

def _require(root: Path, rel: str, folder: bool = False) -> Path:
    path = root / rel
    if not (path.is_dir() if folder else path.is_file()):
        raise LayoutError(f"missing {'folder' if folder else 'file'} '{rel}' under root {root}")
    return path


def _rel(*parts) -> str | None:
    """POSIX id relative to the root; None for a path that would escape it (``../x.jpg``, ``/x.jpg``)."""
    path = PurePosixPath(*[str(p).replace("\\", "/") for p in parts if str(p)])
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path.as_posix()


def _dirs(folder: Path) -> list[Path]:
    # Hidden folders (.ipynb_checkpoints, __MACOSX leftovers start with "__") are never classes.
    return sorted(e for e in folder.iterdir() if e.is_dir() and not e.name.startswith((".", "__")))


def broken_link(path: Path) -> str | None:
    """Why the symbolic link ``path`` cannot be followed (a loop, a missing target), or None when it can
    (or is no link). Such an entry is reported as a problem of its own, never hiding its neighbours."""
    try:
        if not path.is_symlink():
            return None
        path.stat()
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop: following the link leads back to it; fix or remove the link"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return f"dangling symbolic link to {target!r} (the target does not exist); fix or remove the link"
        return f"symbolic link cannot be followed ({e.strerror}); fix or remove the link"


def _listdir(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Sorted regular files of a folder, and its broken symbolic links with the reason for each."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return [], []
    files, broken = [], []
    for e in entries:
        if e.is_file():  # follows links; False (never an error) for a loop or a dangling link
            files.append(e)
        elif (why := broken_link(e)) is not None:
            broken.append((e, why))
    return files, broken


def _files(folder: Path) -> list[Path]:
    return _listdir(folder)[0]


def _csv_rows(path: Path, delimiter: str = ",") -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) of each non-blank record; utf-8-sig because spreadsheets add a BOM."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            for cells in reader:
                if any(c.strip() for c in cells):
                    yield reader.line_num, cells
    except UnicodeDecodeError as e:
        raise LayoutError(f"{path} is not UTF-8 text ({e})") from None
    except csv.Error as e:
        raise LayoutError(f"{path}: unreadable CSV ({e})") from None


def _box(cells: list[str]) -> tuple[int, int, int, int]:
    x, y, w, h = (int(float(c)) for c in cells)
    if w <= 0 or h <= 0:
        raise ValueError(f"empty face box {(x, y, w, h)}")
    return x, y, w, h


# ---------------------------------------------------------------- RAF-DB

@layout("raf_basic", needs_labels=True,
        summary="EmoLabel/list_patition_label.txt ('train_00001.jpg 5') and Image/aligned/<name>_aligned.jpg",
        defaults={"label_file": "EmoLabel/list_patition_label.txt", "image_dir": "Image/aligned",
                  "image_suffix": "_aligned"})
def read_raf_basic(root: Path, p: dict) -> Iterator[Row]:
    label_file = _require(root, p["label_file"])
    _require(root, p["image_dir"], folder=True)
    with open(label_file, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    for number, line in enumerate(lines, 1):
        cells = line.split()
        if not cells:
            continue
        where = f"{label_file}:{number}"
        if len(cells) != 2:
            yield Row(where, None, "", problem=f"malformed line {line.strip()!r}: expected '<image name> <code>'")
            continue
        name, code = cells
        stem, dot, ext = name.rpartition(".")
        split = stem.split("_")[0]
        image = _rel(p["image_dir"], f"{stem}{p['image_suffix']}.{ext}") if dot else None
        if split not in ("train", "test") or image is None:
            yield Row(where, image, "", problem=f"malformed image name {name!r}: expected train_*.jpg or test_*.jpg")
            continue
        yield Row(where, image, split, label=code)


# ---------------------------------------------------------------- FERPlus

FERPLUS_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear",
                   "contempt", "unknown", "NF")
FER2013_USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}


def ferplus_vote(votes, rule: str = "majority") -> np.ndarray:
    """Winner of each row of FERPlus vote counts ``(n, 10)``: a column name or the drop reason.

    ``majority`` is FERPlus's reference rule: single votes are outliers and become 0, then the
    top column needs strictly more than half of the remaining votes ("no-majority" otherwise).
    ``plurality``: the unique arg-max of the raw counts ("tie" otherwise).
    """
    votes = np.asarray(votes, dtype=np.int64).reshape(-1, len(FERPLUS_COLUMNS))
    if rule == "majority":
        votes = np.where(votes > 1, votes, 0)
        best = votes.max(1)
        won, failure = 2 * best > votes.sum(1), "no-majority"
    elif rule == "plurality":
        best = votes.max(1)
        won, failure = (votes == best[:, None]).sum(1) == 1, "tie"
    else:
        raise ValueError(f"unknown FERPlus vote rule {rule!r}: use majority or plurality")
    return np.where(won, np.asarray(FERPLUS_COLUMNS)[votes.argmax(1)], failure)


def _ferplus_label_csv(root: Path, p: dict) -> Iterator[tuple]:
    files = {split: _require(root, f"{folder}/{p['label_file']}") for split, folder in p["folders"].items()}
    for split, path in files.items():
        for number, cells in _csv_rows(path):
            name = cells[0].strip()
            problem = None if name and len(cells) == 12 else "expected '<png>,\"(x, y, w, h)\",<10 vote counts>'"
            yield f"{path}:{number}", split, _rel(p["folders"][split], name) if name else None, cells[2:], problem


def _ferplus_fer2013new(root: Path, p: dict) -> Iterator[tuple]:
    path = _require(root, p["fer2013new"])
    for folder in p["folders"].values():
        _require(root, folder, folder=True)
    for number, cells in _csv_rows(path):
        usage = cells[0].strip()
        if number == 1 and usage.lower() == "usage":
            continue
        split = FER2013_USAGE.get(usage)
        if split not in p["folders"]:
            problem = None if split else f"unknown Usage {usage!r}: expected {', '.join(FER2013_USAGE)}"
            if problem:
                yield f"{path}:{number}", "", None, [], problem
            continue  # a split the manifest leaves out
        name = cells[1].strip() if len(cells) > 1 else ""
        problem = None if len(cells) == 12 else "expected 'Usage,Image name,<10 vote counts>'"
        image = _rel(p["folders"][split], name) if name else ""  # "": FER2013 image FERPlus did not export
        yield f"{path}:{number}", split, image, cells[2:], problem


@layout("ferplus",
        summary="data/FER2013{Train,Valid,Test}/label.csv ('<png>,(0, 0, 48, 48),<10 votes>') beside the PNGs, "
                "or fer2013new.csv with source=fer2013new",
        defaults={"source": "label_csv", "vote_rule": "majority",
                  "folders": {"train": "data/FER2013Train", "val": "data/FER2013Valid", "test": "data/FER2013Test"},
                  "label_file": "label.csv", "fer2013new": "fer2013new.csv"},
        choices={"source": ("label_csv", "fer2013new"), "vote_rule": ("majority", "plurality")})
def read_ferplus(root: Path, p: dict) -> Iterator[Row]:
    source = _ferplus_label_csv if p["source"] == "label_csv" else _ferplus_fer2013new
    rows, votes = [], []
    for where, split, image, cells, problem in source(root, p):
        if problem is None and image is None:
            problem = "image name escapes the dataset root"
        if problem is None:
            try:
                votes.append([int(c) for c in cells])
            except ValueError:
                problem = f"vote counts must be integers, got {','.join(cells)!r}"
        rows.append((where, split, image, problem))
    winners = iter(ferplus_vote(np.array(votes, dtype=np.int64).reshape(-1, 10), p["vote_rule"]).tolist())
    for where, split, image, problem in rows:
        if problem is not None:
            yield Row(where, image or None, split, problem=f"malformed row: {problem}")
            continue
        winner = next(winners)
        if image == "":
            yield Row(where, None, split, dropped="no-image")
        elif winner in FERPLUS_COLUMNS:
            yield Row(where, image, split, label=winner)
        else:
            yield Row(where, image, split, dropped=winner)


# ---------------------------------------------------------------- AffectNet

AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                     "facial_landmarks", "expression", "valence", "arousal")


@layout("affectnet_csv", needs_labels=True,
        summary="Manually_Annotated_file_lists/{training,validation}.csv and Manually_Annotated_Images/<subDirectory_filePath>",
        defaults={"csv": {"train": "Manually_Annotated_file_lists/training.csv",
                          "val": "Manually_Annotated_file_lists/validation.csv"},
                  "image_dir": "Manually_Annotated_Images"})
def read_affectnet_csv(root: Path, p: dict) -> Iterator[Row]:
    files = {split: _require(root, rel) for split, rel in p["csv"].items()}
    _require(root, p["image_dir"], folder=True)
    wanted = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression")
    for split, path in files.items():
        columns = None
        for number, cells in _csv_rows(path):
            if columns is None:
                # Copies of validation.csv circulate with and without the header row.
                header = [c.strip() for c in cells]
                if header[0] == AFFECTNET_COLUMNS[0]:
                    missing = [c for c in wanted if c not in header]
                    if missing:
                        raise LayoutError(f"{path}: header lacks column(s) {', '.join(missing)}")
                    columns = [header.index(c) for c in wanted]
                    continue
                columns = [AFFECTNET_COLUMNS.index(c) for c in wanted]
            where = f"{path}:{number}"
            try:
                name, x, y, w, h, code = (cells[i].strip() for i in columns)
                box = _box([x, y, w, h])
            except (IndexError, ValueError, OverflowError) as e:
                yield Row(where, None, split, problem=f"malformed row ({e})")
                continue
            image = _rel(p["image_dir"], name)
            if image is None:
                yield Row(where, None, split, problem=f"image path {name!r} escapes the dataset root")
            else:
                yield Row(where, image, split, label=code, box=box)


def _npy_label(path: Path) -> str:
    value = np.load(path, allow_pickle=False)  # never unpickle files from a download
    if value.size != 1:
        raise ValueError(f"expected one value, got shape {value.shape}")
    value = value.reshape(()).item()
    return value.decode() if isinstance(value, bytes) else str(value)


@layout("affectnet_npy", needs_labels=True,
        summary="{train_set,val_set}/images/<id>.jpg with {train_set,val_set}/annotations/<id>_exp.npy",
        defaults={"sets": {"train": "train_set", "val": "val_set"}, "image_ext": ".jpg"})
def read_affectnet_npy(root: Path, p: dict) -> Iterator[Row]:
    for split, folder in p["sets"].items():
        images = _require(root, f"{folder}/images", folder=True)
        annotations = _require(root, f"{folder}/annotations", folder=True)
        labelled = set()
        for path in _files(annotations):
            if not path.name.endswith("_exp.npy"):
                continue  # _val/_aro/_lnd: valence, arousal and landmarks are not used
            stem = path.name[: -len("_exp.npy")]
            labelled.add(stem)
            image = _rel(folder, "images", stem + p["image_ext"])
            try:
                yield Row(str(path), image, split, label=_npy_label(path))
            except (OSError, ValueError) as e:
                yield Row(str(path), image, split, problem=f"unreadable expression annotation ({e})")
        for path in _files(images):
            if path.suffix.lower() == p["image_ext"].lower() and path.stem not in labelled:
                yield Row(str(path), None, split, dropped="unlabelled")


# ---------------------------------------------------------------- class folders and CSV

@layout("folders",
        summary="<split folder>/<class>/<image> (split_dirs), or <class>/<image> directly under the root",
        defaults={"split_dirs": {}, "extensions": IMAGE_EXTENSIONS})
def read_folders(root: Path, p: dict) -> Iterator[Row]:
    extensions = {"." + e.lower().lstrip(".") for e in p["extensions"]}
    bases = {split: _require(root, sub, folder=True) for split, sub in p["split_dirs"].items()}
    found = False
    for split, base in (bases or {"all": root}).items():
        for class_dir in _dirs(base):
            files, broken = _listdir(class_dir)
            for path in files:
                if path.suffix.lower() in extensions:
                    found = True
                    yield Row(str(path), path.relative_to(root).as_posix(), split, label=class_dir.name)
            for path, why in broken:  # a link named like an image that cannot be read: say so, by name
                if path.suffix.lower() in extensions:
                    yield Row(str(path), path.relative_to(root).as_posix(), split, problem=why)
    if not found:
        where = ", ".join(f"'{s}'" for s in p["split_dirs"].values()) or "the root"
        raise LayoutError(f"no images ({', '.join(sorted(extensions))}) in class folders under {where} of root {root}")


def _column(spec, header: list[str] | None, path: Path, what: str) -> int:
    if header is not None and str(spec).strip() in header:
        return header.index(str(spec).strip())
    if isinstance(spec, int) or str(spec).strip().isdigit():
        return int(spec)
    raise LayoutError(f"{path}: no column {spec!r} for the {what}; the header has {', '.join(header or [])}")


@layout("csv",
        summary="a CSV file of image,label[,split] rows with the images under image_dir",
        defaults={"file": "labels.csv", "image_column": "image", "label_column": "label", "split_column": "",
                  "split": "all", "image_dir": "", "delimiter": ",", "has_header": True},
        types={k: (str, int) for k in ("image_column", "label_column", "split_column")})  # name or 0-based index
def read_csv(root: Path, p: dict) -> Iterator[Row]:
    path = _require(root, p["file"])
    if p["image_dir"]:
        _require(root, p["image_dir"], folder=True)
    delimiter = {"\\t": "\t", "tab": "\t"}.get(p["delimiter"], p["delimiter"])
    columns = None
    for number, cells in _csv_rows(path, delimiter):
        if columns is None:
            header = [c.strip() for c in cells] if p["has_header"] else None
            columns = [_column(p[k], header, path, k.replace("_", " ")) if p[k] != "" else None
                       for k in ("image_column", "label_column", "split_column")]
            if p["has_header"]:
                continue
        where = f"{path}:{number}"
        try:
            name, label, split = (cells[i].strip() if i is not None else p["split"] for i in columns)
        except IndexError:
            yield Row(where, None, "", problem=f"malformed row: {len(cells)} column(s)")
            continue
        image = _rel(p["image_dir"], name) if name else None
        if image is None:
            yield Row(where, None, split, problem=f"bad image name {name!r}")
        else:
            yield Row(where, image, split, label=label)


# ---------------------------------------------------------------- CK+

@layout("ckplus", needs_labels=True,
        summary="cohn-kanade-images/S005/001/S005_001_00000011.png with Emotion/S005/001/S005_001_00000011_emotion.txt",
        defaults={"image_dir": "cohn-kanade-images", "emotion_dir": "Emotion", "neutral_first_frame": False,
                  "image_ext": ".png"})
def read_ckplus(root: Path, p: dict) -> Iterator[Row]:
    images = _require(root, p["image_dir"], folder=True)
    emotions = _require(root, p["emotion_dir"], folder=True)
    labelled = set()
    for subject in _dirs(emotions):
        for sequence in _dirs(subject):
            for path in _files(sequence):
                if not path.name.endswith("_emotion.txt"):
                    continue
                labelled.add((subject.name, sequence.name))
                peak = path.name[: -len("_emotion.txt")] + p["image_ext"]
                image = _rel(p["image_dir"], subject.name, sequence.name, peak)
                code = path.read_text(encoding="utf-8", errors="replace").split()
                if len(code) != 1:
                    yield Row(str(path), image, "all", problem="malformed emotion file: expected one code")
                    continue
                yield Row(str(path), image, "all", label=code[0])
                frames = [f.name for f in _files(images / subject.name / sequence.name)
                          if f.suffix.lower() == p["image_ext"].lower()]
                if p["neutral_first_frame"] and frames and frames[0] != peak:
                    # Sequences start from a neutral face: the classic way to get CK+ neutrals.
                    yield Row(str(path), _rel(p["image_dir"], subject.name, sequence.name, frames[0]), "all",
                              label="neutral")
    for subject in _dirs(images):
        for sequence in _dirs(subject):
            if (subject.name, sequence.name) not in labelled:
                yield Row(str(sequence), None, "all", dropped="unlabelled")
