"""The `maskfer` CLI: defaults equal TrainConfig's, train/eval/predict end to end, clean errors, kill + resume."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import maskfer_fixtures as mf
from maskfer_fixtures import fx_base, store  # noqa: F401 - pytest fixtures
from cli.maskfer_cli import main, train as train_cmd
from featcache.taxonomy import CLASSES
from maskfer import rundir
from maskfer.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]

# the generated options are named like their TrainConfig field; these are train's own
_CLI_ONLY = {"out", "config_file", "quiet", "trust_plugins"}  # trust_plugins is never a config field: config.json is shared


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


# ---------------------------------------------------------------- defaults cannot drift from TrainConfig
def test_cli_defaults_equal_trainconfig_defaults():
    import click

    d = TrainConfig()
    ctx = click.Context(train_cmd)
    covered = set()
    for p in train_cmd.params:
        default = p.get_default(ctx)
        if p.name in _CLI_ONLY:
            continue
        covered.add(p.name)
        want = getattr(d, p.name)
        if isinstance(want, bool):  # --flip/--no-flip: a pair with the field's default
            assert p.is_flag and p.secondary_opts and default is want, p.name
        elif want in ("", [], None):  # nothing to show; the field's default applies when it is not given
            assert default is None, p.name
        else:
            assert default == want and type(default) is type(want), (p.name, default, want)
    assert covered == {f.name for f in dataclasses.fields(TrainConfig)}  # every config field has an option


def test_train_help_shows_the_paper_defaults():
    out = re.sub(r"\s+", " ", CliRunner().invoke(main, ["train", "--help"]).output)
    chunks = re.split(r" (?=--[a-z])", out.split("Options:", 1)[1])  # one chunk per option
    for opt, shown in [("--epochs", "60"), ("--batch-size", "32"), ("--image-size", "224"), ("--lr", "0.0002"),
                       ("--weight-decay", "0.0001"), ("--gamma", "0.9"), ("--lambda", "1.5"), ("--beta", "5.0"),
                       ("--drop", "10"), ("--erasing", "0.5"), ("--method", "cafe"), ("--backbone", "resnet18")]:
        (chunk,) = [c for c in chunks if c.startswith(opt + " ")]
        assert f"[default: {shown}]" in chunk, chunk


# ---------------------------------------------------------------- train / eval / predict
FLAGS = {
    "cafe": ["--method", "cafe"],
    "baseline": ["--method", "baseline"],
    "linear-head": ["--method", "linear-head"],
    "linear-probe": ["--method", "linear-probe"],
    "no-sigmoid": ["--no-sigmoid"],
    "no-separation": ["--no-separation"],
    "no-diverse": ["--no-diverse"],
}


def _train_args(store, out, *extra):
    return ["train", "--cache", store, "--train", "domB", "--out", out, "--epochs", 1, "--batch-size", 16,
            "--image-size", 16, "--drop", 1, "--device", "cpu", "--quiet", *extra]


@pytest.mark.parametrize("variant", list(FLAGS))
def test_cli_train_every_method_and_ablation(store, tmp_path, variant):
    out = tmp_path / "run"
    r = invoke(*_train_args(store, out, "--test", "domA:test,domB", *FLAGS[variant]))
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["method"] == (FLAGS[variant][1] if FLAGS[variant][0] == "--method" else "cafe")
    assert cfg["test"] == ["domA:test", "domB"] and cfg["drop"] == 1 and cfg["lr"] == 2e-4
    for flag, field in (("--no-sigmoid", "sigmoid"), ("--no-separation", "separation"), ("--no-diverse", "diverse")):
        assert cfg[field] is (flag not in FLAGS[variant])
    assert len(rundir.read_metrics(out)) == 1 and (out / "checkpoint_last.safetensors").exists()
    assert set(json.loads((out / "results.json").read_text())["tests"]) == {"domA:test", "domB:test"}
    assert "| run | domA:test | domB:test | mean |" in r.stdout      # the table is printed
    assert ("linear probe: L2" if variant == "linear-probe" else "epoch 1/1: loss") in r.stderr


def test_cli_options_reach_the_config(store, tmp_path):
    out = tmp_path / "run"
    r = invoke(*_train_args(store, out, "--method", "linear-head", "--balanced", "--no-flip", "--erasing", 0.2,
                            "--lambda", 2.5, "--beta", 1, "--gamma", 0.8, "--lr", 0.01, "--weight-decay", 0,
                            "--seed", 7, "--drop-mode", "batch", "--noise-std", 0.1, "--mask-map", "linear",
                            "--val-split", "test", "--workers", 1))
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert {k: cfg[k] for k in ("balanced", "flip", "erasing", "lam", "beta", "gamma", "lr", "weight_decay", "seed",
                                "drop_mode", "noise_std", "mask_map", "val_split", "workers")} == {
        "balanced": True, "flip": False, "erasing": 0.2, "lam": 2.5, "beta": 1.0, "gamma": 0.8, "lr": 0.01,
        "weight_decay": 0.0, "seed": 7, "drop_mode": "batch", "noise_std": 0.1, "mask_map": "linear",
        "val_split": "test", "workers": 1}
    assert "val_acc" in rundir.read_metrics(out)[0]
    assert rundir.read_metrics(out)[0]["lr"] == pytest.approx(0.01 * 0.8)


@pytest.fixture
def two_runs(store, fx_base):
    a = mf.trained_run(fx_base, store, "cli-cafe", method="cafe", lr=5e-3)
    b = mf.trained_run(fx_base, store, "cli-probe", method="linear-head", lr=5e-2, epochs=2)
    return a, b


def test_cli_eval_tables_json_and_files(store, two_runs, tmp_path):
    a, b = two_runs
    r = invoke("eval", "--run", a, "--run", b, "--test", "domA:test,domB", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "accuracy (%):" in r.stdout and "mean class accuracy (%):" in r.stdout
    assert "| run | domA:test | domB:test | mean |" in r.stdout
    assert "| domA / cafe |" in r.stdout and "| domA / linear-head |" in r.stdout
    err = re.sub(r"\s+", " ", r.stderr)                        # rich wraps log lines at 80 columns off a tty
    assert "domB:test: accuracy" in err and "(absent classes: neutral)" in err

    prefix = tmp_path / "tables" / "cross"
    r = invoke("eval", "--run", a, "--run", b, "--test", "domA:test,domB", "--device", "cpu", "--json", "--table", prefix)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)                                  # stdout is pure JSON
    assert [x["label"] for x in res] == ["domA / cafe", "domA / linear-head"]
    for x in res:
        for name in ("domA:test", "domB:test"):
            m = x["tests"][name]
            assert {"accuracy", "mean_class_accuracy", "per_class_accuracy", "confusion", "absent_classes"} <= set(m)
            assert sum(map(sum, m["confusion"])) == m["n"]
        assert x["tests"]["domB:test"]["per_class_accuracy"]["neutral"] is None
    for suffix in (".md", ".json", "_accuracy.csv", "_mean_class_accuracy.csv"):
        assert (tmp_path / "tables" / f"cross{suffix}").exists(), suffix
    with open(tmp_path / "tables" / "cross_accuracy.csv") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["run", "domA:test", "domB:test", "mean"] and [r[0] for r in rows[1:]] == [x["label"] for x in res]
    acc = res[1]["tests"]
    assert float(rows[2][3]) == pytest.approx((acc["domA:test"]["accuracy"] + acc["domB:test"]["accuracy"]) / 2)
    assert json.loads((tmp_path / "tables" / "cross.json").read_text()) == res


def test_cli_predict_csv_json_and_print(fx_base, two_runs, tmp_path):
    a, _ = two_runs
    src = fx_base / "domA" / "test"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    none = ("--detect", "none", "--device", "cpu")
    r = invoke("predict", "--run", a, src, broken, "--output", tmp_path / "p.csv", *none)
    assert r.exit_code == 0, r.output
    with open(tmp_path / "p.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 15 and list(rows[0]) == ["input", "frame", "time", "face", "x0", "y0", "x1", "y1", "score",
                                                 "prediction", *CLASSES, "note"]
    bad = [x for x in rows if x["note"]]
    assert len(bad) == 1 and bad[0]["input"] == str(broken) and "not an image" in bad[0]["note"]
    for x in rows:
        if not x["note"]:
            probs = [float(x[c]) for c in CLASSES]
            assert sum(probs) == pytest.approx(1.0, abs=1e-4) and x["prediction"] == CLASSES[probs.index(max(probs))]
            assert x["face"] == "0" and (x["x0"], x["y0"]) == ("0.0", "0.0")
    assert "wrote 15 rows" in r.stdout

    r = invoke("predict", "--run", a, src, "--output", tmp_path / "p.json", *none)
    res = json.loads((tmp_path / "p.json").read_text())
    assert len(res) == 14 and all({"input", "face", "box", "prediction", "probabilities"} <= set(x) for x in res)
    got = {x["input"]: x["prediction"] for x in res}
    assert {x["input"]: x["prediction"] for x in rows if not x["note"]} == got
    # --format json without --output: the same rows on stdout
    r = invoke("predict", "--run", a, src, "--format", "json", *none)
    assert json.loads(r.stdout) == res

    r = invoke("predict", "--run", a, src / "anger", broken, *none)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith(f"{broken}: ERROR")
    assert re.match(r".*anger_000\.png face 0 \[0,0,\d+,\d+\]: \w+ {2}\(\w+ \d\.\d{3}, \w+ \d\.\d{3}, \w+ \d\.\d{3}\)$",
                    lines[0]), lines[0]


# ---------------------------------------------------------------- errors are one line, exit 1, no traceback
def _assert_clean_error(r, *needles):
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and r.stderr.startswith("error:")
    text = re.sub(r"\s+", " ", r.stderr)
    for n in needles:
        assert n in text, (n, text)


def test_cli_errors(store, tmp_path, fx_base, tiny_clip_dir):
    _assert_clean_error(invoke(*_train_args(store, tmp_path / "a", "--train", "nope")), "has no dataset 'nope'",
                        "featcache build")
    _assert_clean_error(invoke(*_train_args(store, tmp_path / "a", "--drop", 5)), "drop at most 1")
    _assert_clean_error(invoke(*_train_args(store, tmp_path / "a", "--backbone", "vgg")), "--backbone must be one of")
    _assert_clean_error(invoke(*_train_args(store, tmp_path / "a", "--train", "domA:val")), "no split 'val'")
    two = mf.copy_store(store, tmp_path / "two.h5")
    mf.build(two, "domB", fx_base / "domB", tiny_clip_dir, ("train", "test"), encoder_key="second")
    _assert_clean_error(invoke(*_train_args(two, tmp_path / "a")), "pick one with --encoder KEY")
    weights = tmp_path / "w.pth"
    import torch

    torch.save({"nothing.like.resnet": torch.zeros(1)}, weights)
    _assert_clean_error(invoke(*_train_args(store, tmp_path / "a", "--pretrained", weights)), "no key matches")
    run = tmp_path / "run"
    assert invoke(*_train_args(store, run, "--method", "linear-head")).exit_code == 0
    _assert_clean_error(invoke(*_train_args(store, run, "--method", "linear-head", "--seed", 1)),
                        "differs in: seed", "Use a new --out")
    _assert_clean_error(invoke("eval", "--run", tmp_path, "--test", "domA", "--cache", store),
                        "not a maskfer run directory")
    _assert_clean_error(invoke("eval", "--run", run, "--test", "domZ", "--device", "cpu"), "has no dataset 'domZ'")
    _assert_clean_error(invoke("predict", "--run", run, "--detect", "none", tmp_path / "missing.png"), "no such file or folder")


def test_cli_ctrl_c_says_how_to_resume(store, tmp_path, monkeypatch):
    import maskfer.engine as train_mod

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "epoch_order", interrupted)
    r = invoke(*_train_args(store, tmp_path / "run", "--method", "linear-head"))
    assert r.exit_code == 130 and "rerun to resume" in r.stderr


# ---------------------------------------------------------------- SIGKILL mid-run, rerun the same command
def test_sigkill_then_rerun_ends_like_an_uninterrupted_run(store, fx_base, tmp_path):
    epochs = 4
    ref = mf.trained_run(fx_base, store, "cli-kill-reference", train="domB", method="cafe", epochs=epochs, lr=1e-3)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "cli.maskfer_cli", *map(str, _train_args(store, run, "--epochs", epochs,
                                                                         "--method", "cafe", "--lr", 0.001))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # same thread count as the reference
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = run / rundir.LAST
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    done = rundir.load_checkpoint(ckpt)[2]["epoch"] + 1       # intact and loadable after kill -9
    assert 1 <= done < epochs
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming {run} after epoch {done}/{epochs}" in re.sub(r"\s+", " ", r.stderr)
    cfg, ref_cfg = (json.loads((d / "config.json").read_text())["config"] for d in (run, ref))
    assert TrainConfig.from_dict(cfg).identity() == TrainConfig.from_dict(ref_cfg).identity()
    assert mf.metrics_without_speed(run) == mf.metrics_without_speed(ref)
    a, b = rundir.load_checkpoint(run / rundir.LAST)[0], rundir.load_checkpoint(ref / rundir.LAST)[0]
    import torch

    assert all(torch.equal(a[k], b[k]) for k in b)
    assert not list(run.glob("*.tmp-*"))
