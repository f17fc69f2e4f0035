"""The one place that owns the class taxonomy and label synonyms.

Every dataset's native labels are mapped through here onto the common 7-class order
of the CAFE paper. Classes outside the seven (contempt, unknown, not-a-face, ...) are
*known* and dropped with a reason; anything else is an error, so a typo in a manifest
or a label file never silently becomes a class.
"""
from __future__ import annotations

import re

CLASSES: tuple[str, ...] = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")
NUM_CLASSES = len(CLASSES)

_SYNONYMS: dict[str, tuple[str, ...]] = {
    "surprise": ("surprise", "surprised", "surprising"),
    "fear": ("fear", "fearful", "afraid", "scared"),
    "disgust": ("disgust", "disgusted"),
    "happiness": ("happiness", "happy", "joy", "happy face"),
    "sadness": ("sadness", "sad"),
    "anger": ("anger", "angry"),
    "neutral": ("neutral", "neutrality", "calm"),
}

# Known labels outside the seven: dropped and counted under the canonical reason.
_DROPPED: dict[str, tuple[str, ...]] = {
    "contempt": ("contempt", "contemptuous"),
    "unknown": ("unknown", "uncertain"),
    "not-a-face": ("not-a-face", "nf", "no-face", "non-face", "noface", "nonface", "not face"),
    "none": ("none", "no expression"),
}


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", " ", str(name).strip().lower()).replace(" - ", "-")


_LOOKUP: dict[str, str] = {}
for _canon, _names in _SYNONYMS.items():
    for _n in _names:
        _LOOKUP[_key(_n)] = _canon
_DROP_LOOKUP: dict[str, str] = {}
for _canon, _names in _DROPPED.items():
    for _n in _names:
        _DROP_LOOKUP[_key(_n)] = _canon


class UnknownLabel(ValueError):
    """A label that is neither one of the seven classes nor a known dropped class."""


def resolve(name: str) -> tuple[int | None, str]:
    """Map a label name to ``(class_index, canonical_name)``.

    For a known class outside the seven returns ``(None, reason)`` (e.g. ``(None, "contempt")``).
    Case, surrounding blanks and ``_``/space differences are ignored: ``HAPPINESS``,
    ``Happy`` and ``happy`` all give ``(3, "happiness")``. Raises :class:`UnknownLabel`.
    """
    key = _key(name)
    if key in _LOOKUP:
        canon = _LOOKUP[key]
        return CLASSES.index(canon), canon
    if key in _DROP_LOOKUP:
        return None, _DROP_LOOKUP[key]
    raise UnknownLabel(
        f"unknown label {name!r}: expected one of {', '.join(CLASSES)} "
        f"(or a synonym such as 'happy', 'sad', 'angry'), or a dropped class "
        f"({', '.join(_DROPPED)})"
    )


def class_index(name: str) -> int:
    """Index of a label in :data:`CLASSES`; raises for dropped or unknown labels."""
    idx, canon = resolve(name)
    if idx is None:
        raise UnknownLabel(f"label {name!r} is the dropped class {canon!r}, not one of {', '.join(CLASSES)}")
    return idx


def map_code(code: str | int, code_map: dict[str, str]) -> tuple[int | None, str]:
    """Resolve a dataset's native code (``"3"``, ``3``, ``"3.0000000e+00"``) through its manifest map."""
    key = str(code).strip()
    if key not in code_map:
        try:  # CK+ writes codes as floats in scientific notation
            f = float(key)
            if f.is_integer():
                key = str(int(f))
        except ValueError:
            pass
    if key not in code_map:
        raise UnknownLabel(f"unknown label code {code!r}: the manifest maps only {sorted(code_map)}")
    return resolve(code_map[key])
