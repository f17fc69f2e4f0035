"""One error base: every error meant for a user derives from featcache.errors.FerError, and each CLI catches
exactly that class, printing one line and exiting 1 instead of showing a traceback."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from click.testing import CliRunner

import featcache
import maskfer
from featcache.errors import FerError

# Exception classes of featcache/maskfer that are deliberately NOT FerError: internal control flow that is
# turned into a user-facing error before it can reach a user. One that escapes is a bug, and its traceback
# is then what a developer needs. Every entry must exist and must not derive from FerError (checked below).
INTERNAL = {
    # Raised by taxonomy.resolve/map_code; featcache/manifests.py turns each one into a ManifestError naming
    # the manifest ([labels]) or into a skipped row's Problem (the file and line of the row).
    "featcache.taxonomy.UnknownLabel",
    # Raised by the layout readers; manifests.list_items re-raises it as a ManifestError that adds the
    # manifest path and the layout the dataset root was expected to have.
    "featcache.layouts.LayoutError",
}

# Builtin bases kept beside FerError because callers catch these errors as the builtin.
KEPT_BASES = {
    "featcache.devices.DeviceError": ValueError,
    "featcache.encoders.base.EncoderError": RuntimeError,
    "maskfer.config.ConfigError": ValueError,
    "maskfer.backbones.BackboneLoadError": RuntimeError,
}


def _module_names() -> list[str]:
    names = []
    for pkg in (featcache, maskfer):
        names.append(pkg.__name__)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return sorted(names)


def _exception_classes() -> dict[str, type]:
    """'module.Class' -> class, for every exception class defined (not just imported) in featcache/maskfer."""
    found = {}
    for name in _module_names():
        mod = importlib.import_module(name)  # an import error fails the test: every module must import
        for obj in vars(mod).values():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == name:
                found[f"{name}.{obj.__qualname__}"] = obj
    return found


def test_the_walk_finds_the_errors():
    """The collection itself works: the classes the other tests rely on are found, modules of subpackages too."""
    found = _exception_classes()
    assert {"featcache.store.StoreError", "featcache.encoders.base.UntrustedSpecError",
            "maskfer.config.ConfigError", *INTERNAL} <= set(found)
    assert len(found) >= 15, sorted(found)


def test_every_user_facing_error_derives_from_ferror():
    found = _exception_classes()
    outside = sorted(n for n, c in found.items() if n not in INTERNAL and not issubclass(c, FerError))
    assert not outside, (f"derive these from featcache.errors.FerError (or add them to INTERNAL with the reason "
                         f"no user can see them): {outside}")
    stale = sorted(n for n in INTERNAL if n not in found or issubclass(found[n], FerError))
    assert not stale, f"INTERNAL entries that are gone or now FerError; remove them: {stale}"


@pytest.mark.parametrize("qualname", sorted(KEPT_BASES))
def test_builtin_bases_are_kept(qualname):
    mod, _, cls = qualname.rpartition(".")
    c = getattr(importlib.import_module(mod), cls)
    assert issubclass(c, FerError) and issubclass(c, KEPT_BASES[qualname])


def test_one_base_exported_by_both_packages():
    import maskfer.errors

    assert featcache.FerError is maskfer.FerError is maskfer.errors.FerError is FerError
    assert "FerError" in featcache.__all__ and "FerError" in maskfer.__all__


# ---------------------------------------------------------------- the CLIs catch exactly FerError
class _SomeNewError(FerError):
    """Listed in no CLI: a new FerError subclass is caught without anyone editing the CLIs."""


def _raiser(exc):
    def fn(*a, **kw):
        raise exc

    return fn


def _featcache(monkeypatch, exc):
    import featcache.manifests
    from cli.featcache_cli import main

    monkeypatch.setattr(featcache.manifests, "builtin_manifests", _raiser(exc))
    return CliRunner().invoke(main, ["manifests"], catch_exceptions=False)


def _maskfer(monkeypatch, exc, tmp_path):
    import maskfer.demo
    from cli.maskfer_cli import main

    monkeypatch.setattr(maskfer.demo, "run_demo", _raiser(exc))
    return CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "demo"), "--quiet"], catch_exceptions=False)


@pytest.mark.parametrize("cli", ["featcache", "maskfer"])
def test_cli_prints_a_ferror_as_one_line(cli, monkeypatch, tmp_path):
    exc = _SomeNewError("store /data/x.h5 is damaged: rebuild it with featcache build")
    r = _featcache(monkeypatch, exc) if cli == "featcache" else _maskfer(monkeypatch, exc, tmp_path)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert lines == ["error: store /data/x.h5 is damaged: rebuild it with featcache build"], r.stderr


@pytest.mark.parametrize("cli", ["featcache", "maskfer"])
def test_cli_lets_a_bug_through(cli, monkeypatch, tmp_path):
    """Anything that is not a FerError is a bug: the CLI must not turn it into a tidy line."""
    with pytest.raises(KeyError):
        _featcache(monkeypatch, KeyError("bug")) if cli == "featcache" else _maskfer(monkeypatch, KeyError("bug"),
                                                                                   tmp_path)
