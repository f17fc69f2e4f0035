"""Untrusted specs: an encoder spec read from a store or a run directory never imports code by itself.

A plug-in spec ("module:factory", or the name of a "featcache.encoders" entry point) runs Python
code. Stores and run directories are shared, so when such a spec comes from one of them
(`maskfer predict`, `featcache verify`, `maskfer train --online-encoder`) it is refused before
anything is imported, unless the user passes --trust-plugins. The same spec given on the command
line (`featcache build --model`) is the user's own choice and loads as before.

The "evil" plug-ins here are modules written into tmp_path that leave a marker file when they are
imported or called: the refusals assert the marker is absent and the module was never imported.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

import maskfer_fixtures as mf
from cli.featcache_cli import main as featcache_cli
from cli.maskfer_cli import main as maskfer_cli
from featcache.encoders import EncoderError, UntrustedSpecError, create_encoder, plugin

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
PLUGIN_SPEC = "plugin_encoders:tiny_tuple"   # a working plug-in (tests/plugin_encoders.py)
DATASET = "plug"


def one_line(text: str) -> str:
    return " ".join(text.split())


def fc(*args):
    return CliRunner().invoke(featcache_cli, [str(a) for a in args], catch_exceptions=False)


def mc(*args):
    return CliRunner().invoke(maskfer_cli, [str(a) for a in args], catch_exceptions=False)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def plugin_store(tmp_path_factory):
    """A store built with a plug-in given on the command line, and a cafe run trained on it."""
    base = tmp_path_factory.mktemp("untrusted")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(TESTS))
        root = mf.make_colour_dataset(base / "data", {"train": 2, "test": 1}, seed=3)
        store = base / "features.h5"
        r = fc("build", "--dataset", "folders", "--root", root, "--cache", store, "--model", PLUGIN_SPEC,
               "--name", DATASET, "--param", "split_dirs.train=train", "--param", "split_dirs.test=test",
               "--image-size", mf.CACHE, "--workers", 0, "--quiet")
        assert r.exit_code == 0, r.output  # a plug-in spec given on the command line still loads
        from maskfer.train import train

        run = base / "run"
        train(mf.small_cfg(store, train=DATASET, drop=0), run, progress=False, log=mf.quiet)
    image = next((root / "test").rglob("*.png"))
    return store, run, image


@pytest.fixture
def on_path(monkeypatch):
    """tests/ (plugin_encoders) on sys.path, and a clean plug-in import cache afterwards."""
    monkeypatch.syspath_prepend(str(TESTS))


@pytest.fixture
def evil(tmp_path, monkeypatch):
    """A plug-in module that writes a marker when imported or called; returns (spec, marker, module name)."""
    name = f"evil_plugin_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "EVIL_RAN"
    d = tmp_path / "evil_pkg"
    d.mkdir()
    (d / f"{name}.py").write_text(
        "from pathlib import Path\n"
        f"MARKER = Path({str(marker)!r})\n"
        "MARKER.write_text('imported\\n')\n"
        "def factory():\n"
        "    MARKER.write_text(MARKER.read_text() + 'called\\n')\n"
        "    raise RuntimeError('evil factory ran')\n")
    monkeypatch.syspath_prepend(str(d))
    yield f"{name}:factory", marker, name
    sys.modules.pop(name, None)


@pytest.fixture
def evil_entry_point(evil, monkeypatch):
    """An installed-looking entry point "shared-encoder" whose target is the evil factory."""
    spec, marker, name = evil
    ep = importlib.metadata.EntryPoint("shared-encoder", spec, plugin.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugin, "_entry_points", lambda: [ep])
    return "shared-encoder", marker, name


def run_with_spec(run: Path, dest: Path, spec: str) -> Path:
    shutil.copytree(run, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["encoder"]["spec"] = spec
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def store_with_spec(store: Path, dest: Path, spec: str) -> Path:
    shutil.copyfile(store, dest)
    with h5py.File(dest, "a") as f:
        for key in f["datasets"][DATASET]["encoders"]:
            f["datasets"][DATASET]["encoders"][key].attrs["spec"] = spec
    return dest


def assert_not_run(marker: Path, module: str) -> None:
    assert not marker.exists(), f"the plug-in named by the file ran: {marker.read_text()!r}"
    assert module not in sys.modules, "the plug-in module was imported"


# ---------------------------------------------------------------- maskfer predict
@pytest.mark.parametrize("kind", ["module:factory", "entry point"])
def test_predict_refuses_plugin_named_in_run_config(kind, plugin_store, tmp_path, request):
    store, run, image = plugin_store
    spec, marker, module = request.getfixturevalue("evil" if kind == "module:factory" else "evil_entry_point")
    bad = run_with_spec(run, tmp_path / "shared_run", spec)
    r = mc("predict", "--run", bad, image)
    assert r.exit_code == 1, r.output
    err = one_line(r.stderr)
    assert err.startswith("error:") and "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1
    assert f"{bad / 'config.json'} (field encoder.spec)" in err
    assert f"{module}:factory" in err and "--trust-plugins" in err
    if kind == "entry point":
        assert "'shared-encoder', an installed 'featcache.encoders' entry point" in err
    assert_not_run(marker, module)


def test_predict_refuses_os_abort_in_a_real_process(plugin_store, tmp_path):
    """The issue's example, end to end: `os:abort` in config.json must not abort the process."""
    store, run, image = plugin_store
    bad = run_with_spec(run, tmp_path / "abort_run", "os:abort")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    p = subprocess.run([sys.executable, "-m", "cli.maskfer_cli", "predict", "--run", str(bad), "--device", "cpu",
                        str(image)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])   # SIGABRT would be -6
    err = one_line(p.stderr)
    assert "names the encoder plug-in 'os:abort', which would import module 'os' and call 'abort'" in err
    assert "--trust-plugins" in err


