"""Click options generated from maskfer.config's declaration, and renamed options kept as hidden aliases.

``maskfer train`` and ``maskfer sweep`` take the same flag for every TrainConfig field (``--lambda``,
``--sigmoid/--no-sigmoid`` ...), made here from the field's :class:`maskfer.config.Option`; the sweep's
axes and ``--set`` keys are those flags without ``--``. Only what the user gave counts
(:func:`given_options`): a flag left at its default never overrides a ``--config`` file, a sweep file's
[base] or its grid. Stdlib + click only: imported at CLI start-up, without torch; maskfer.config is
imported by the functions that need it, so the featcache CLI (renamed options only) does not load maskfer.
"""
from __future__ import annotations

import click
from click.core import ParameterSource

# What `maskfer sweep` uses when an option is set nowhere, where that differs from TrainConfig's default.
SWEEP_DEFAULTS = {"val_split": "val"}  # a sweep selects its model on a validation split

_WHERE = {"train": "on the command line or in the --config file",
          "sweep": "here, with --set, in the --config file or in the --sweep-file's [base]"}


def _option(name: str, command: str):
    from maskfer.config import OPTIONS, TrainConfig, field_types, flag

    o = OPTIONS[name]
    f = flag(name)
    tp = field_types()[name]
    default = getattr(TrainConfig(), name)
    help_text = o.help + (f" Required: {_WHERE[command]}." if o.required else "")
    kw: dict = {"help": help_text, "show_default": True}
    if tp is bool:
        return click.option(f"--{f}/--no-{f}", name, default=default, **kw)
    if o.choices:
        kw["type"] = click.Choice(list(o.choices))
    elif o.path == "file":
        kw["type"] = click.Path(dir_okay=False, exists=True)
    elif o.path == "dir":
        kw["type"] = click.Path(file_okay=False)
    else:
        # lists arrive as 'a,b' and optional strings as text ('none' clears them): coerce_value types them
        kw["type"] = {int: click.INT, float: click.FLOAT}.get(tp, click.STRING)
        kw["metavar"] = o.metavar
    if default in (None, "", []):
        kw.update(default=None, show_default=False)
    else:
        kw["default"] = default
    if command == "sweep" and name in SWEEP_DEFAULTS:
        kw.update(show_default=False, help=f"{help_text} [default: {SWEEP_DEFAULTS[name]}]")
    return click.option(f"--{f}", name, **kw)


def config_options(command: str):
    """Decorator: one click option per TrainConfig field, in declaration order, named like the field.
    ``command`` ("train" | "sweep") only changes help texts: the flags and their types are the same."""
    if command not in _WHERE:
        raise ValueError(f"config_options: command must be one of {', '.join(_WHERE)}, not {command!r}")
    from maskfer.config import OPTIONS

    def deco(fn):
        for name in reversed(list(OPTIONS)):
            fn = _option(name, command)(fn)
        return fn

    return deco


def given_options(ctx: click.Context, params: dict) -> dict:
    """The TrainConfig fields given on the command line (or by environment), typed by the declaration; options
    left at their defaults are absent, so they override nothing."""
    from maskfer.config import OPTIONS, coerce_value

    out = {}
    for name in OPTIONS:
        source = ctx.get_parameter_source(name)
        if name in params and source is not None and source is not ParameterSource.DEFAULT:
            v = params[name]  # click typed numbers and flags (nan included: validate names the option)
            out[name] = v if isinstance(v, (bool, int, float)) else coerce_value(name, v)
    return out


# ---------------------------------------------------------------------------- renamed options
def renamed_option(old: str, **kw):
    """A hidden, deprecated spelling kept so that old scripts work; its value arrives as ``old_<name>``
    (see :func:`pick_renamed`)."""
    return click.option(old, "old_" + old.lstrip("-").replace("-", "_"), hidden=True, default=None, **kw)


def pick_renamed(ctx: click.Context, new_param: str, new_value, old_value, old: str, new: str):
    """``(value, note)``: the value of option ``new``, or the one given with its old spelling ``old`` and a
    one-line note for the user (print it once the command succeeded). Both given: a usage error."""
    if old_value is None:
        return new_value, None
    if ctx.get_parameter_source(new_param) not in (None, ParameterSource.DEFAULT):
        raise click.UsageError(f"{old} is the old name of {new}: give {new} only")
    return old_value, (f"note: {old} is now {new} here (--out always names a directory); "
                       f"the old spelling still works")
