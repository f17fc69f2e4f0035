"""CLIP zero-shot classification from the cached image embeddings: the row every cross-dataset table needs.

Nothing is trained. Each class's prompts (a TOML file: templates filled with the class's words; the
default ships in maskfer/prompts/expressions.toml) are encoded once by the text tower of the checkpoint
that made the store's features (featcache.encoders.text). A class embedding is the prompt ensemble of the
CLIP paper: the mean of the class's L2-normalised prompt embeddings, renormalised. The classifier is then
an ordinary linear layer on L2-normalised image features (maskfer.model.ZeroShotHead) whose weights are
``logit_scale * class embedding`` and whose bias is 0, so its logits are CLIP's ``logits_per_image`` and
evaluation, prediction and the report read it like any other run.
"""
from __future__ import annotations

import hashlib
import string
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from featcache.encoders.text import TextTowerError, load_text_tower
from featcache.taxonomy import CLASSES, UnknownLabel, resolve
from maskfer.errors import TrainError

__all__ = ["DEFAULT_PROMPTS", "ZeroShotError", "Prompts", "load_prompts", "ensemble", "ClassTexts", "class_texts"]

# Shipped beside this module (package data): read by path, so an editable install and a wheel both find it.
DEFAULT_PROMPTS = Path(__file__).with_name("prompts") / "expressions.toml"


class ZeroShotError(TrainError):
    """--method zero-shot cannot run: a bad prompt file, or an encoder without a text tower."""


@dataclass(frozen=True)
class Prompts:
    path: str
    sha256: str                              # of the file's bytes, recorded in the run
    templates: tuple[str, ...]
    by_class: tuple[tuple[str, ...], ...]    # featcache.taxonomy.CLASSES order: each class's filled templates

    def flat(self) -> list[str]:
        """Every prompt, class-major (class 0's templates, then class 1's, ...): what :func:`ensemble` expects."""
        return [p for ps in self.by_class for p in ps]


def load_prompts(path: str | Path | None = None) -> Prompts:
    """The class prompts of a TOML file (default :data:`DEFAULT_PROMPTS`): ``templates`` (a list of strings
    with ``{field}`` placeholders) and one table per class under ``[classes]`` (its name: a class of
    featcache.taxonomy or a synonym) whose string fields fill the placeholders. ZeroShotError naming the file
    and the key otherwise."""
    p = Path(path) if path else DEFAULT_PROMPTS
    try:
        raw = p.read_bytes()
        doc = tomllib.loads(raw.decode("utf-8"))
    except OSError as e:
        raise ZeroShotError(f"--prompts {p}: cannot read the prompt file: {e.strerror or e}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ZeroShotError(f"--prompts {p}: not valid TOML: {e}") from None
    unknown = sorted(set(doc) - {"templates", "classes"})
    if unknown:
        raise ZeroShotError(f"--prompts {p}: unknown key(s) {', '.join(unknown)}; a prompt file has 'templates' "
                            "and a [classes] table (see maskfer/prompts/expressions.toml)")
    templates = doc.get("templates")
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) and t.strip() for t in templates):
        raise ZeroShotError(f"--prompts {p}: 'templates' must be a non-empty list of strings, e.g. "
                            "[\"a photo of a {adjective} face.\"]")
    fields = {t: [f for _, f, _, _ in string.Formatter().parse(t) if f is not None] for t in templates}
    bad = [(t, f) for t, fs in fields.items() for f in fs if not f.isidentifier()]
    if bad:
        raise ZeroShotError(f"--prompts {p}: template {bad[0][0]!r}: placeholder {{{bad[0][1]}}} is not a field name")
    tables = doc.get("classes")
    if not isinstance(tables, dict):
        raise ZeroShotError(f"--prompts {p}: no [classes] table (one [classes.NAME] table per class: "
                            f"{', '.join(CLASSES)})")
    words: dict[int, dict] = {}
    for name, table in tables.items():
        try:
            idx, canon = resolve(name)
        except UnknownLabel as e:
            raise ZeroShotError(f"--prompts {p}: [classes.{name}]: {e}") from None
        if idx is None:
            raise ZeroShotError(f"--prompts {p}: [classes.{name}] is the dropped class {canon!r}, not one of "
                                f"{', '.join(CLASSES)}")
        if idx in words:
            raise ZeroShotError(f"--prompts {p}: [classes.{name}] names class {canon!r} a second time")
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise ZeroShotError(f"--prompts {p}: [classes.{name}] must be a table of strings, e.g. "
                                "adjective = \"happy\"")
        words[idx] = table
    missing = [c for i, c in enumerate(CLASSES) if i not in words]
    if missing:
        raise ZeroShotError(f"--prompts {p}: no [classes.NAME] table for {', '.join(missing)}")
    by_class = []
    for i, c in enumerate(CLASSES):
        lacking = sorted({f for fs in fields.values() for f in fs} - set(words[i]))
        if lacking:
            t = next(t for t, fs in fields.items() if lacking[0] in fs)
            raise ZeroShotError(f"--prompts {p}: template {t!r} needs {{{lacking[0]}}}, which [classes.{c}] does not "
                                "define")
        by_class.append(tuple(t.format(**words[i]) for t in templates))
    return Prompts(str(p), hashlib.sha256(raw).hexdigest(), tuple(templates), tuple(by_class))


def ensemble(embeds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Prompt ensemble (CLIP paper): (num_classes * T, D) class-major prompt embeddings -> (num_classes, D) unit
    class embeddings, each the renormalised mean of its T L2-normalised prompt embeddings."""
    unit = F.normalize(embeds.float(), dim=-1)
    return F.normalize(unit.reshape(num_classes, -1, unit.shape[-1]).mean(1), dim=-1)


@dataclass
class ClassTexts:
    weight: torch.Tensor       # (L, D): logit_scale * unit class embedding, the head's fc.weight
    logit_scale: float
    prompts: Prompts
    source: str                # the checkpoint the text tower came from


def class_texts(enc_info: dict, prompts: Prompts, device: str | torch.device = "cpu") -> ClassTexts:
    """The zero-shot classifier of a store's encoder (``enc_info``: maskfer.data.load_split's encoder record,
    its ``metadata`` the store's encoder metadata). ZeroShotError when the encoder has no text tower."""
    meta = enc_info.get("metadata") or {}
    try:
        tower = load_text_tower(meta, device, name=enc_info.get("key"))
    except TextTowerError as e:
        raise ZeroShotError(f"--method zero-shot: {e}") from None
    cls = ensemble(torch.from_numpy(tower.encode(prompts.flat())), len(CLASSES))
    return ClassTexts(tower.logit_scale * cls, tower.logit_scale, prompts, tower.source)