def test_predict_with_trust_plugins_runs_the_named_plugin(plugin_store, tmp_path, on_path):
    store, run, image = plugin_store
    refused = mc("predict", "--run", run, image)   # the run's own plug-in spec: still refused by default
    assert refused.exit_code == 1 and PLUGIN_SPEC in one_line(refused.stderr)
    r = mc("predict", "--run", run, "--trust-plugins", image)
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"{image}: ")   # a prediction, after the fingerprint check passed


def test_trust_plugins_really_opts_in(plugin_store, tmp_path, evil):
    """The flag is what decides: with it the (evil) plug-in from the run is imported and called."""
    spec, marker, module = evil
    store, run, image = plugin_store
    bad = run_with_spec(run, tmp_path / "shared_run", spec)
    with pytest.raises(RuntimeError, match="evil factory ran"):   # the factory's own error: it really ran
        mc("predict", "--run", bad, "--trust-plugins", image)
    assert marker.read_text() == "imported\ncalled\n"


# ---------------------------------------------------------------- featcache verify
@pytest.mark.parametrize("kind", ["module:factory", "entry point"])
def test_verify_refuses_plugin_named_in_store(kind, plugin_store, tmp_path, request):
    store, _, _ = plugin_store
    spec, marker, module = request.getfixturevalue("evil" if kind == "module:factory" else "evil_entry_point")
    bad = store_with_spec(store, tmp_path / "shared.h5", spec)
    r = fc("verify", bad, "--sample", 2)
    out = one_line(r.output)
    assert r.exit_code == 0, r.output      # the other checks still run; this one is "not checked", not passed
    assert "not checked" in out and f"{bad} (attribute 'spec' of /datasets/{DATASET}/encoders/" in out
    assert f"{module}:factory" in out and "--trust-plugins" in out
    assert_not_run(marker, module)


def test_verify_with_trust_plugins_reencodes_with_the_plugin(plugin_store, on_path):
    store, _, _ = plugin_store
    r = fc("verify", store, "--sample", 2)
    assert r.exit_code == 0 and "re-encoded match: not checked" in one_line(r.output)
    r = fc("verify", store, "--sample", 2, "--trust-plugins")
    assert r.exit_code == 0, r.output
    out = one_line(r.output)
    assert f"ok {DATASET}/tiny_tuple: 2 re-encoded match" in out and "not checked" not in out


# ---------------------------------------------------------------- maskfer train --online-encoder
def test_online_encoder_refuses_plugin_named_in_store(plugin_store, tmp_path, evil):
    spec, marker, module = evil
    store, _, _ = plugin_store
    bad = store_with_spec(store, tmp_path / "shared.h5", spec)
    args = ["train", "--cache", bad, "--train", DATASET, "--out", tmp_path / "run", "--online-encoder",
            "--epochs", 1, "--image-size", 16, "--batch-size", 16, "--drop", 0, "--device", "cpu", "--quiet"]
    r = mc(*args)
    assert r.exit_code == 1, r.output
    err = one_line(r.stderr)
    assert f"{bad} (attribute 'spec' of /datasets/{DATASET}/encoders/tiny_tuple)" in err
    assert f"{module}:factory" in err and "--trust-plugins" in err
    assert_not_run(marker, module)
    with pytest.raises(RuntimeError, match="evil factory ran"):   # opted in: the store's plug-in is called
        mc(*args, "--trust-plugins")
    assert marker.read_text() == "imported\ncalled\n"


# ---------------------------------------------------------------- library API
def test_library_default_trusts_the_callers_spec_and_file_specs_do_not(on_path, evil):
    spec, marker, module = evil
    assert create_encoder(PLUGIN_SPEC).dim == 8                      # create_encoder(spec): the caller's own spec
    with pytest.raises(UntrustedSpecError, match=rf"^runs/x/config.json \(field encoder.spec\) names the encoder "
                                                 rf"plug-in '{spec}', which would import module '{module}'"):
        create_encoder(spec, trust_plugins=False, source="runs/x/config.json (field encoder.spec)")
    assert_not_run(marker, module)
    assert issubclass(UntrustedSpecError, EncoderError)  # the CLIs print it as one clean error line


def test_data_specs_from_files_still_load(tiny_clip_dir):
    """Registered names and Hugging Face directories are data, not code: allowed without the flag."""
    assert create_encoder(str(tiny_clip_dir), trust_plugins=False).dim == 16
    try:
        create_encoder("efficientnet-lite0", trust_plugins=False)
    except UntrustedSpecError:
        raise
    except EncoderError as e:  # optional package missing: fine, as long as it was not refused as a plug-in
        assert "pip install" in str(e)


def test_hf_checkpoint_with_custom_code_is_never_run(tmp_path, tiny_clip_dir):
    """transformers' trust_remote_code stays off: a directory whose config points at its own code is not run."""
    d = tmp_path / "custom-code-model"
    shutil.copytree(tiny_clip_dir, d)
    marker = tmp_path / "REMOTE_CODE_RAN"
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="evil_custom_arch", auto_map={"AutoConfig": "evil_code.EvilConfig",
                                                        "AutoImageProcessor": "evil_code.EvilProcessor"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil_code.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import CLIPVisionConfig, CLIPImageProcessor\n"
        "class EvilConfig(CLIPVisionConfig):\n    model_type = 'evil_custom_arch'\n"
        "class EvilProcessor(CLIPImageProcessor):\n    pass\n")
    for trust in (True, False):   # neither the caller's own spec nor one read from a file runs it
        with pytest.raises(EncoderError):
            create_encoder(str(d), trust_plugins=trust)
    assert not marker.exists()
