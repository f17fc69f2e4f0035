"""Manifests: declarative TOML files that say how to list a dataset's labelled images.

A manifest names a layout ``kind`` (a reader in :mod:`featcache.layouts`), its ``[params]``
and a ``[labels]`` map from native codes to taxonomy names. :func:`list_items` turns a
manifest and a dataset root into a sorted :class:`Listing`, resolving every label through
:mod:`featcache.taxonomy` and reporting each bad row as a :class:`Problem` that names its
file and line. See docs/manifests.md.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import data_manifests
from featcache import taxonomy
from featcache.errors import FerError
from featcache.layouts import LAYOUTS, REQUIRED, Layout, LayoutError, Row, broken_link

BUILTIN_DIR = Path(data_manifests.__file__).parent
_TOP_KEYS = ("name", "kind", "description", "params", "labels")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


class ManifestError(FerError):
    """A manifest or a dataset that cannot be listed; the message names the file (and row)."""


@dataclass(frozen=True)
class Item:
    id: str                      # POSIX path of the image relative to the dataset root: stable, unique
    path: Path                   # absolute path of the image file
    label: int                   # index into taxonomy.CLASSES
    split: str                   # "train", "val", "test" or "all" (no split in the dataset)
    box: tuple[int, int, int, int] | None = None   # (x, y, w, h) face box to crop, or None


@dataclass(frozen=True)
class Problem:
    where: str                   # "path/to/label.csv:17" or "path/to/image.jpg"
    item_id: str | None
    reason: str                  # human sentence


@dataclass
class Listing:
    items: list[Item]            # sorted by split, then id
    dropped: dict[str, int]      # reason -> count ("contempt", "unknown", "no-majority", "duplicate-row", ...)
    problems: list[Problem]      # rows skipped with on_error="skip"


@dataclass(frozen=True)
class Manifest:
    name: str
    kind: str
    params: dict                 # every param of the kind: defaults, then the file, then overrides
    labels: dict[str, str]
    path: Path
    sha256: str                  # over kind, params and labels: changes whenever the listing may
    description: str


def builtin_manifests() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def parse_overrides(pairs) -> dict[str, str]:
    """``["vote_rule=plurality", "split_dirs.val=Valid"]`` (CLI ``--param``) -> dict."""
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ManifestError(f"--param {pair!r}: expected key=value")
        out[key.strip()] = value
    return out


def load_manifest(name_or_path: str | os.PathLike, overrides: dict | None = None) -> Manifest:
    """Load a built-in manifest by name (``"rafdb"``) or a TOML file by path, applying overrides.

    A value containing a path separator or ending in ``.toml`` is a path; anything else a built-in name.
    Override values are CLI strings (typed like the param they replace) or already-typed values,
    so a stored ``Manifest.params`` reloads to the same manifest and sha256.
    """
    path = _manifest_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{path}: not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read the manifest: {e}") from None
    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown:
        raise ManifestError(f"{path}: unknown key(s) {', '.join(unknown)}; a manifest has {', '.join(_TOP_KEYS)}")
    missing = [k for k in ("name", "kind") if not isinstance(raw.get(k), str) or not raw[k].strip()]
    if missing:
        raise ManifestError(f"{path}: missing key(s) {', '.join(missing)} (a string each)")
    layout = LAYOUTS.get(raw["kind"])
    if layout is None:
        raise ManifestError(f"{path}: unknown kind {raw['kind']!r}; known kinds: {', '.join(sorted(LAYOUTS))}")
    params = _params(path, layout, raw.get("params", {}), overrides or {})
    labels = _labels(path, layout, raw.get("labels", {}))
    canonical = json.dumps({"kind": layout.kind, "params": params, "labels": labels}, sort_keys=True)
    return Manifest(name=raw["name"], kind=layout.kind, params=params, labels=labels, path=path,
                    sha256=hashlib.sha256(canonical.encode()).hexdigest(),
                    description=str(raw.get("description", "")))


def list_items(manifest: Manifest, root: str | os.PathLike,
               on_error: Literal["fail", "skip"] = "fail") -> Listing:
    """List the labelled images of the dataset at ``root``; never opens an image.

    With ``on_error="fail"`` any problem raises :class:`ManifestError` naming the first one;
    with ``"skip"`` the bad rows are left out and returned in ``Listing.problems``.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    layout = LAYOUTS[manifest.kind]
    root = Path(root).expanduser().absolute()
    expected = f"expected the '{manifest.name}' layout (kind {manifest.kind}): {layout.summary}"
    if not root.is_dir():
        raise ManifestError(f"{manifest.path}: dataset root {root} is not a folder; {expected}")
    try:
        rows = list(layout.read(root, manifest.params))
    except LayoutError as e:
        raise ManifestError(f"{manifest.path}: {e}; {expected}") from None
    listing = _collect(rows, root, manifest.labels)
    if listing.problems and on_error == "fail":
        first, n = listing.problems[0], len(listing.problems)
        raise ManifestError(
            f"{first.where}: {first.reason} ({n} problem{'s' if n > 1 else ''} in total listing "
            f"'{manifest.name}' under {root}; rerun with --on-error skip to leave those rows out)")
    return listing


