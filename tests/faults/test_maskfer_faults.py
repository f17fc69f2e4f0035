"""Fault injection for maskfer (issue 7): what train / eval / predict / sweep do when things go wrong.

Every case here is a row of docs/faults.md ("maskfer (train, eval, predict)"). Tiny data: the
fixture store's 16-d tiny-CLIP features, 16 px cached images, 1-2 epochs.
"""
from __future__ import annotations

import io
import json
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import maskfer_fixtures as mf
from maskfer_fixtures import fx_base, store  # noqa: F401 - pytest fixtures
from cli.maskfer_cli import main
from featcache.taxonomy import CLASSES
from maskfer import rundir
from maskfer.config import TrainConfig
from maskfer.data import holdout_split, load_split
from maskfer.evaluate import EvalError, evaluate_run
from maskfer.parallel import train_parallel
from maskfer.rundir import RunDirError
from maskfer.batches import TrainingData, batch_bounds
from maskfer.train import TrainError, Trainer, train


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def clean_error(r, *needles):
    """Exit 1, no traceback, ONE 'error:' line on stderr holding every needle."""
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and r.stderr.startswith("error:"), r.stderr
    text = re.sub(r"\s+", " ", r.stderr)
    for n in needles:
        assert n in text, (n, text)


def train_args(store, out, *extra):
    return ["train", "--cache", store, "--train", "domB", "--out", out, "--epochs", 1, "--batch-size", 16,
            "--image-size", 16, "--drop", 1, "--device", "cpu", "--quiet", *extra]


@pytest.fixture
def probe_run(store, fx_base):
    """A finished linear-probe run (cheap); tests copy it before changing anything."""
    return mf.trained_run(fx_base, store, "faults-probe", method="linear-probe")


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# ---------------------------------------------------------------- 1. a last training batch of one image
@pytest.mark.parametrize("n,batch,want", [(1, 4, [(0, 1)]), (5, 4, [(0, 5)]), (8, 4, [(0, 4), (4, 8)]),
                                         (9, 4, [(0, 4), (4, 9)]), (10, 4, [(0, 4), (4, 8), (8, 10)]),
                                         (65, 32, [(0, 32), (32, 65)]), (3, 1, [(0, 1), (1, 2), (2, 3)])])
def test_batch_bounds_fold_a_lone_last_sample_into_the_previous_batch(n, batch, want):
    got = batch_bounds(n, batch)
    assert got == want
    assert [i for lo, hi in got for i in range(lo, hi)] == list(range(n))  # every sample, once, in order


class _BatchSpy:
    """Records the size and positions of every TRAINING batch TrainingData.batch builds (eval batches are not)."""

    def __init__(self, monkeypatch):
        self.sizes, self.positions = [], []
        orig = TrainingData.batch

        def spy(trainer, data, pos, train, gen):
            if train:
                self.sizes.append(len(pos))
                self.positions += pos.tolist()
            return orig(trainer, data, pos, train, gen)

        monkeypatch.setattr(TrainingData, "batch", spy)


# domB:train has 21 images: batch 10 -> 10, 10, 1 (last batch of ONE after full ones); batch 20 -> 20, 1 (B + 1)
@pytest.mark.parametrize("batch,sizes", [(10, [10, 11]), (20, [21])], ids=["last-1", "B+1"])
@pytest.mark.parametrize("method", ["cafe", "baseline"])
@pytest.mark.parametrize("trainer", ["single", "parallel"])
def test_a_last_batch_of_one_image_trains(store, tmp_path, monkeypatch, batch, sizes, method, trainer):
    spy = _BatchSpy(monkeypatch)
    cfg = mf.small_cfg(store, train="domB", batch_size=batch, method=method, epochs=2)
    if trainer == "single":
        train(cfg, tmp_path / "run", progress=False, log=mf.quiet)
        runs = [tmp_path / "run"]
    else:
        runs = [tmp_path / "a", tmp_path / "b"]
        train_parallel([cfg, TrainConfig(**{**cfg.to_dict(), "seed": 1})], runs, progress=False, log=mf.quiet)
    assert spy.sizes == sizes * 2  # two epochs; the lone image joined the batch before it
    for e in range(2):  # every image is trained on in every epoch
        per_epoch = spy.positions[e * 21:(e + 1) * 21]
        assert sorted(per_epoch) == list(range(21))
    for run in runs:
        assert [r["epoch"] for r in rundir.read_metrics(run)] == [0, 1]
        assert rundir.load_checkpoint(run / rundir.LAST)[2]["epoch"] == 1


