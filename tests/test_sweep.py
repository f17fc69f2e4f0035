"""`maskfer sweep` (docs/sweep.md): typed grids, every bad input refused before training, resume after a
kill, validation-only selection with mean ± std over seeds, the --parallel path, --dry-run.

One small store (module scope): domA has train / val / test splits, domB has train / test and NO val split
(the holdout case). 16-d tiny-CLIP features, so drop <= 1; mobilenet_v2 at 16 px, 1-2 epochs per run.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import maskfer_fixtures as mf
import maskfer.sweep
from cli.maskfer_cli import main
from maskfer import rundir
from maskfer.config import TrainConfig
from maskfer.parallel import check_group, group_key
from maskfer.sweep import (
    SweepError,
    coerce,
    expand,
    load_sweep_file,
    parse_grid,
    plan_sweep,
    point_id,
    run_sweep,
    summarize_sweep,
)
from maskfer.train import Trainer

TESTS = ["domA", "domB"]                      # the train domain's test split and an unseen domain
RESOLVED_TESTS = {"domA:test", "domB:test"}   # their names in results.json


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_clip_dir) -> Path:
    return mf.two_domain_store(tmp_path_factory.mktemp("sweep_store"), tiny_clip_dir,
                               {"train": 4, "val": 2, "test": 2}, {"train": 4, "test": 2})


def base_cfg(store, **kw) -> TrainConfig:
    d = dict(cache=str(store), train="domA", test=list(TESTS), epochs=1, batch_size=16, image_size=16, drop=1,
             device="cpu", backbone="mobilenet_v2", val_split="val")
    d.update(kw)
    return TrainConfig(**d)


def sweep(store, out, grid, parallel=1, log=mf.quiet, **kw) -> dict:
    return run_sweep(base_cfg(store, **kw), grid, out, parallel=parallel, progress=False, log=log)


@pytest.fixture
def no_training(monkeypatch):
    """Any attempt to train (sequential or parallel) fails the test."""
    import maskfer.parallel

    def boom(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "__init__", boom)
    monkeypatch.setattr(Trainer, "run", boom)
    monkeypatch.setattr(maskfer.sweep, "train_parallel", boom)


@pytest.fixture
def count_runs(monkeypatch) -> list[str]:
    """Names of the run directories Trainer.run is called on, in order."""
    calls: list[str] = []
    real = Trainer.run

    def counting(self):
        calls.append(self.out.name)
        return real(self)

    monkeypatch.setattr(Trainer, "run", counting)
    return calls


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _complete(run: Path, epochs: int, tests=RESOLVED_TESTS) -> None:
    rows = rundir.read_metrics(run)
    assert [r["epoch"] for r in rows] == list(range(epochs)) and all("val_acc" in r for r in rows)
    assert rundir.load_checkpoint(run / rundir.LAST)[2]["epoch"] == epochs - 1
    assert set(rundir.read_json(run / rundir.RESULTS)["tests"]) == set(tests)


# ---------------------------------------------------------------- grid parsing
def test_grid_values_get_the_type_of_their_option():
    grid = parse_grid(["lambda=0.5,1.5,5", "seed=0,1", "sigmoid=true,false", "backbone=resnet18,mobilenet_v2",
                       "--noise-std=0,0.1", "drop_mode=sample,batch", "pretrained=none,w.pth"])
    assert grid == {"lam": [0.5, 1.5, 5.0], "seed": [0, 1], "sigmoid": [True, False],
                    "backbone": ["resnet18", "mobilenet_v2"], "noise_std": [0.0, 0.1],
                    "drop_mode": ["sample", "batch"], "pretrained": [None, "w.pth"]}
    types = {k: [type(v) for v in vs] for k, vs in grid.items()}
    assert types["lam"] == [float] * 3 and types["seed"] == [int] * 2 and types["sigmoid"] == [bool] * 2
    assert types["noise_std"] == [float] * 2 and types["backbone"] == [str] * 2
    assert parse_grid(["noise-std=0"]) == parse_grid(["noise_std=0"])  # dashes or underscores
    # the values land in TrainConfig's fields, one configuration per grid point, axes in the order given
    points = expand(TrainConfig(train="x"), {"lam": grid["lam"], "seed": grid["seed"]})
    assert [(c.lam, c.seed) for _, _, c in points] == [(0.5, 0), (0.5, 1), (1.5, 0), (1.5, 1), (5.0, 0), (5.0, 1)]
    assert [rid for rid, _, _ in points][:2] == ["lambda=0.5_seed=0", "lambda=0.5_seed=1"]
    # list options: '+' inside --grid, ',' or '+' in --set / a TOML string
    assert coerce("test", "domA,domB", "--set test") == coerce("test", "domA+domB", "") == ["domA", "domB"]
    assert coerce("epochs", 3.0, "toml") == 3 and type(coerce("epochs", "3", "")) is int


def test_sweep_file_base_and_grid(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('[base]\ncache = "f.h5"\ntrain = "domA"\ntest = ["domA", "domB"]\nepochs = 3\nlambda = 2\n'
                 'val_split = "val"\n\n[grid]\nlambda = [0.5, 1.5, 5]\nbeta = [1, 5]\nseed = [0, 1]\nsigmoid = [true]\n')
    base, grid = load_sweep_file(f)
    assert base == {"cache": "f.h5", "train": "domA", "test": ["domA", "domB"], "epochs": 3, "lam": 2.0,
                    "val_split": "val"}
    assert type(base["lam"]) is float and type(base["epochs"]) is int
    assert grid == {"lam": [0.5, 1.5, 5.0], "beta": [1.0, 5.0], "seed": [0, 1], "sigmoid": [True]}
    assert [type(v) for v in grid["beta"]] == [float, float]


# ---------------------------------------------------------------- bad input: one line, exit 1, nothing trained
def _args(store, out, *extra):
    return ("sweep", "--cache", store, "--train", "domA", "--test", ",".join(TESTS), "--out", out, "--quiet",
            "--set", "epochs=1", "--set", "image-size=16", "--set", "backbone=mobilenet_v2", "--set", "drop=1",
            "--set", "batch-size=16", *extra)


def _assert_clean_error(r, *needles):
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and r.stderr.startswith("error:"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one line
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def _toml(tmp_path, text):
    f = tmp_path / "sweep.toml"
    f.write_text(text)
    return f


BAD = {
    "unknown axis": (["--grid", "lamda=1,2"], ["grid axis 'lamda' names no training option; options:", "lambda",
                                               "drop-mode", "seed"]),
    "not an axis": (["--grid", "cache=a.h5,b.h5"], ["grid axis 'cache' is not a sweep axis: one sweep has one --cache"]),
    "negated axis": (["--grid", "no-sigmoid=true"], ["grid axis 'no-sigmoid' names no training option; set "
                                                     "sigmoid to false"]),
    "unknown --set": (["--set", "epoch=2", "--grid", "seed=0"], ["--set option 'epoch' names no training option"]),
    "int axis, letter": (["--grid", "seed=0,a"], ["--grid seed: 'a' is not a valid int for option 'seed'"]),
    "int axis, fraction": (["--grid", "epochs=1.5"], ["'1.5' is not a valid int for option 'epochs'"]),
    "float axis, letter": (["--grid", "lambda=x"], ["'x' is not a valid float for option 'lambda'"]),
    "bool axis": (["--grid", "sigmoid=maybe"], ["'maybe' is not a valid bool"]),
    "empty grid": ([], ["the grid is empty"]),
    "axis without values": (["--grid", "beta="], ["the axis 'beta' has no values"]),
    "no '='": (["--grid", "beta"], ["expected AXIS=V1,V2"]),
    "axis twice": (["--grid", "seed=0", "--grid", "seed=1"], ["axis 'seed' given twice"]),
    "axis twice, alias": (["--grid", "lambda=1", "--grid", "lam=2"], ["given twice"]),
    "value twice": (["--grid", "lambda=1,1.0"], ["the value 1.0 is given twice"]),
    "invalid option value": (["--grid", "epochs=0,1"], ["grid point epochs=0: --epochs must be >= 1"]),
    "invalid backbone": (["--grid", "backbone=vgg"], ["--backbone must be one of"]),
    # only the store knows the feature dim (16 here: groups of 2+ channels): checked up front all the same
    "drop too large": (["--grid", "drop=0,1,2"], ["grid point drop=2: --drop 2", "16 channels", "drop at most 1"]),
    "no val split": (["--train", "domB", "--grid", "seed=0"], ["--val-split val:", "no split 'val'",
                                                               "holdout:0.1"]),
    "bad holdout": (["--val-split", "holdout:2", "--grid", "seed=0"], ["expected holdout:FRACTION"]),
    "unknown test set": (["--test", "domA,domZ", "--grid", "seed=0"], ["has no dataset 'domZ'"]),
    "missing pretrained": (["--grid", "pretrained=none,nope.pth"], ["--pretrained nope.pth: no such file"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_grid_is_one_line_before_training(case, store, tmp_path, no_training):
    extra, needles = BAD[case]
    out = tmp_path / "sw"
    _assert_clean_error(invoke(*_args(store, out, *extra)), *needles)
    assert not out.exists()  # not even sweep.json: the corrected command must not be refused


BAD_FILES = {
    "unknown table": ("[base]\nepochs = 1\n[grids]\nseed = [0]\n",
                      ["unknown table(s) grids; a sweep file has [base] and [grid]"]),
    "unknown base option": ("[base]\nepoch = 1\n[grid]\nseed = [0]\n",
                            ["[base] option 'epoch' is not a training option; options:"]),
    "unknown grid axis": ("[grid]\nsed = [0, 1]\n", ["grid axis 'sed' names no training option"]),
    "wrong type in file": ("[grid]\nseed = [0, \"a\"]\n", ["[grid] seed: 'a' is not a valid int"]),
    "float for int": ("[grid]\nepochs = [1, 2.5]\n", ["[grid] epochs: 2.5 is not a valid int"]),
    "empty axis in file": ("[grid]\nbeta = []\n", ["[grid] axis 'beta' has no values"]),
    "alias twice in file": ("[grid]\nlambda = [1.0]\nlam = [2.0]\n", ["[grid] axis 'lam' is given twice"]),
    "not a table": ("grid = 3\n", ["'grid' must be a table ([grid])"]),
    "not TOML": ("[grid\n", ["cannot read the sweep file"]),
    "axis in file and --grid": ("[grid]\nlambda = [0.5, 1.5]\n", ["axis lambda given both in", "and with --grid"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_cli_bad_sweep_file_is_one_line_before_training(case, store, tmp_path, no_training):
    text, needles = BAD_FILES[case]
    out = tmp_path / "sw"
    extra = ["--grid", "lambda=2"] if case == "axis in file and --grid" else []
    r = invoke(*_args(store, out, "--sweep-file", _toml(tmp_path, text), *extra))
    _assert_clean_error(r, *needles)
    assert not out.exists()


def test_sweep_dir_of_another_grid_or_base_is_refused(store, tmp_path, no_training):
    out = tmp_path / "sw"
    plan_sweep(base_cfg(store), {"lam": [0.5, 1.5], "seed": [0, 1]}, out)  # writes sweep.json only
    record = (out / "sweep.json").read_text()
    assert json.loads(record)["axes"] == ["lam", "seed"] and not (out / "runs").exists()
    grid = ["--grid", "lambda=0.5,1.5", "--grid", "seed=0,1"]
    cases = [
        (["--grid", "lambda=0.5,5", "--grid", "seed=0,1"], ["was made by another sweep", "grid differs in: lambda;",
                                                             "base options differ in: -", "Use a new --out"]),
        (["--grid", "lambda=0.5,1.5"], ["grid differs in: seed;"]),
        ([*grid, "--set", "lr=0.001"], ["grid differs in: -; base options differ in: lr"]),
        ([*grid, "--val-split", "holdout:0.25"], ["base options differ in: val-split"]),
    ]
    for extra, needles in cases:
        _assert_clean_error(invoke(*_args(store, out, *extra)), *needles)
        _assert_clean_error(invoke(*_args(store, out, *extra, "--dry-run")), *needles)  # checked by --dry-run too
    assert (out / "sweep.json").read_text() == record and not (out / "runs").exists()
    # the same sweep is accepted, with its axes in any order (run directories keep the first order)
    r = invoke(*_args(store, out, "--grid", "seed=0,1", "--grid", "lambda=0.5,1.5", "--dry-run"))
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[:4] == ["lambda=0.5_seed=0", "lambda=0.5_seed=1", "lambda=1.5_seed=0",
                                         "lambda=1.5_seed=1"]


def test_library_errors_come_before_anything_is_written(store, tmp_path, no_training):
    out = tmp_path / "sw"
    with pytest.raises(SweepError, match="drop at most 1"):
        sweep(store, out, {"drop": [0, 1, 2]})
    with pytest.raises(SweepError, match="give --val-split"):
        sweep(store, out, {"seed": [0]}, val_split=None)
    with pytest.raises(SweepError, match="grid is empty"):
        sweep(store, out, {})
    with pytest.raises(SweepError, match="share the run directory"):  # '/' and '-' both become '-'
        plan_sweep(base_cfg(store), {"root": ["a/b", "a-b"]}, out)
    assert not out.exists()


# ---------------------------------------------------------------- dry run
def test_dry_run_lists_the_configurations_and_trains_nothing(store, tmp_path, no_training):
    out = tmp_path / "sw"
    f = _toml(tmp_path, f'[base]\ncache = "{store}"\ntrain = "domA"\ntest = ["domA", "domB"]\nepochs = 1\ndrop = 1\n'
                        '[grid]\nlambda = [0.5, 1.5]\nbeta = [1, 5]\n')
    r = invoke("sweep", "--sweep-file", f, "--out", out, "--grid", "seed=0,1", "--set", "image-size=16", "--dry-run")
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert lines[:-1] == [f"lambda={lam}_beta={b}_seed={s}" for lam in (0.5, 1.5) for b in (1.0, 5.0) for s in (0, 1)]
    assert lines[-1] == "8 configurations; nothing trained (--dry-run)"
    assert not out.exists()


# ---------------------------------------------------------------- resume
GRID = {"lam": [0.5, 1.5], "seed": [0, 1]}
RUNS = ["lambda=0.5_seed=0", "lambda=0.5_seed=1", "lambda=1.5_seed=0", "lambda=1.5_seed=1"]


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> Path:
    """An uninterrupted 4-configuration sweep, 2 epochs each."""
    out = tmp_path_factory.mktemp("ref") / "sweep"
    sweep(store, out, GRID, epochs=2)
    return out


def test_uninterrupted_sweep_has_complete_runs_and_a_summary(reference):
    assert sorted(p.name for p in (reference / "runs").iterdir()) == RUNS
    for name in RUNS:
        _complete(reference / "runs" / name, 2)
    summary = rundir.read_json(reference / "summary.json")
    assert [r["config"] for r in summary["rows"]] == [{"lam": 0.5}, {"lam": 1.5}]
    assert [r["runs"] for r in summary["rows"]] == [[f"runs/{n}" for n in RUNS[:2]], [f"runs/{n}" for n in RUNS[2:]]]
    assert sum(r["selected"] for r in summary["rows"]) == 1
    assert all(set(r["tests"]) == RESOLVED_TESTS and r["n_seeds"] == 2 for r in summary["rows"])


def test_finished_configurations_are_skipped(store, reference, tmp_path, count_runs):
    out = tmp_path / "sw"
    shutil.copytree(reference, out)
    for p in ("summary.json", "summary.md", "summary.csv"):
        (out / p).unlink()
    for name in (RUNS[1], RUNS[3]):
        shutil.rmtree(out / "runs" / name)
    kept = {n: ((out / "runs" / n / rundir.LAST).stat().st_mtime_ns, (out / "runs" / n / rundir.LAST).read_bytes())
            for n in (RUNS[0], RUNS[2])}
    logs: list[str] = []
    summary = sweep(store, out, GRID, epochs=2, log=logs.append)
    assert count_runs == [RUNS[1], RUNS[3]]
    assert f"sweep {out}: 4 configurations, 2 already finished" in logs
    for n, (mtime, data) in kept.items():
        ckpt = out / "runs" / n / rundir.LAST
        assert ckpt.stat().st_mtime_ns == mtime and ckpt.read_bytes() == data
    assert summary == rundir.read_json(reference / "summary.json")
    # everything finished: a rerun, even with the axes in another order, trains nothing
    sweep(store, out, {"seed": [0, 1], "lam": [0.5, 1.5]}, epochs=2)
    assert count_runs == [RUNS[1], RUNS[3]] and sorted(p.name for p in (out / "runs").iterdir()) == RUNS


def test_rerun_with_other_test_sets_reevaluates_without_training(store, reference, tmp_path, count_runs):
    out = tmp_path / "sw"
    shutil.copytree(reference, out)
    summary = sweep(store, out, GRID, epochs=2, test=["domB"])
    assert count_runs == []
    for name in RUNS:
        assert set(rundir.read_json(out / "runs" / name / rundir.RESULTS)["tests"]) == {"domB:test"}
    ref = rundir.read_json(reference / "summary.json")
    assert [r["tests"] for r in summary["rows"]] == [{"domB:test": r["tests"]["domB:test"]} for r in ref["rows"]]


def test_killed_sweep_continues_where_it_stopped(store, reference, tmp_path, monkeypatch, count_runs):
    out = tmp_path / "sw"
    real_append = rundir.append_metrics
    armed = {"left": 1}

    def append_then_interrupt(run, row):  # Ctrl-C in the 3rd configuration, right after its first epoch
        real_append(run, row)
        if Path(run).name == RUNS[2] and armed["left"]:
            armed["left"] -= 1
            raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "append_metrics", append_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        sweep(store, out, GRID, epochs=2)
    assert count_runs == RUNS[:3]
    _complete(out / "runs" / RUNS[0], 2)
    _complete(out / "runs" / RUNS[1], 2)
    assert rundir.load_checkpoint(out / "runs" / RUNS[2] / rundir.LAST)[2]["epoch"] == 0  # 1 of 2 epochs
    assert not (out / "runs" / RUNS[3]).exists() and not (out / "summary.json").exists()

    logs: list[str] = []
    summary = sweep(store, out, GRID, epochs=2, log=logs.append)
    assert count_runs == RUNS[:3] + RUNS[2:]  # the finished two are skipped; the 3rd resumes, the 4th starts
    assert f"resuming {out / 'runs' / RUNS[2]} after epoch 1/2" in logs
    for name in RUNS:
        _complete(out / "runs" / name, 2)
        ref_rows = mf.metrics_without_speed(reference / "runs" / name)
        assert mf.metrics_without_speed(out / "runs" / name) == ref_rows
    assert summary == rundir.read_json(reference / "summary.json")
    for f in ("summary.md", "summary.csv"):
        assert (out / f).read_text() == (reference / f).read_text()


# ---------------------------------------------------------------- selection
VAL = {0.5: [0.60, 0.70, 0.80], 1.5: [0.75, 0.80, 0.85], 5.0: [0.70, 0.70, 0.70]}
TEST_B = {0.5: [0.90, 0.95, 1.00], 1.5: [0.40, 0.50, 0.60], 5.0: [0.20, 0.30, 0.40]}   # unseen domain
TEST_A = {0.5: [0.99, 0.99, 0.99], 1.5: [0.50, 0.50, 0.50], 5.0: [0.10, 0.20, 0.30]}   # train domain's test


def _fake_sweep(out: Path):
    grid = {"lam": [0.5, 1.5, 5.0], "seed": [0, 1, 2]}
    points = expand(TrainConfig(train="domA", val_split="val", epochs=2), grid)
    for rid, point, _ in points:
        run = out / "runs" / rid
        run.mkdir(parents=True)
        lam, s = point["lam"], point["seed"]
        # epoch 0 has a higher val_acc everywhere (0.99): the saved model is the last epoch's, so is its val
        rundir.append_metrics(run, {"epoch": 0, "val_acc": 0.99, "train_acc": 0.1})
        rundir.append_metrics(run, {"epoch": 1, "val_acc": VAL[lam][s], "train_acc": 1.0 - VAL[lam][s]})
        rundir.write_json(run / rundir.RESULTS, {"tests": {"domA:test": {"accuracy": TEST_A[lam][s]},
                                                           "domB:test": {"accuracy": TEST_B[lam][s]}}})
    return points, grid


def test_selection_uses_validation_only_and_mean_std_over_seeds(tmp_path):
    out = tmp_path / "sw"
    points, grid = _fake_sweep(out)
    summary = summarize_sweep(out, points, grid)
    rows = {r["config"]["lam"]: r for r in summary["rows"]}
    assert list(rows) == [0.5, 1.5, 5.0] and summary["axes"] == ["lam"]
    # hand-computed: sample std (ddof=1) over the 3 seeds
    expected = {0.5: (0.70, 0.10, 0.95, 0.05), 1.5: (0.80, 0.05, 0.50, 0.10), 5.0: (0.70, 0.0, 0.30, 0.10)}
    for lam, (vm, vs, tm, ts) in expected.items():
        r = rows[lam]
        assert r["n_seeds"] == 3 and r["runs"] == [f"runs/lambda={lam}_seed={s}" for s in range(3)]
        assert r["val_mean"] == pytest.approx(vm) and r["val_std"] == pytest.approx(vs, abs=1e-12)
        assert r["tests"]["domB:test"] == {"mean": pytest.approx(tm), "std": pytest.approx(ts), "n": 3}
    assert rows[5.0]["tests"]["domA:test"]["std"] == pytest.approx(0.1)
    # lambda 0.5 is best on both test sets; selection follows validation: lambda 1.5
    assert [r["selected"] for r in summary["rows"]] == [False, True, False]
    assert rundir.read_json(out / "summary.json") == json.loads(json.dumps(summary))

    md = (out / "summary.md").read_text().splitlines()
    assert md[0] == "|  | lambda | seeds | val (select) | domA:test | domB:test |"
    table = [line for line in md[2:] if line.startswith("|")]
    assert len(table) == 3 and [("**selected**" in line) for line in table] == [False, True, False]
    assert table[1] == "| **selected** | 1.5 | 3 | 80.00 ± 5.00 | 50.00 ± 0.00 | 50.00 ± 10.00 |"
    assert table[0] == "|  | 0.5 | 3 | 70.00 ± 10.00 | 99.00 ± 0.00 | 95.00 ± 5.00 |"
    assert "test sets are never used to select" in (out / "summary.md").read_text()

    with open(out / "summary.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["selected", "lam", "n_seeds", "val_mean", "val_std", "domA:test_mean",
                                     "domA:test_std", "domB:test_mean", "domB:test_std"]
        csv_rows = list(reader)
    assert [r["selected"] for r in csv_rows] == ["0", "1", "0"] and [r["lam"] for r in csv_rows] == ["0.5", "1.5", "5.0"]
    assert float(csv_rows[1]["val_mean"]) == pytest.approx(0.8) and float(csv_rows[0]["domB:test_std"]) == pytest.approx(0.05)


def test_run_without_validation_is_never_selected(tmp_path):
    out = tmp_path / "sw"
    points, grid = _fake_sweep(out)
    for s in range(3):  # lambda 1.5 (the best on validation) lost its validation numbers
        rundir.atomic_write_text(out / "runs" / f"lambda=1.5_seed={s}" / rundir.METRICS, '{"epoch": 0}\n')
    rows = summarize_sweep(out, points, grid)["rows"]
    assert rows[1]["val_mean"] is None and [r["selected"] for r in rows] == [True, False, False]  # 0.5 wins the tie
    assert "| 1.5 | 3 | – |" in (out / "summary.md").read_text()


def test_holdout_validation_for_a_dataset_without_a_val_split(store, tmp_path):
    out = tmp_path / "sw"
    summary = sweep(store, out, {"lam": [0.5, 1.5]}, train="domB", val_split="holdout:0.25", test=["domA"])
    for name in ("lambda=0.5", "lambda=1.5"):
        run = out / "runs" / name
        _complete(run, 1, {"domA:test"})
        val = rundir.read_metrics(run)[-1]["val_acc"]
        assert round(val * 7) == pytest.approx(val * 7)  # 7 held-out images: 1 of the 4 per class
        assert rundir.read_json(run / rundir.CONFIG)["config"]["val_split"] == "holdout:0.25"
    assert all(r["val_mean"] is not None for r in summary["rows"])
    assert sum(r["selected"] for r in summary["rows"]) == 1
    assert rundir.read_json(out / "sweep.json")["base"]["val_split"] == "holdout:0.25"


# ---------------------------------------------------------------- --parallel
def test_parallel_sweep_groups_trains_together_and_summarizes(store, tmp_path, monkeypatch):
    import maskfer.parallel

    calls: list[list[TrainConfig]] = []
    real = maskfer.parallel.train_parallel

    def spy(cfgs, outs, **kw):
        calls.append(list(cfgs))
        assert [Path(o).name for o in outs] == [point_id({"lam": c.lam, "seed": c.seed}) for c in cfgs]
        return real(cfgs, outs, **kw)

    def no_sequential(*a, **k):
        raise AssertionError("sequential training in a --parallel sweep")

    monkeypatch.setattr(maskfer.sweep, "train_parallel", spy)
    monkeypatch.setattr(Trainer, "run", no_sequential)
    out = tmp_path / "sw"
    summary = sweep(store, out, GRID, parallel=2)
    assert [len(c) for c in calls] == [2, 2]
    for group in calls:
        check_group(group)  # one group: only per-model fields differ
    assert sorted((c.lam, c.seed) for g in calls for c in g) == [(0.5, 0), (0.5, 1), (1.5, 0), (1.5, 1)]
    for group in calls:
        runs = [out / "runs" / point_id({"lam": c.lam, "seed": c.seed}) for c in group]
        for run in runs:
            _complete(run, 1)
            assert rundir.read_json(run / rundir.CONFIG)["parallel_group"]["runs"] == [str(r) for r in runs]
    assert [r["config"] for r in summary["rows"]] == [{"lam": 0.5}, {"lam": 1.5}]
    assert all(r["n_seeds"] == 2 and set(r["tests"]) == RESOLVED_TESTS for r in summary["rows"])
    assert sum(r["selected"] for r in summary["rows"]) == 1 and (out / "summary.md").exists()
    sweep(store, out, GRID, parallel=2)  # finished: nothing trains again
    assert len(calls) == 2


def test_parallel_groups_split_on_non_parallel_fields(store, tmp_path, monkeypatch):
    """lr is not a per-model option: a 2 x 2 lr x seed grid with K = 4 is two groups of 2, never one of 4."""
    import maskfer.parallel

    calls: list[list[TrainConfig]] = []
    monkeypatch.setattr(maskfer.sweep, "train_parallel", lambda cfgs, outs, **kw: calls.append(list(cfgs)))
    monkeypatch.setattr(Trainer, "run", lambda self: pytest.fail("sequential training"))
    sweep(store, tmp_path / "sw", {"lr": [1e-3, 2e-4], "seed": [0, 1]}, parallel=4, test=[])
    assert [[(c.lr, c.seed) for c in g] for g in calls] == [[(1e-3, 0), (1e-3, 1)], [(2e-4, 0), (2e-4, 1)]]
    assert all(len({group_key(c) for c in g}) == 1 for g in calls)
    assert group_key(calls[0][0]) != group_key(calls[1][0])