# ---------------------------------------------------------------- loading

def _manifest_path(name_or_path) -> Path:
    text = os.fspath(name_or_path)
    if text.endswith(".toml") or "/" in text or os.sep in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ManifestError(f"{path}: manifest file not found")
        return path.absolute()
    path = BUILTIN_DIR / f"{text}.toml"
    if not path.is_file():
        raise ManifestError(f"no built-in manifest {text!r} (in {BUILTIN_DIR}); built-in: "
                            f"{', '.join(builtin_manifests())}; or pass the path of a .toml file")
    return path


def _params(path: Path, layout: Layout, given, overrides: dict) -> dict:
    if not isinstance(given, dict):
        raise ManifestError(f"{path}: [params] must be a table")
    known = ", ".join(sorted(layout.defaults))
    unknown = sorted(set(given) - set(layout.defaults))
    if unknown:
        raise ManifestError(f"{path}: unknown param(s) {', '.join(unknown)} for kind {layout.kind}; known: {known}")
    params = copy.deepcopy(layout.defaults)
    params.update(copy.deepcopy(given))  # a table replaces the default table: the manifest says exactly which splits
    for key, value in overrides.items():
        where = f"{path}: --param {key}={value}"
        head, dot, sub = key.partition(".")
        if head not in params:
            raise ManifestError(f"{where}: unknown param {head!r} for kind {layout.kind}; known: {known}")
        if dot:
            if not isinstance(params[head], dict):
                raise ManifestError(f"{where}: {head} is not a table")
            params[head][sub] = _parse_value(where, value, params[head].get(sub, ""))
        elif isinstance(params[head], dict) and isinstance(value, str):
            raise ManifestError(f"{where}: {head} is a table; set its entries with {head}.<key>=<value>")
        else:
            params[head] = _parse_value(where, value, params[head])
    for key, default in layout.defaults.items():
        value = params[key]
        if value is REQUIRED:
            raise ManifestError(f"{path}: missing param {key!r} (kind {layout.kind} needs it)")
        types = layout.types.get(key, (type(default),))
        if default is not REQUIRED and not _of_type(value, types):
            raise ManifestError(f"{path}: param {key} = {value!r} must be a {' or '.join(t.__name__ for t in types)}")
        if key in layout.choices and value not in layout.choices[key]:
            raise ManifestError(f"{path}: param {key} = {value!r}; choose one of {', '.join(layout.choices[key])}")
    return params


def _of_type(value, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) != (bool in types):  # bool is an int to isinstance; not to a manifest
        return False
    if isinstance(value, dict):
        return dict in types and all(isinstance(v, str) for v in value.values())
    if isinstance(value, list):
        return list in types and all(isinstance(v, str) for v in value)
    return isinstance(value, types)


def _parse_value(where: str, text, like):
    """Type a CLI string like the value it replaces; with nothing to go by, guess bool, int, then str."""
    if not isinstance(text, str):
        return text
    word = text.strip().lower()
    if isinstance(like, bool) or (like is REQUIRED and word in ("true", "false")):
        if word in _TRUE + _FALSE:
            return word in _TRUE
        raise ManifestError(f"{where}: expected true or false")
    if isinstance(like, int) or (like is REQUIRED and word.lstrip("-").isdigit()):
        try:
            return int(word)
        except ValueError:
            raise ManifestError(f"{where}: expected an integer") from None
    if isinstance(like, list):
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def _labels(path: Path, layout: Layout, labels) -> dict[str, str]:
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise ManifestError(f"{path}: [labels] must be a table of native label = \"taxonomy name\"")
    if layout.needs_labels and not labels:
        raise ManifestError(f"{path}: kind {layout.kind} has numeric codes; the manifest needs a [labels] table")
    for native, name in labels.items():
        try:
            taxonomy.resolve(name)
        except taxonomy.UnknownLabel as e:
            raise ManifestError(f"{path}: [labels] {native} = {name!r}: {e}") from None
    return dict(labels)


# ---------------------------------------------------------------- listing