def test_a_training_split_of_one_image_is_refused_clearly(store, tmp_path):
    one = mf.copy_store(store, tmp_path / "one.h5")

    def one_row_split(g):
        splits = np.asarray(g["splits"].asstr()[()])
        g["splits"][int(np.flatnonzero(splits == "train")[0])] = "one"

    mf.edit_store(one, "domB", one_row_split)
    with pytest.raises(TrainError, match=r"domB:one has 1 training image\(s\).*BatchNorm needs at least 2"):
        train(mf.small_cfg(one, train="domB:one"), tmp_path / "run", progress=False, log=mf.quiet)


# ---------------------------------------------------------------- 2. eval merges results.json per test set
def test_eval_merges_results_per_test_set(probe_run, tmp_path):
    run = copy_run(probe_run, tmp_path / "run")
    (run / rundir.RESULTS).unlink(missing_ok=True)
    assert invoke("eval", "--run", run, "--test", "domA", "--device", "cpu").exit_code == 0
    first = rundir.read_json(run / rundir.RESULTS)
    assert set(first["tests"]) == {"domA:test"}
    r = invoke("eval", "--run", run, "--test", "domB:train", "--device", "cpu")
    assert r.exit_code == 0, r.output
    both = rundir.read_json(run / rundir.RESULTS)
    assert set(both["tests"]) == {"domA:test", "domB:train"}  # the earlier test set is kept ...
    assert both["tests"]["domA:test"] == first["tests"]["domA:test"]  # ... untouched
    # the table printed is this evaluation's: only domB:train
    assert "domB:train" in r.stdout and "domA:test" not in r.stdout

    # re-evaluating a test set replaces only its own entry
    doctored = json.loads(json.dumps(both))
    doctored["tests"]["domA:test"]["accuracy"] = -1.0
    rundir.write_json(run / rundir.RESULTS, doctored)
    evaluate_run(run, None, ["domA"], device="cpu", log=mf.quiet)
    again = rundir.read_json(run / rundir.RESULTS)
    assert again["tests"]["domA:test"] == first["tests"]["domA:test"]
    assert again["tests"]["domB:train"] == both["tests"]["domB:train"]
    assert list(run.glob("*.tmp-*")) == []


def test_eval_drops_results_of_another_checkpoint_with_a_note(probe_run, tmp_path):
    run = copy_run(probe_run, tmp_path / "run")
    evaluate_run(run, None, ["domA"], device="cpu", log=mf.quiet)
    old = rundir.read_json(run / rundir.RESULTS)
    rundir.write_json(run / rundir.RESULTS, {**old, "epochs_trained": old["epochs_trained"] + 5})  # an older eval
    notes = []
    evaluate_run(run, None, ["domB"], device="cpu", log=notes.append)
    assert set(rundir.read_json(run / rundir.RESULTS)["tests"]) == {"domB:test"}
    assert any("dropping results for domA:test" in n for n in notes)


def test_eval_results_write_is_atomic(probe_run, tmp_path, monkeypatch):
    run = copy_run(probe_run, tmp_path / "run")
    evaluate_run(run, None, ["domA"], device="cpu", log=mf.quiet)
    before = (run / rundir.RESULTS).read_bytes()
    import os

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run, None, ["domB"], device="cpu", log=mf.quiet)
    assert (run / rundir.RESULTS).read_bytes() == before and list(run.glob("*.tmp-*")) == []


