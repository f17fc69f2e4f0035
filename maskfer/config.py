"""Training configuration: one dataclass, the paper's defaults, validation, and identity.

The defaults are CAFE's (ECCV 2024): Adam 2e-4, weight decay 1e-4, ExponentialLR 0.9 per
epoch, 60 epochs, batch 32, 224 px, flip + random erasing, lambda 1.5, beta 5, drop 10.

Each field is declared once, here: its type and default, and an :class:`Option` with its help, its
flag spelling, its choices or range and its roles (identity, per-model, data, sweep axis). The CLI
options of ``maskfer train`` / ``maskfer sweep``, the sweep's axes, ``--config`` files, validation and
the defaults table of docs/training.md (``python -m maskfer.config --markdown``) all derive from it.
Stdlib only: the CLI imports this module at start-up.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from featcache.errors import FerError
from maskfer.methods import get_method, method_names
from maskfer.weights import is_remote_pretrained

METHODS = method_names()
FEATURE_NORMS = ("none", "standardize")


class ConfigError(FerError, ValueError):  # ValueError: callers catch bad values as one
    """A bad option value; ``field`` names the TrainConfig field when there is one."""

    def __init__(self, msg: str, field: str | None = None):
        super().__init__(msg)
        self.field = field


# ---------------------------------------------------------------------------- the declaration
AS_OLD_AS_THE_FORMAT = "<as old as the format>"  # Option.legacy of a field every recorded config has


@dataclass(frozen=True)
class Option:
    """Everything about one TrainConfig field besides its type and default (both on the field).

    The CLI options of ``maskfer train`` and ``maskfer sweep`` (cli/options.py), the sweep's axes and
    their value types (maskfer.sweep), ``--config`` files, :meth:`TrainConfig.validate` and the defaults
    table of docs/training.md are all generated from these declarations; nothing else lists fields.
    """
    help: str
    flag: str = ""                          # CLI spelling without '--' [default: the field name, '_' -> '-']
    metavar: str | None = None
    choices: tuple[str, ...] | None = None  # the allowed values (checked by validate; a click.Choice on the CLI)
    choices_from: str | None = None         # "module:function" giving the choices, imported only to validate
    range: tuple | None = None              # (low, low inclusive, high or None, high inclusive); must be finite
    path: str | None = None                 # what a CLI value names: "file" (must exist) | "dir"
    required: bool = False                  # the CLI needs it (from a flag, --config or a sweep file)
    identity: bool = True                   # part of what is trained (identity_hash); False: a resume may change it
    per_model: bool = False                 # may differ between the K models of one `sweep --parallel` group
    data: bool = False                      # read by the sweep's up-front checks against the feature store
    axis: bool = True                       # may be a sweep axis (--grid)
    aliases: tuple[str, ...] = ()           # other accepted spellings (old sweep files, --set, --config keys)
    doc: str = ""                           # more text for the docs table only
    # The value that reproduces runs recorded before this field existed: from_dict fills it in when a stored
    # config lacks the field, and identity() leaves the field out while it holds that value, so those runs keep
    # their identity hash and resume. AS_OLD_AS_THE_FORMAT: the field has always been recorded.
    legacy: typing.Any = AS_OLD_AS_THE_FORMAT
    paper: str = ""                         # where the default differs from the paper's code: what the paper does

    def __post_init__(self):
        if self.path not in (None, "file", "dir"):
            raise ValueError(f"Option.path must be 'file', 'dir' or None, not {self.path!r}")


def option(default, help: str, **kw) -> typing.Any:
    """A TrainConfig field with its :class:`Option` declaration (a list default gets a fresh list per instance)."""
    meta = {"option": Option(help=help, **kw)}
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
    return field(default=default, metadata=meta)


_METHOD_HELP = "; ".join(f"{n}: {get_method(n).help}" for n in METHODS) + "."


@dataclass
class TrainConfig:
    cache: str = option("", "Feature store (featcache build --cache FILE).", metavar="FILE", path="file",
                        required=True, identity=False, data=True, axis=False)
    train: str = option("", "Training set; the split defaults to train.", metavar="DATASET[:SPLIT]", required=True,
                        data=True, axis=False)
    test: list[str] = option([], "Test sets evaluated after training: DATASET[:SPLIT], the split defaults to test "
                                 "(a dataset without splits uses all rows).", metavar="DS1,DS2,...", identity=False,
                             data=True,
                             doc="In --grid, where the comma separates values, join the sets of one value with '+'.")
    method: str = option("cafe", _METHOD_HELP, choices=METHODS, data=True)
    backbone: str = option("resnet18", "Mask CNN (cafe) or end-to-end model (baseline): resnet18, resnet50 or "
                                       "mobilenet_v2 (the maskfer.backbones registry).", metavar="NAME",
                           choices_from="maskfer.backbones:list_backbones")
    pretrained: str | None = option(None, "Backbone initialisation: a torchvision-format state dict (.pth/.safetensors,"
                                          " e.g. the MS-Celeb-1M ResNet-18 FER papers use), or, online, torchvision's "
                                          "ImageNet weights (imagenet), a URL or a hub file [default: from scratch].",
                                    metavar="FILE|imagenet|URL|hf://OWNER/REPO/FILE", per_model=True, data=True,
                                    paper="MS-Celeb-1M ResNet-18 weights (not distributable; the paper's Table 5: about "
                                          "-4 points for CAFE and -20 for the baseline from scratch)")
    encoder: str | None = option(None, "Encoder key in the store [default: the dataset's only encoder].",
                                 metavar="KEY", data=True)
    epochs: int = option(60, "Training epochs.", range=(1, True, None, True))
    batch_size: int = option(32, "Training images per batch.", range=(1, True, None, True))
    image_size: int = option(224, "Input size of the mask CNN (cached images of another size are resized on the "
                                  "device).", range=(1, True, None, True))
    lr: float = option(2e-4, "Adam learning rate.", range=(0, False, None, True))
    weight_decay: float = option(1e-4, "Adam weight decay.", range=(0, True, None, True))
    gamma: float = option(0.9, "ExponentialLR factor, stepped once per epoch.", range=(0, False, 1, True))
    seed: int = option(0, "Seed of model init, sample order, augmentation and channel drop.", per_model=True)
    lam: float = option(1.5, "Weight λ of the channel-separation CE.", flag="lambda", range=(0, True, None, True),
                        per_model=True)
    beta: float = option(5.0, "Weight β of the diverse loss.", range=(0, True, None, True), per_model=True)
    drop: int = option(10, "Channels dropped per class group (of 73 for C=512); must be smaller than the smallest "
                           "group.", range=(0, True, None, True), per_model=True, data=True)
    drop_mode: str = option("batch", "One channel-drop pattern per batch (the official code) or a new one per sample.",
                            choices=("batch", "sample"), per_model=True)
    groups: str = option("official", "Class groups of the separation and diverse losses. official: max over windows "
                                     "of C//7 channels (512: 7 x 73, channel 511 never pooled; drop drawn over "
                                     "6 x 73 + 74), diverse divided by 73, as the official code; balanced: 7 groups "
                                     "6 x 73 + 74 for drop and max, each divided by its size.",
                         choices=("official", "balanced"), legacy="balanced")
    sigmoid: bool = option(True, "Mask through a sigmoid; --no-sigmoid is the ablation M * F.", per_model=True)
    separation: bool = option(True, "Channel-separation loss; --no-separation is the ablation.", per_model=True,
                              data=True)
    diverse: bool = option(True, "Diverse loss; --no-diverse is the ablation.", per_model=True)
    mask_map: str = option("auto", "Backbone width D -> feature dim C: auto (identity, mean over windows, or linear "
                                   "when D<C) or linear.", choices=("auto", "linear"))
    feature_norm: str = option("none", "standardize: the cached features per channel with the training split's "
                                       "mean/std (kept in the run) before the mask or linear head; none: raw "
                                       "features, as the paper.", choices=FEATURE_NORMS)
    prompts: str | None = option(None, "Class prompts of the zero-shot method: a TOML file of templates and each "
                                       "class's words [default: maskfer/prompts/expressions.toml, shipped].",
                                 metavar="FILE", path="file", legacy=None,
                                 doc="Only with the zero-shot method; the file's sha256 is recorded in the run.")
    flip: bool = option(True, "Random horizontal flips (the stored flipped view); --no-flip turns them off.")
    erasing: float = option(0.5, "Random-erasing probability.", range=(0, True, 1, True),
                            doc="torchvision semantics: ratio 0.3–3.3, filled with the ImageNet mean (value 0 after "
                                "normalisation).")
    erase_min: float = option(0.02, "Smallest erased area, as a fraction of the image.", range=(0, False, 1, False),
                              legacy=0.02)
    erase_max: float = option(0.25, "Largest erased area, as a fraction of the image (official 0.25; torchvision's "
                                    "default 0.33).", range=(0, False, 1, False), legacy=0.33)
    noise_p: float = option(0.5, "Probability of Gaussian noise on an image (official 0.5).", range=(0, True, 1, True),
                            legacy=1.0)
    noise_std: float = option(math.sqrt(30.0), "Gaussian noise std in 0-255 pixel units, added to the source pixels "
                                               "before the resize (official: variance 30); 0: off.",
                              range=(0, True, None, True))
    views: str = option("clean", "Features the training batches use. clean: the cached image and its flip (erasing "
                                 "and noise reach only the CNN); augmented: one of the store's augmented views per "
                                 "image and epoch (featcache build --aug-views K), its augmentation re-applied to the "
                                 "CNN input, so F and the CNN see the same augmented face, as in the official code.",
                        choices=("clean", "augmented"), legacy="clean", data=True,
                        paper="the encoder runs on every augmented batch (what --online-encoder computes; "
                              "--views augmented caches it)")
    balanced: bool = option(False, "Class-balanced sampling (each class equally likely; AffectNet needs it).")
    online_encoder: bool = option(False, "Recompute the features from every augmented batch, at training and at "
                                         "evaluation, with the store's encoder and its --preprocess mode (slow; the "
                                         "official computation, for comparison).", data=True,
                                  paper="on: the official code encodes every batch")
    val_split: str | None = option(None, "Validation split of the training dataset evaluated each epoch (model "
                                         "selection), or holdout:FRACTION to hold out a stratified part of its train "
                                         "split.", metavar="SPLIT|holdout:FRACTION", data=True)
    device: str = option("auto", "auto (CUDA when present, else CPU), cpu, cuda or cuda:N.", identity=False)
    workers: int = option(0, "Parallel image decoders (threads) when images come from --root; 0: decode in the main "
                             "process.", range=(0, True, None, True), identity=False)
    root: str | None = option(None, "Dataset root, when the store has no cached images (featcache build "
                                    "--image-size).", metavar="DIR", path="dir", identity=False, data=True)

    def validate(self, check_files: bool = True) -> "TrainConfig":
        """Raise ConfigError (with ``.field``) on a bad value. ``check_files=False`` skips what only matters
        to start training (the --pretrained file), for configs read back from a run directory."""
        for name, opt in OPTIONS.items():
            v = getattr(self, name)
            choices = choices_of(name)
            if choices is not None and v not in choices:
                raise ConfigError(f"{option_name(name)} must be one of {', '.join(choices)}, not {v!r}", field=name)
            if opt.range is not None:
                _check_range(name, v, opt.range)
        if self.pretrained and check_files:
            if not is_remote_pretrained(self.pretrained) and not Path(self.pretrained).is_file():
                raise ConfigError(f"--pretrained {self.pretrained}: no such file (or use imagenet, a URL or hf://...)",
                                  field="pretrained")
        if self.prompts and self.method_spec.fit != "zero-shot":
            raise ConfigError(f"--prompts is the class prompt file of --method zero-shot, not of {self.method}",
                              field="prompts")
        if self.method_spec.fit == "zero-shot" and self.feature_norm != "none":
            raise ConfigError("--method zero-shot compares the L2-normalised CLIP features with text embeddings in "
                              f"CLIP's own space: use --feature-norm none, not {self.feature_norm}",
                              field="feature_norm")
        # cache is required on the command line but not part of what is trained: a config read back from a
        # run is valid without its store (eval/report take --cache); a config without a training set is not.
        for name in REQUIRED:
            if OPTIONS[name].identity and not getattr(self, name):
                raise ConfigError(f"{option_name(name)} {OPTIONS[name].metavar or 'VALUE'} is required", field=name)
        return self

    @property
    def method_spec(self):
        """The registered maskfer.methods.Method of ``method``."""
        return get_method(self.method)

    @property
    def reads_images(self) -> bool:
        """Training and evaluation load images (the model's input, or --online-encoder's)."""
        return self.method_spec.reads_images(self.online_encoder)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Options given now (a --config file, a sweep's base); the others take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config option(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_record(cls, d: dict) -> "TrainConfig":
        """The configuration a run recorded (config.json's "config"): fields newer than the record get their
        legacy value, what that run was trained with."""
        return cls.from_dict(with_legacy(d))

    def identity(self) -> dict:
        return {k: v for k, v in self.to_dict().items()
                if k not in self.NON_IDENTITY and not (k in LEGACY and v == LEGACY[k])}

    def identity_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- derived from the declaration
OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in dataclasses.fields(TrainConfig)}
NON_IDENTITY = tuple(n for n, o in OPTIONS.items() if not o.identity)    # a resumed run may differ in these
TrainConfig.NON_IDENTITY = NON_IDENTITY
PER_MODEL_FIELDS = tuple(n for n, o in OPTIONS.items() if o.per_model)  # may differ inside a --parallel group
DATA_FIELDS = tuple(n for n, o in OPTIONS.items() if o.data)            # what the sweep's store checks read
AXIS_FIELDS = tuple(n for n, o in OPTIONS.items() if o.axis)            # possible sweep axes
REQUIRED = tuple(n for n, o in OPTIONS.items() if o.required)
LEGACY = {n: o.legacy for n, o in OPTIONS.items() if o.legacy != AS_OLD_AS_THE_FORMAT}


def with_legacy(d: dict, where="a run's config.json") -> dict:
    """A recorded configuration with its missing newer fields at their legacy values. A record from before
    --noise-p existed whose noise was on cannot be reproduced: --noise-std was then a std on [0, 1] pixels
    after the resize, now it is in 0-255 units before it."""
    if "noise_p" not in d and isinstance(d.get("noise_std"), (int, float)) and d["noise_std"] > 0:
        raise ConfigError(f"{where}: noise_std {d['noise_std']} was recorded when it meant a std on [0, 1] pixels "
                          "after the resize; it is now in 0-255 units before it (the official recipe), so this run "
                          "cannot be resumed or repeated as it was. Train it anew (--noise-std in 0-255 units)",
                          field="noise_std")
    return {**{n: v for n, v in LEGACY.items() if n not in d}, **d}
# Numeric options: (lower bound, lower inclusive, upper bound, upper inclusive); every value must be finite.
NUMERIC_RANGES = {n: o.range for n, o in OPTIONS.items() if o.range is not None}


def flag(name: str) -> str:
    """TrainConfig field -> its CLI spelling without '--' (lam -> lambda, batch_size -> batch-size): the flag, the
    sweep axis, the --set key and the --config key all use it."""
    return OPTIONS[name].flag or name.replace("_", "-")


def option_name(name: str) -> str:
    """TrainConfig field -> the CLI option that sets it (lam -> --lambda)."""
    return "--" + flag(name)


def _norm(key: str) -> str:
    return str(key).strip().lstrip("-").replace("-", "_")


# every accepted spelling (field name, flag, alias; dashes or underscores) -> field
_KEYS = {_norm(k): n for n, o in OPTIONS.items() for k in (n, flag(n), *o.aliases)}


def field_for(key: str) -> str | None:
    """The TrainConfig field a user's key names ('lambda', 'lam', '--noise-std', 'noise_std' ...), else None."""
    return _KEYS.get(_norm(key))


def unknown_key_hint(key: str) -> str:
    """Why ``key`` names no option and what to write instead (for the error messages that refuse it)."""
    k = _norm(key)
    if k.startswith("no_") and _KEYS.get(k[3:]) and field_types()[_KEYS[k[3:]]] is bool:
        return f"set {flag(_KEYS[k[3:]])} to false"
    return "options: " + ", ".join(flag(n) for n in OPTIONS)


def _load_choices(spec: str) -> tuple[str, ...]:
    """A registry's names, imported when a value is validated: registries like maskfer.backbones load torch,
    which the CLI must not pay for at start. The registry never imports this module back (no cycle)."""
    module, _, fn = spec.partition(":")
    return tuple(getattr(importlib.import_module(module), fn)())


def choices_of(name: str) -> tuple[str, ...] | None:
    """The allowed values of a field (a registry is imported for ``choices_from``), or None when any value goes."""
    o = OPTIONS[name]
    return o.choices or (_load_choices(o.choices_from) if o.choices_from else None)


def _range_text(lo, lo_inc, hi, hi_inc) -> str:
    if hi is None:
        return f">= {lo}" if lo_inc else f"> {lo}"
    return f"in {'[' if lo_inc else '('}{lo}, {hi}{']' if hi_inc else ')'}"


def _check_range(name: str, v, bounds) -> None:
    lo, lo_inc, hi, hi_inc = bounds
    opt = option_name(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{opt} must be a finite number, not {v!r}", field=name)
    if not ((v >= lo if lo_inc else v > lo) and (hi is None or (v <= hi if hi_inc else v < hi))):
        rng = _range_text(lo, lo_inc, hi, hi_inc)
        raise ConfigError(f"{opt} must be {rng}, not {v!r}" if hi is None else
                          f"{opt} {rng} is required, not {v!r}", field=name)


_TYPES: dict[str, typing.Any] = {}


def field_types() -> dict[str, typing.Any]:
    """field -> its base type: int, float, bool, str or list (of str); Optional unwrapped (see :func:`optional`)."""
    if not _TYPES:
        for name, tp in typing.get_type_hints(TrainConfig).items():
            if name not in OPTIONS:
                continue
            args = typing.get_args(tp) if typing.get_origin(tp) is not list else ()
            base = next((a for a in args if a is not type(None)), tp) if args else tp
            _TYPES[name] = list if typing.get_origin(base) is list else base
    return _TYPES


def optional(name: str) -> bool:
    """The field may be None (``str | None``)."""
    tp = typing.get_type_hints(TrainConfig)[name]
    return typing.get_origin(tp) is not list and type(None) in typing.get_args(tp)


def coerce_value(name: str, value):
    """A CLI string or a TOML/JSON value -> the type of TrainConfig.<name>; ConfigError (with ``.field``) when it
    is not one. Lists: a TOML/JSON list, or 'a,b' / 'a+b' (inside --grid the comma separates values: use '+').
    Optional fields take none / null / an empty string as None. Ranges and choices are validate's business."""
    base = field_types()[name]
    if base is list:
        items = value if isinstance(value, list) else [v.strip() for v in re.split(r"[+,]", str(value)) if v.strip()]
        return [str(v) for v in items]
    if optional(name) and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))):
        return None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("true", "yes", "on", "1"):
                return True
            if s in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            f = float(value)
            if not f.is_integer():
                raise ValueError
            return int(f)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
            return v
        if isinstance(value, (list, dict)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{value!r} is not a valid {base.__name__} for option {flag(name)!r}", field=name) from None


# ---------------------------------------------------------------------------- --config FILE
@dataclass
class ConfigFile:
    """Training options read from a file: ``values`` by field, ``keys`` the spelling each had in the file."""
    path: str
    values: dict
    keys: dict

    def blame(self, e: ConfigError, fields=None) -> ConfigError:
        """``e`` naming this file and the key when its field's value came from here (``fields``: those that did,
        default all the file sets); ``e`` itself otherwise."""
        fields = self.keys if fields is None else fields
        if e.field in fields and e.field in self.keys:
            return ConfigError(f"{self.path}: key {self.keys[e.field]!r}: {e}", field=e.field)
        return e


def read_config_file(path) -> ConfigFile:
    """Training options from a TOML file (keys: field names or flag names without '--'), a run's config.json
    (its "config" object) or a run directory (its config.json). ConfigError naming the file and the key on
    anything that is not an option or not of its type."""
    import json as _json

    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the config file: {e}") from None
    if p.suffix == ".json":
        try:
            raw = _json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{p}: not valid JSON: {e}") from None
        if isinstance(raw, dict) and isinstance(raw.get("config"), dict):
            raw = with_legacy(raw["config"], p)  # a run directory's config.json: what it trained
    else:
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a table of training options, not {type(raw).__name__}")
    values, keys = {}, {}
    for k, v in raw.items():
        name = field_for(k)
        if name is None:
            raise ConfigError(f"{p}: key {k!r} is not a training option ({unknown_key_hint(k)})")
        if name in values:
            raise ConfigError(f"{p}: key {k!r} is given twice (as {keys[name]!r} and {k!r})", field=name)
        if isinstance(v, dict):
            raise ConfigError(f"{p}: key {k!r}: expected a value, not a table", field=name)
        try:
            values[name] = coerce_value(name, v)
        except ConfigError as e:
            raise ConfigError(f"{p}: key {k!r}: {e}", field=name) from None
        keys[name] = k
    return ConfigFile(str(p), values, keys)


# ---------------------------------------------------------------------------- the docs table
DOCS_BEGIN = "<!-- options table: generated by `python -m maskfer.config --markdown`; do not edit by hand -->"
DOCS_END = "<!-- end of options table -->"


def describe(name: str) -> str:
    """The help of a field with its choices and range, as the docs table shows it."""
    o = OPTIONS[name]
    parts = [o.help]
    if o.choices:  # a registry's names (choices_from) are listed in the help itself
        parts.append(f"One of: {', '.join(o.choices)}.")
    if o.range is not None:
        parts.append(f"Must be {_range_text(*o.range)}.")
    if o.doc:
        parts.append(o.doc)
    return " ".join(parts)


def _fmt_default(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if v is None or v == "" or v == []:
        return "–"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _roles(name: str) -> str:
    o = OPTIONS[name]
    roles = []
    if o.required:
        roles.append("required")
    if not o.identity:
        roles.append("may change on resume")
    if o.per_model:
        roles.append("per model (`--parallel`)")
    if not o.axis:
        roles.append("not a sweep axis")
    return ", ".join(roles)


def defaults_markdown() -> str:
    """The options table of docs/training.md: every TrainConfig field, its flag, default, meaning and roles."""
    defaults = TrainConfig()
    lines = ["| option | default | meaning | notes | the paper's code, where the default differs |", "|---|---|---|---|---|"]
    for name in OPTIONS:
        f = flag(name)
        spelled = f"`--{f}` / `--no-{f}`" if field_types()[name] is bool else f"`--{f}`"
        meaning = describe(name).replace("|", "\\|")
        paper = OPTIONS[name].paper.replace("|", "\\|")
        lines.append(f"| {spelled} | {_fmt_default(getattr(defaults, name))} | {meaning} | {_roles(name)} | {paper} |")
    return "\n".join(lines) + "\n"


def docs_table(text: str, path="docs") -> str:
    """The generated part of a docs file (between :data:`DOCS_BEGIN` and :data:`DOCS_END`)."""
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise ValueError(f"{path}: no generated options table (markers {DOCS_BEGIN!r} ... {DOCS_END!r})")
    return text.split(DOCS_BEGIN, 1)[1].split(DOCS_END, 1)[0].strip("\n") + "\n"


def main(argv=None) -> int:
    """``python -m maskfer.config --markdown [--write FILE | --check FILE]``: print the options table, write it
    into FILE between the markers, or exit 1 when FILE's table differs from the declaration."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m maskfer.config", description=main.__doc__)
    ap.add_argument("--markdown", action="store_true", required=True, help="the options table (markdown)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", help="replace the table in FILE (e.g. docs/training.md)")
    group.add_argument("--check", metavar="FILE", help="exit 1 unless FILE holds the current table")
    args = ap.parse_args(argv)
    table = defaults_markdown()
    if not (args.write or args.check):
        print(table, end="")
        return 0
    path = Path(args.write or args.check)
    text = path.read_text()
    old = docs_table(text, path)
    if args.check:
        if old != table:
            print(f"{path}: the options table is out of date; run python -m maskfer.config --markdown --write {path}")
            return 1
        return 0
    head, rest = text.split(DOCS_BEGIN, 1)
    path.write_text(head + DOCS_BEGIN + "\n" + table + DOCS_END + rest.split(DOCS_END, 1)[1])
    return 0


def check_types(d: dict) -> None:
    """Raise ConfigError (with ``.field``) unless each value of ``d`` (decoded JSON) has its field's type:
    int (not bool), float (an int is fine), bool, str, list of str, or None where the field is optional."""
    hints = typing.get_type_hints(TrainConfig)
    for name, v in d.items():
        tp = hints.get(name)
        if tp is None:
            continue
        args = typing.get_args(tp) if typing.get_origin(tp) is not list else ()
        if type(None) in args and v is None:
            continue
        base = next((a for a in args if a is not type(None)), tp) if args else tp
        if typing.get_origin(base) is list:
            ok, want = isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"
        elif base is bool:
            ok, want = isinstance(v, bool), "true or false"
        elif base is int:
            ok, want = isinstance(v, int) and not isinstance(v, bool), "an integer"
        elif base is float:
            ok, want = isinstance(v, (int, float)) and not isinstance(v, bool), "a number"
        else:
            ok, want = isinstance(v, str), "a string"
        if not ok:
            raise ConfigError(f"{name} must be {want}{' or null' if type(None) in args else ''}, not {v!r}",
                              field=name)


def split_spec(spec: str, default: str) -> tuple[str, str]:
    """'ferplus:val' -> ('ferplus', 'val'); 'muxspace' -> ('muxspace', default)."""
    name, _, split = spec.partition(":")
    return name, (split or default)


if __name__ == "__main__":
    raise SystemExit(main())