def _resolver(labels: dict[str, str]):
    """Cached native label -> (index | None, canonical); the map first, then the taxonomy by name."""
    cache: dict[str, tuple | Exception] = {}

    def resolve(native: str):
        if native not in cache:
            try:
                cache[native] = taxonomy.map_code(native, labels) if labels else taxonomy.resolve(native)
            except taxonomy.UnknownLabel as e:
                try:
                    cache[native] = taxonomy.resolve(native) if labels else e
                except taxonomy.UnknownLabel:
                    cache[native] = taxonomy.UnknownLabel(
                        f"unknown label {native!r}: not in the manifest's [labels] "
                        f"({', '.join(sorted(labels))}) and not a class name")
        if isinstance(cache[native], Exception):
            raise cache[native]
        return cache[native]
    return resolve


class _FileSet:
    """Existence checks by listing each folder once: one readdir instead of a stat per image.

    Each entry is checked on its own: a symbolic link loop (is_file raises ELOOP) or a dangling link is
    recorded with its reason and never hides the other files of its folder."""

    def __init__(self):
        self._names: dict[Path, dict[str, str | None]] = {}  # folder -> name -> None (a file) or why not

    def _folder(self, folder: Path) -> dict[str, str | None]:
        names = self._names.get(folder)
        if names is None:
            names = {}
            try:
                with os.scandir(folder) as entries:
                    for e in entries:
                        try:
                            if e.is_file():
                                names[e.name] = None
                                continue
                        except OSError:
                            pass
                        why = broken_link(Path(e.path))
                        if why is not None:
                            names[e.name] = why
            except OSError:
                pass
            self._names[folder] = names
        return names

    def __contains__(self, path: Path) -> bool:
        names = self._folder(path.parent)
        return path.name in names and names[path.name] is None

    def why_not(self, path: Path) -> str | None:
        """The reason a listed name is not a readable file (a broken link), or None."""
        return self._folder(path.parent).get(path.name)


def _collect(rows: list[Row], root: Path, labels: dict[str, str]) -> Listing:
    resolve = _resolver(labels)
    dropped: Counter = Counter()
    problems: list[tuple[int, Problem]] = []
    groups: dict[str, list[tuple[int, Row, tuple]]] = {}  # image id -> (row order, row, (index, name))
    for seq, row in enumerate(rows):
        if row.problem:
            problems.append((seq, Problem(row.where, row.image, row.problem)))
        elif row.image is None:
            dropped[row.dropped or "unlabelled"] += 1
        else:
            try:
                outcome = (None, row.dropped) if row.dropped else resolve(row.label)
            except taxonomy.UnknownLabel as e:
                problems.append((seq, Problem(row.where, row.image, str(e))))
                continue
            groups.setdefault(row.image, []).append((seq, row, outcome))

    files, items = _FileSet(), []
    for image, entries in groups.items():
        seq, row, outcome = entries[0]
        if len(entries) > 1:
            if len({(o, r.split, r.box) for _, r, o in entries}) > 1:
                problems.append((seq, Problem(row.where, image, _conflict(image, entries))))
                continue
            dropped["duplicate-row"] += len(entries) - 1
        index, name = outcome
        if index is None:
            dropped[name] += 1
        elif root / image in files:
            items.append(Item(image, root / image, index, row.split, row.box))
        elif (why := files.why_not(root / image)) is not None:
            problems.append((seq, Problem(row.where, image, f"image file {image} under {root}: {why}")))
        else:
            problems.append((seq, Problem(row.where, image, f"image file {image} is missing under {root}")))
    items.sort(key=lambda it: (it.split, it.id))
    problems.sort(key=lambda t: t[0])
    return Listing(items, dict(sorted(dropped.items())), [p for _, p in problems])


def _conflict(image: str, entries) -> str:
    def says(row: Row) -> str:
        text = f"{row.where} says {row.label if row.label is not None else row.dropped}"
        if len({r.split for _, r, _ in entries}) > 1:
            text += f" ({row.split})"
        if len({r.box for _, r, _ in entries}) > 1:
            text += f" (box {row.box})"
        return text
    return (f"{image} is listed {len(entries)} times with conflicting labels: "
            f"{'; '.join(says(r) for _, r, _ in entries)}; the image is left out")


def manifest_record(m: Manifest) -> dict:
    """What a store keeps of a manifest: enough to list the dataset again without the file."""
    return {"name": m.name, "kind": m.kind, "params": m.params, "labels": m.labels, "path": str(m.path),
            "sha256": m.sha256}


def manifest_from_record(record: dict) -> Manifest:
    """Rebuild the Manifest a store was built from (works for user-written manifests that moved)."""
    kind = record["kind"]
    if kind not in LAYOUTS:
        raise ManifestError(f"stored manifest {record.get('name')!r} has unknown kind {kind!r}")
    canonical = json.dumps({"kind": kind, "params": record["params"], "labels": record["labels"]}, sort_keys=True)
    return Manifest(name=record["name"], kind=kind, params=dict(record["params"]), labels=dict(record["labels"]),
                    path=Path(record.get("path", "")), sha256=hashlib.sha256(canonical.encode()).hexdigest(),
                    description="")