def test_concurrent_results_updates_both_land(tmp_path):
    """Two evaluations of one run finishing together: the read-merge-write is locked, neither update is lost."""
    path = tmp_path / rundir.RESULTS
    rundir.write_json(path, {"tests": {}})

    def add(name):
        def fn(old):
            time.sleep(0.3)  # both read before either writes, without the lock
            return {"tests": {**old["tests"], name: 1}}

        rundir.update_json(path, fn)

    threads = [threading.Thread(target=add, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rundir.read_json(path)["tests"] == {"a": 1, "b": 1}


# ---------------------------------------------------------------- 3. bad config.json, bad numeric options
def _edit_config(run: Path, fn) -> None:
    d = json.loads((run / rundir.CONFIG).read_text())
    fn(d)
    (run / rundir.CONFIG).write_text(json.dumps(d))


BAD_CONFIGS = {
    "invalid JSON": (lambda run: (run / rundir.CONFIG).write_text('{"config": {"method": "cafe",'),
                     ["not valid JSON", "line 1"]),
    "feat_dim a string": (lambda run: _edit_config(run, lambda d: d.update(feat_dim="sixteen")),
                          ["invalid field 'feat_dim'", "positive integer"]),
    "feat_dim negative": (lambda run: _edit_config(run, lambda d: d.update(feat_dim=-16)), ["'feat_dim'"]),
    "feat_dim vs encoder": (lambda run: _edit_config(run, lambda d: d.update(feat_dim=24)),
                            ["'feat_dim'", "disagrees with encoder.dim 16"]),
    "feat_dim vs checkpoint": (
        lambda run: _edit_config(run, lambda d: (d.update(feat_dim=24), d["encoder"].update(dim=24))),
        ["does not fit the model", "feat_dim 24"]),
    "unknown method": (lambda run: _edit_config(run, lambda d: d["config"].update(method="mask")),
                       ["invalid field 'config.method'", "not 'mask'"]),
    "negative image size": (lambda run: _edit_config(run, lambda d: d["config"].update(image_size=-16)),
                            ["invalid field 'config.image_size'", "--image-size must be >= 1, not -16"]),
    "lr a string": (lambda run: _edit_config(run, lambda d: d["config"].update(lr="fast")),
                    ["invalid field 'config.lr'", "must be a number"]),
    "config not an object": (lambda run: _edit_config(run, lambda d: d.update(config=[1, 2])), ["field 'config'"]),
    "unknown option": (lambda run: _edit_config(run, lambda d: d["config"].update(learning_rate=1)),
                       ["unknown config option(s): learning_rate"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_run_config_is_one_line_naming_file_and_field(probe_run, tmp_path, case):
    run = copy_run(probe_run, tmp_path / "run")
    damage, needles = BAD_CONFIGS[case]
    damage(run)
    r = invoke("eval", "--run", run, "--test", "domA", "--device", "cpu")
    clean_error(r, *needles, *([] if "checkpoint" in case else [str(run / rundir.CONFIG)]))


def test_bad_run_config_on_predict_and_resume(store, fx_base, probe_run, tmp_path):
    run = copy_run(probe_run, tmp_path / "run")
    _edit_config(run, lambda d: d["config"].update(image_size=-16))
    clean_error(invoke("predict", "--run", run, fx_base / "domA" / "test", "--device", "cpu"),
                str(run / rundir.CONFIG), "config.image_size")
    # resuming a run (same command) whose config.json is damaged
    cafe = tmp_path / "cafe"
    assert invoke(*train_args(store, cafe)).exit_code == 0
    (cafe / rundir.CONFIG).write_text("not json")
    clean_error(invoke(*train_args(store, cafe)), str(cafe / rundir.CONFIG), "not valid JSON")


@pytest.mark.parametrize("opt,value,needle", [
    ("--lr", "nan", "--lr must be a finite number, not nan"), ("--lr", "inf", "--lr must be a finite number"),
    ("--lr", "-1", "--lr must be > 0, not -1.0"), ("--lr", "0", "--lr must be > 0"),
    ("--weight-decay", "nan", "--weight-decay must be a finite"),
    ("--weight-decay", "-1e-4", "--weight-decay must be >= 0"),
    ("--gamma", "nan", "--gamma must be a finite"), ("--gamma", "1.5", "--gamma in (0, 1] is required"),
    ("--lambda", "-inf", "--lambda must be a finite"), ("--lambda", "-1", "--lambda must be >= 0"),
    ("--beta", "nan", "--beta must be a finite"), ("--erasing", "nan", "--erasing must be a finite"),
    ("--noise-std", "-0.1", "--noise-std must be >= 0"), ("--workers", "-2", "--workers must be >= 0"),
    ("--epochs", "0", "--epochs must be >= 1"), ("--image-size", "-16", "--image-size must be >= 1"),
])
def test_bad_numeric_options_are_one_line_naming_the_option(store, tmp_path, opt, value, needle):
    clean_error(invoke(*train_args(store, tmp_path / "run", opt, value)), needle)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_bad_numeric_options_in_sweep_and_predict(store, probe_run, tmp_path):
    sweep = ["sweep", "--cache", store, "--train", "domA", "--out", tmp_path / "sw", "--val-split", "holdout:0.25"]
    clean_error(invoke(*sweep, "--grid", "seed=0,1", "--set", "lr=nan"), "--set lr", "'nan' is not a valid float")
    clean_error(invoke(*sweep, "--grid", "lr=0.1,-1"), "grid point lr=-1.0", "--lr must be > 0")
    r = invoke("predict", "--run", probe_run, "x.png", "--batch-size", "0")
    assert r.exit_code == 2 and "--batch-size" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- 4. non-finite loss
@pytest.fixture
def huge_store(store, fx_base):
    """The fixture store with every feature of domA and domB set to 3e38 (finite, but any product overflows)."""
    key = ("huge",)
    if key not in mf._CACHE:
        path = mf.copy_store(store, fx_base / "huge.h5")
        for ds in ("domA", "domB"):
            mf.edit_store(path, ds, lambda g: g["encoders"]["tiny-clip"]["features"].__setitem__(..., 3e38))
        mf._CACHE[key] = path
    return mf._CACHE[key]


LOSS_NOT_FINITE = r"the training loss is not finite in epoch 1/2, step 1/3 \(ce = (nan|inf)"


@pytest.mark.parametrize("progress", [False, True])
def test_non_finite_loss_stops_training_and_writes_no_checkpoint(huge_store, tmp_path, progress):
    out = tmp_path / "run"
    cfg = mf.small_cfg(huge_store, train="domB", batch_size=8, epochs=2)
    with pytest.raises(TrainError, match=LOSS_NOT_FINITE + r".*no checkpoint was written"):
        train(cfg, out, progress=progress, log=mf.quiet)
    assert (out / rundir.CONFIG).exists()
    assert not (out / rundir.LAST).exists() and rundir.read_metrics(out) == []


def test_non_finite_loss_keeps_the_previous_checkpoint(store, huge_store, tmp_path, monkeypatch):
    """Epoch 1 trains on sane features; the resumed epoch 2 reads 3e38 features (--cache may change on resume)."""
    import maskfer.engine as train_mod

    out = tmp_path / "run"
    calls = []
    orig = train_mod.epoch_order

    def stop_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(train_mod, "epoch_order", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(mf.small_cfg(store, train="domB", batch_size=8, epochs=2), out, progress=False, log=mf.quiet)
    monkeypatch.setattr(train_mod, "epoch_order", orig)
    ckpt = (out / rundir.LAST).read_bytes()
    metrics = (out / rundir.METRICS).read_text()
    with pytest.raises(TrainError, match=r"not finite in epoch 2/2, step 1/3 .* keeps the checkpoint of epoch 1"):
        train(mf.small_cfg(huge_store, train="domB", batch_size=8, epochs=2), out, progress=False, log=mf.quiet)
    assert (out / rundir.LAST).read_bytes() == ckpt and (out / rundir.METRICS).read_text() == metrics
    r = invoke(*train_args(huge_store, tmp_path / "cli", "--batch-size", 8))  # the CLI: one line, exit 1
    clean_error(r, "the training loss is not finite in epoch 1/1, step 1/3")


def test_non_finite_loss_stops_a_parallel_group(huge_store, tmp_path):
    cfgs = [mf.small_cfg(huge_store, train="domB", batch_size=8, epochs=2, seed=s) for s in (0, 1)]
    outs = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(TrainError, match=r"run 1/2 \(.*a\): " + LOSS_NOT_FINITE + r".*run 2/2 \(.*b\)"):
        train_parallel(cfgs, outs, progress=False, log=mf.quiet)
    for out in outs:
        assert not (out / rundir.LAST).exists() and rundir.read_metrics(out) == []


def test_finiteness_is_read_only_where_the_trainers_already_sync(store, tmp_path, monkeypatch):
    """The per-step check is device-side; the host reads it once per epoch (and at progress refreshes), never
    per step: with 3 steps per epoch and no progress bar, 2 epochs read it twice (per model in a group)."""
    import maskfer.engine as train_mod

    reads = []
    orig = train_mod.nonfinite_message
    monkeypatch.setattr(train_mod, "nonfinite_message", lambda *a, **k: reads.append(1) or orig(*a, **k))
    cfg = mf.small_cfg(store, train="domB", batch_size=8, epochs=2)
    train(cfg, tmp_path / "single", progress=False, log=mf.quiet)
    assert len(reads) == 2
    reads.clear()
    train_parallel([cfg, TrainConfig(**{**cfg.to_dict(), "seed": 1})], [tmp_path / "a", tmp_path / "b"],
                   progress=False, log=mf.quiet)
    assert len(reads) == 2 * 2


def test_checkpoint_with_non_finite_weights_is_refused(tmp_path):
    model = torch.nn.Linear(3, 2)
    path = tmp_path / rundir.LAST
    rundir.save_checkpoint(path, model, None, {"epoch": 0})
    before = path.read_bytes()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(RunDirError, match=r"refusing to write checkpoint .*model\.weight holds NaN/inf"):
        rundir.save_checkpoint(path, model, None, {"epoch": 1})
    assert path.read_bytes() == before and list(tmp_path.glob("*.tmp-*")) == []


# ---------------------------------------------------------------- 5. predict with nothing predicted
def test_predict_exits_non_zero_when_nothing_was_predicted(probe_run, fx_base, tmp_path):
    broken = [tmp_path / "a.jpg", tmp_path / "b.png"]
    for b in broken:
        b.write_bytes(b"not an image")
    r = invoke("predict", "--run", probe_run, *broken, "--device", "cpu")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert all(f"{b}: ERROR" in r.stdout for b in broken)  # each failure listed ...
    assert "error: none of the 2 input(s) could be predicted" in r.stderr  # ... and the run fails
    r = invoke("predict", "--run", probe_run, *broken, "--output", tmp_path / "p.csv", "--device", "cpu")
    assert r.exit_code == 1 and (tmp_path / "p.csv").exists()
    # a partial success still exits 0, with the failure listed and a note
    r = invoke("predict", "--run", probe_run, fx_base / "domA" / "test" / "anger", broken[0], "--device", "cpu",
               "--detect", "none")
    assert r.exit_code == 0 and f"{broken[0]}: ERROR" in r.stdout
    assert "1 of 3 input(s) could not be predicted" in r.stderr
    # images in which the detector finds no face: a row each, exit 0, and a note saying so
    r = invoke("predict", "--run", probe_run, fx_base / "domA" / "test" / "anger", "--device", "cpu")
    assert r.exit_code == 0 and r.stdout.count(": no face found") == 2
    assert "no face found in 2 image(s)/frame(s); for pre-cropped faces use --detect none" in r.stderr


# ---------------------------------------------------------------- 6. --test checked before training
@pytest.fixture
def no_epochs(monkeypatch):
    import maskfer.engine as train_mod

    def boom(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(train_mod, "epoch_order", boom)


@pytest.mark.parametrize("tests,needle", [("domA,nope", "--test nope: store"), ("domA:val", "--test domA:val"),
                                          ("domB:train,domZ:test", "has no dataset 'domZ'")])
def test_train_checks_test_sets_before_training(store, tmp_path, no_epochs, tests, needle):
    out = tmp_path / "run"
    clean_error(invoke(*train_args(store, out, "--test", tests)), needle)
    assert not (out / rundir.LAST).exists()


@pytest.mark.parametrize("parallel", [1, 2])
def test_sweep_checks_test_sets_before_training(store, tmp_path, no_epochs, parallel):
    out = tmp_path / "sw"
    clean_error(invoke("sweep", "--cache", store, "--train", "domA", "--out", out, "--val-split", "holdout:0.25",
                       "--test", "domA,nope", "--grid", "seed=0,1", "--parallel", parallel, "--set", "image-size=16",
                       "--set", "drop=1", "--device", "cpu", "--quiet"), "has no dataset 'nope'")
    assert not (out / "runs").exists()


def test_eval_checks_every_test_set_before_evaluating(probe_run, tmp_path):
    run = copy_run(probe_run, tmp_path / "run")
    (run / rundir.RESULTS).unlink(missing_ok=True)
    with pytest.raises(EvalError, match="--test nope: store .* has no dataset 'nope'"):
        evaluate_run(run, None, ["domA", "nope"], device="cpu", log=mf.quiet)
    assert not (run / rundir.RESULTS).exists()


# ---------------------------------------------------------------- 7. no markup / emoji in user strings
def test_log_lines_print_user_strings_verbatim(probe_run, tmp_path):
    run = copy_run(probe_run, tmp_path / "run")
    r = invoke("eval", "--run", run, "--test", "domA:train", "--device", "cpu")
    assert r.exit_code == 0 and "domA:train: accuracy" in r.stderr and "\N{STEAM LOCOMOTIVE}" not in r.stderr
    assert "\N{STATION}" not in r.stderr
    clean_error(invoke("eval", "--run", run, "--test", "nope:train:[bold]x[/]", "--device", "cpu"),
                "--test nope:train:[bold]x[/]")


def test_progress_bar_prints_descriptions_verbatim(capsys):
    from rich.console import Console

    from featcache.progress import progress_bar

    text = "ferplus:train: [bold]x[/] :smile:"
    with progress_bar(text, total=2) as advance:  # the default console (stderr)
        advance(2, loss=0.5)
    assert text in capsys.readouterr().err
    buf = io.StringIO()
    with progress_bar(text, total=2, console=Console(file=buf, width=200)) as advance:
        advance(2)
    assert text in buf.getvalue()


# ---------------------------------------------------------------- 8. holdout: a partition of the training split
def _expected_val(n: int, fraction: float) -> int:
    k = int(round(fraction * n))
    return min(max(k, 1), n - 1) if n >= 2 else k


@pytest.mark.parametrize("dataset,fraction", [("domA", 0.25), ("domB", 0.1), ("domB", 0.9)])
def test_holdout_partitions_the_training_split_by_class(store, dataset, fraction):
    data, _ = load_split(str(store), dataset, "train", None, False, 16)
    train_part, val = holdout_split(data, fraction)
    assert set(train_part.ids).isdisjoint(val.ids) and set(train_part.rows).isdisjoint(val.rows)
    assert sorted(np.concatenate([train_part.rows, val.rows])) == sorted(data.rows)
    assert len(train_part) + len(val) == len(data)
    labels = data.labels.numpy()
    for c in range(len(CLASSES)):
        n = int((labels == c).sum())
        assert int((val.labels.numpy() == c).sum()) == _expected_val(n, fraction), CLASSES[c]
        assert int((train_part.labels.numpy() == c).sum()) == n - _expected_val(n, fraction), CLASSES[c]
    # each part's labels and features are those of its own rows
    where = {r: i for i, r in enumerate(data.rows)}
    for part in (train_part, val):
        idx = torch.tensor([where[r] for r in part.rows])
        assert torch.equal(part.labels, data.labels[idx]) and torch.equal(part.feats, data.feats[idx])
    again_train, again_val = holdout_split(data, fraction)  # fixed seed: the same rows every time
    assert list(again_val.ids) == list(val.ids)


def test_holdout_of_uneven_classes():
    from maskfer.data import SplitData

    labels = np.repeat(np.arange(7), [1, 2, 3, 10, 40, 5, 7])
    n = len(labels)
    data = SplitData("x:train", "x", "train", np.arange(n), np.array([f"i{i}" for i in range(n)]),
                     torch.from_numpy(labels), torch.arange(n, dtype=torch.float32).view(n, 1, 1).repeat(1, 2, 1), None)
    train_part, val = holdout_split(data, 0.2)
    assert set(train_part.ids).isdisjoint(val.ids) and len(train_part) + len(val) == n
    got = np.bincount(val.labels.numpy(), minlength=7).tolist()
    assert got == [_expected_val(int(c), 0.2) for c in np.bincount(labels)] == [0, 1, 1, 2, 8, 1, 1]


def test_report_on_a_damaged_run_config_is_one_line(store, tmp_path):
    pytest.importorskip("matplotlib")
    from cli.maskfer_cli import main as mcli

    run = tmp_path / "run"
    train(mf.small_cfg(store, method="linear-head"), run, progress=False, log=mf.quiet)
    cfg = json.loads((run / "config.json").read_text())
    cfg["config"]["image_size"] = -3
    (run / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(mcli, ["report", str(run), "--no-tsne"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "config.json: invalid field 'config.image_size'" in r.output, r.output
