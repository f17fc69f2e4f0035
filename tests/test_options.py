"""Each training option is declared once (maskfer.config): the roles derived from it, the identity hash of
existing configs, the CLI options generated from it (the same flags in `maskfer train` and `maskfer sweep`),
`--config FILE`, flags that mean the same in every command of both CLIs, and the docs table.

No training and no feature store here: train() and plan_sweep() are replaced by recorders where a command
would reach them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cli.featcache_cli import main as featcache_main
from cli.maskfer_cli import main as maskfer_main
from maskfer import config
from maskfer.config import ConfigError, TrainConfig

REPO = Path(__file__).resolve().parents[1]

# The hand-kept lists the declaration replaced (as they were before it).
OLD_NON_IDENTITY = ("test", "device", "workers", "root", "cache")
OLD_PARALLEL_FIELDS = ("seed", "lam", "beta", "drop", "drop_mode", "sigmoid", "separation", "diverse", "pretrained")
OLD_DATA_FIELDS = ("cache", "train", "encoder", "val_split", "test", "method", "separation", "drop", "online_encoder",
                   "pretrained", "root")
OLD_NOT_AXES = ("cache", "train")
OLD_NUMERIC_RANGES = {
    "epochs": (1, True, None, True), "batch_size": (1, True, None, True), "image_size": (1, True, None, True),
    "lr": (0, False, None, True), "weight_decay": (0, True, None, True), "gamma": (0, False, 1, True),
    "lam": (0, True, None, True), "beta": (0, True, None, True), "drop": (0, True, None, True),
    "erasing": (0, True, 1, True), "noise_std": (0, True, None, True), "workers": (0, True, None, True),
}
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def invoke(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_error_line(r, *needles):
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and r.stderr.startswith("error:"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    text = re.sub(r"\s+", " ", r.stderr)
    for n in needles:
        assert n in text, (n, text)


# ---------------------------------------------------------------- the declaration and what derives from it
def test_roles_equal_the_hand_kept_lists_they_replace():
    assert set(config.NON_IDENTITY) == set(OLD_NON_IDENTITY) and TrainConfig.NON_IDENTITY == config.NON_IDENTITY
    assert set(config.PER_MODEL_FIELDS) == set(OLD_PARALLEL_FIELDS)
    assert set(config.DATA_FIELDS) == set(OLD_DATA_FIELDS) | {"views"}  # views: read from the store since
    assert set(config.AXIS_FIELDS) == set(FIELDS) - set(OLD_NOT_AXES)
    assert config.NUMERIC_RANGES == {**OLD_NUMERIC_RANGES, "erase_min": (0, False, 1, False),
                                     "erase_max": (0, False, 1, False), "noise_p": (0, True, 1, True)}
    assert config.REQUIRED == ("cache", "train")
    at_legacy = {n for n, v in config.LEGACY.items() if getattr(TrainConfig(), n) == v}  # left out of identity
    assert set(TrainConfig(train="x").identity()) == set(FIELDS) - set(OLD_NON_IDENTITY) - at_legacy


# identity_hash of configs written before the declaration existed (computed with the old dataclass)
KNOWN_HASHES = [
    ({}, "1c1bb871815e3a0a"),
    (dict(cache="features.h5", train="ferplus", test=["ferplus", "muxspace"], lam=0.5, beta=1.0, drop=5,
          sigmoid=False, flip=False, pretrained="w.pth", val_split="val", device="cpu", workers=3, root="/x"),
     "7cb923dd1fa0dfd0"),
    (dict(cache="s.h5", train="domA:train", method="linear-probe", feature_norm="standardize", epochs=1,
          encoder="tiny-clip", balanced=True, online_encoder=False, noise_std=0.1, mask_map="linear"),
     "4f9c2e336d04a50f"),
]
NOISE_UNITS_CHANGED = 2  # KNOWN_HASHES[2] recorded noise in the old units: refused, not read back as another run


# what a config.json recorded before the faithful-recipe fields existed holds besides the values above
OLD_DEFAULTS = dict(cache="", train="", test=[], method="cafe", backbone="resnet18", pretrained=None, encoder=None,
                    epochs=60, batch_size=32, image_size=224, lr=2e-4, weight_decay=1e-4, gamma=0.9, seed=0, lam=1.5,
                    beta=5.0, drop=10, drop_mode="sample", sigmoid=True, separation=True, diverse=True,
                    mask_map="auto", feature_norm="none", flip=True, erasing=0.5, noise_std=0.0, balanced=False,
                    online_encoder=False, val_split=None, device="auto", workers=0, root=None)


@pytest.mark.parametrize("kw,digest", KNOWN_HASHES)
def test_identity_hash_of_existing_configs_is_unchanged(kw, digest):
    """A run recorded before a field existed reads back (from_record) as what it trained and keeps its hash;
    one whose noise was on in the old units is refused (its noise cannot be reproduced)."""
    if KNOWN_HASHES.index((kw, digest)) == NOISE_UNITS_CHANGED:
        with pytest.raises(ConfigError, match="noise_std 0.1 was recorded when it meant a std on"):
            TrainConfig.from_record({**OLD_DEFAULTS, **kw})
        return
    assert TrainConfig.from_record({**OLD_DEFAULTS, **kw}).identity_hash() == digest


def test_fields_newer_than_a_record_take_their_legacy_values_not_the_defaults():
    old = TrainConfig.from_record(dict(OLD_DEFAULTS))
    assert (old.groups, old.erase_max, old.noise_p, old.views) == ("balanced", 0.33, 1.0, "clean")
    new = TrainConfig()
    assert (new.groups, new.erase_max, new.noise_p, new.drop_mode) == ("official", 0.25, 0.5, "batch")
    assert new.identity_hash() != old.identity_hash()
    # identity leaves a field out only while it holds the legacy value
    assert "groups" not in old.identity() and new.identity()["groups"] == "official"


def test_every_field_is_declared_once_with_its_own_spellings():
    seen: dict[str, str] = {}
    for f in dataclasses.fields(TrainConfig):
        opt = f.metadata.get("option")
        assert isinstance(opt, config.Option) and opt.help.strip(), f.name
        for spelling in {f.name, config.flag(f.name), *opt.aliases}:
            key = spelling.replace("-", "_")
            assert seen.setdefault(key, f.name) == f.name, f"{spelling!r} names {seen[key]} and {f.name}"
            assert config.field_for(spelling) == config.field_for("--" + spelling) == f.name
    assert config.option_name("lam") == "--lambda" and config.field_for("lambda") == "lam"
    assert config.field_for("noise-std") == config.field_for("noise_std") == "noise_std"
    assert config.field_for("no-sigmoid") is None and config.unknown_key_hint("no-sigmoid") == "set sigmoid to false"


def _bad_values(name):
    opt = config.OPTIONS[name]
    if opt.choices or opt.choices_from:
        yield "nope"
    if opt.range:
        lo, lo_inc, hi, hi_inc = opt.range
        yield lo - 1 if lo_inc else lo
        if hi is not None:
            yield hi + 1 if hi_inc else hi
        yield math.nan


CHECKED = [(n, v) for n in FIELDS for v in _bad_values(n)]


@pytest.mark.parametrize("name,value", CHECKED, ids=[f"{n}={v}" for n, v in CHECKED])
def test_validate_checks_each_declared_choice_and_range(name, value):
    cfg = dataclasses.replace(TrainConfig(train="x"), **{name: value})
    with pytest.raises(ConfigError) as e:
        cfg.validate(check_files=False)
    assert e.value.field == name and str(e.value).startswith(config.option_name(name))
    dataclasses.replace(cfg, **{name: getattr(TrainConfig(), name)}).validate(check_files=False)  # the default is fine


def test_coercion_follows_the_field_types():
    samples = {int: ("3", 3), float: ("0.5", 0.5), bool: ("false", False), str: ("x", "x"), list: ("a+b", ["a", "b"])}
    for name in FIELDS:
        text, want = samples[config.field_types()[name]]
        got = config.coerce_value(name, text)
        assert got == want and type(got) is type(want), name
    assert config.coerce_value("val_split", "none") is None and config.coerce_value("test", ["a"]) == ["a"]
    for name, bad in (("epochs", "1.5"), ("lam", "x"), ("sigmoid", "maybe"), ("lr", "nan"), ("method", ["a"])):
        with pytest.raises(ConfigError, match=f"for option '{config.flag(name)}'"):
            config.coerce_value(name, bad)


def test_the_config_module_and_both_clis_start_without_torch():
    code = ("import sys, maskfer.config, cli.options, cli.maskfer_cli, cli.featcache_cli; "
            "heavy = [m for m in ('torch', 'numpy', 'h5py') if m in sys.modules]; assert not heavy, heavy; "
            "import cli.featcache_cli as f; assert 'maskfer.config' not in sys.modules or True")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-c", "import sys, cli.featcache_cli; assert 'maskfer.config' not in "
                        "sys.modules"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr  # featcache's CLI does not load maskfer


def test_backbone_help_names_every_registered_backbone():
    from maskfer.backbones import list_backbones

    assert config.choices_of("backbone") == tuple(list_backbones())
    for name in list_backbones():
        assert name in config.OPTIONS["backbone"].help


# ---------------------------------------------------------------- generated CLI options
def _config_params(cmd) -> dict[str, click.Option]:
    return {p.name: p for p in cmd.params if p.name in config.OPTIONS}


def test_train_and_sweep_take_the_same_flag_for_every_field():
    train, sweep = (_config_params(maskfer_main.commands[c]) for c in ("train", "sweep"))
    assert set(train) == set(sweep) == set(FIELDS)
    for name in FIELDS:
        a, b = train[name], sweep[name]
        assert a.opts == b.opts == [config.option_name(name)], name
        assert a.secondary_opts == b.secondary_opts and type(a.type) is type(b.type), name
        if config.field_types()[name] is bool:
            assert a.secondary_opts == ["--no-" + config.flag(name)], name
        assert a.help.startswith(config.OPTIONS[name].help), name
    assert train["lam"].opts == ["--lambda"] and train["sigmoid"].secondary_opts == ["--no-sigmoid"]
    assert list(train["method"].type.choices) == list(sweep["method"].type.choices) == list(config.METHODS)
    assert sweep["val_split"].help.endswith("[default: val]") and "[default" not in train["val_split"].help


@pytest.fixture
def trained(monkeypatch) -> list[tuple[TrainConfig, str]]:
    """maskfer train stops at maskfer.train.train: the configs it would train."""
    import maskfer.train

    calls: list = []

    def record(cfg, out, **kw):
        calls.append((cfg, out))
        return {}

    monkeypatch.setattr(maskfer.train, "train", record)
    return calls


@pytest.fixture
def store_file(tmp_path) -> Path:
    p = tmp_path / "s.h5"
    p.write_bytes(b"")  # a flag's --cache must exist; nothing reads it here
    return p


def test_train_flags_reach_the_config_in_their_declared_types(store_file, tmp_path, trained):
    r = invoke(maskfer_main, "train", "--cache", store_file, "--train", "domA", "--out", tmp_path / "run",
               "--test", "domA,domB", "--lambda", "2", "--no-sigmoid", "--balanced", "--val-split", "none",
               "--epochs", "3", "--quiet")
    assert r.exit_code == 0, r.output
    (cfg, out), = trained
    assert out == str(tmp_path / "run")
    assert cfg == TrainConfig(cache=str(store_file), train="domA", test=["domA", "domB"], lam=2.0, sigmoid=False,
                              balanced=True, epochs=3)
    assert type(cfg.lam) is float and cfg.val_split is None


def test_train_without_a_store_is_a_usage_error(tmp_path, trained):
    r = invoke(maskfer_main, "train", "--train", "domA", "--out", tmp_path / "run")
    assert r.exit_code == 2 and "Missing option --cache" in r.output and not trained


# ---------------------------------------------------------------- --config FILE
def test_config_toml_sets_options_and_explicit_flags_override_it(store_file, tmp_path, trained):
    f = tmp_path / "small.toml"
    f.write_text(f'cache = "{store_file}"\ntrain = "domA"\ntest = ["domA", "domB"]\nepochs = 3\nimage-size = 16\n'
                 'lambda = 0.5\nnoise_std = 0.1\nsigmoid = false\nflip = false\nval-split = "val"\n')
    r = invoke(maskfer_main, "train", "--config", f, "--out", tmp_path / "run", "--lambda", 2.5, "--sigmoid",
               "--quiet")
    assert r.exit_code == 0, r.output
    (cfg, _), = trained
    # from the file; --lambda and --sigmoid given (--sigmoid is even the default): they win; the rest is default
    assert cfg == TrainConfig(cache=str(store_file), train="domA", test=["domA", "domB"], epochs=3, image_size=16,
                              lam=2.5, noise_std=0.1, sigmoid=True, flip=False, val_split="val")
    r = invoke(maskfer_main, "train", "--config", f, "--out", tmp_path / "run2", "--epochs", 0)
    one_error_line(r, "--epochs must be >= 1")  # a bad flag is the flag's error, not the file's
    assert f.name not in r.stderr


def test_config_from_a_run_directory_reruns_it_with_changes(store_file, tmp_path, trained):
    orig = TrainConfig(cache=str(store_file), train="domA", test=["domB"], lam=0.5, seed=3, epochs=7,
                       val_split="holdout:0.1", sigmoid=False, device="cpu")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": orig.to_dict(), "config_hash": orig.identity_hash()}))
    for src in (run, run / "config.json"):
        r = invoke(maskfer_main, "train", "--config", src, "--out", tmp_path / "again", "--seed", 4, "--quiet")
        assert r.exit_code == 0, r.output
        assert trained[-1][0] == dataclasses.replace(orig, seed=4)


BAD_CONFIGS = {
    "unknown key": ("epoch = 3\n", ["key 'epoch' is not a training option", "options:", "lambda"]),
    "negated key": ("no-flip = true\n", ["key 'no-flip' is not a training option (set flip to false)"]),
    "wrong type": ('epochs = "many"\n', ["key 'epochs': 'many' is not a valid int for option 'epochs'"]),
    "out of range": ("epochs = 0\n", ["key 'epochs': --epochs must be >= 1, not 0"]),
    "not a choice": ('drop-mode = "never"\n', ["key 'drop-mode': --drop-mode must be one of batch, sample"]),
    "given twice": ("lambda = 1.0\nlam = 2.0\n", ["key 'lam' is given twice (as 'lambda' and 'lam')"]),
    "a table": ("[train]\nepochs = 1\n", ["key 'train': expected a value, not a table"]),
    "missing store": ('cache = "nope.h5"\n', ["key 'cache': no such file nope.h5"]),
    "not TOML": ("epochs = \n", ["not valid TOML"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_file_is_one_line_naming_the_file_and_key(case, store_file, tmp_path, trained):
    text, needles = BAD_CONFIGS[case]
    f = tmp_path / "bad.toml"
    f.write_text(text)
    args = ["train", "--config", f, "--out", tmp_path / "run", "--train", "domA"]
    if case != "missing store":
        args += ["--cache", store_file]
    one_error_line(invoke(maskfer_main, *args), str(f), *needles)
    assert not trained


def test_a_flag_overrides_a_bad_value_of_the_config_file(store_file, tmp_path, trained):
    f = tmp_path / "c.toml"
    f.write_text(f'cache = "{store_file}"\ntrain = "domA"\nepochs = 0\ngamma = 2\n')
    r = invoke(maskfer_main, "train", "--config", f, "--out", tmp_path / "run", "--epochs", 2, "--gamma", 0.5)
    assert r.exit_code == 0, r.output
    assert (trained[0][0].epochs, trained[0][0].gamma) == (2, 0.5)


def test_bad_run_config_json_names_the_file(store_file, tmp_path, trained):
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"config": {"cache": str(store_file), "train": "domA", "image_size": -3}}))
    one_error_line(invoke(maskfer_main, "train", "--config", f, "--out", tmp_path / "run"),
                   f"{f}: key 'image_size': --image-size must be >= 1, not -3")
    f.write_text("{not json")
    one_error_line(invoke(maskfer_main, "train", "--config", f, "--out", tmp_path / "run"), f"{f}: not valid JSON")
    assert not trained


# ---------------------------------------------------------------- sweep: same flags, same axis names
@pytest.fixture
def planned(monkeypatch) -> list:
    """maskfer sweep --dry-run stops at plan_sweep: the (base config, grid) it would plan."""
    import maskfer.sweep

    calls: list = []
    monkeypatch.setattr(maskfer.sweep, "plan_sweep", lambda cfg, grid, out, write=True: calls.append((cfg, grid)) or [])
    return calls


def test_sweep_flags_set_the_base_and_unset_flags_override_nothing(store_file, tmp_path, planned):
    f = tmp_path / "sweep.toml"
    f.write_text('[base]\nepochs = 3\nlambda = 2\nsigmoid = false\n[grid]\nseed = [0, 1]\nnoise_std = [0, 0.1]\n')
    common = ["sweep", "--sweep-file", f, "--cache", store_file, "--train", "domA", "--out", tmp_path / "sw", "--dry-run"]
    r = invoke(maskfer_main, *common, "--beta", 1, "--no-diverse", "--grid", "drop-mode=sample,batch")
    assert r.exit_code == 0, r.output
    cfg, grid = planned[-1]
    # [base] kept where no flag is given (sigmoid stays false: --sigmoid/--no-sigmoid was not given)
    assert (cfg.epochs, cfg.lam, cfg.sigmoid, cfg.beta, cfg.diverse, cfg.val_split) == (3, 2.0, False, 1.0, False, "val")
    assert grid == {"seed": [0, 1], "noise_std": [0.0, 0.1], "drop_mode": ["sample", "batch"]}
    r = invoke(maskfer_main, *common, "--set", "lambda=0.7", "--set", "epochs=4", "--lambda", 0.5, "--sigmoid")
    assert r.exit_code == 0, r.output
    cfg, _ = planned[-1]
    assert (cfg.lam, cfg.epochs, cfg.sigmoid) == (0.5, 4, True)  # flag > --set > [base]


def test_sweep_config_from_a_run(store_file, tmp_path, planned):
    run = tmp_path / "run"
    run.mkdir()
    orig = TrainConfig(cache=str(store_file), train="domA", epochs=5, lam=0.5, test=["domB"])  # val_split None
    (run / "config.json").write_text(json.dumps({"config": orig.to_dict()}))
    r = invoke(maskfer_main, "sweep", "--config", run, "--out", tmp_path / "sw", "--grid", "seed=0,1", "--dry-run",
               "--epochs", 2)
    assert r.exit_code == 0, r.output
    cfg, grid = planned[-1]
    assert cfg == dataclasses.replace(orig, epochs=2, val_split="val") and grid == {"seed": [0, 1]}


def test_every_axis_is_spelled_like_its_flag_and_old_spellings_still_load():
    from maskfer.sweep import parse_grid

    sample = {int: "1", float: "0.5", bool: "true", str: "x", list: "a+b"}
    for name in config.AXIS_FIELDS:
        grid = parse_grid([f"{config.flag(name)}={sample[config.field_types()[name]]}"])
        assert list(grid) == [name], name
    assert parse_grid(["lam=1", "noise_std=0", "drop_mode=batch"]) == parse_grid(
        ["lambda=1", "noise-std=0", "drop-mode=batch"]) == {"lam": [1.0], "noise_std": [0.0], "drop_mode": ["batch"]}


# ---------------------------------------------------------------- flags mean the same in every command
def _commands():
    for label, group in (("featcache", featcache_main), ("maskfer", maskfer_main)):
        for name, cmd in group.commands.items():
            yield f"{label} {name}", cmd


def test_device_defaults_to_auto_in_every_command():
    seen = []
    for where, cmd in _commands():
        for p in cmd.params:
            if p.name == "device":
                seen.append(where)
                assert p.get_default(click.Context(cmd)) == "auto", where
                assert "auto" in p.help and "cpu" in p.help, where
    assert {"featcache build", "featcache verify", "maskfer report", "maskfer train", "maskfer sweep",
            "maskfer eval", "maskfer predict"} <= set(seen)


def test_out_is_always_a_directory_and_files_have_their_own_names():
    outs = []
    for where, cmd in _commands():
        for p in cmd.params:
            if "--out" in p.opts and not getattr(p, "hidden", False):
                outs.append(where)
                assert isinstance(p.type, click.Path) and not p.type.file_okay and p.type.dir_okay, where
    assert sorted(outs) == ["maskfer demo", "maskfer report", "maskfer sweep", "maskfer train"]
    opts = {where: {o for p in cmd.params if not getattr(p, "hidden", False) for o in p.opts}
            for where, cmd in _commands()}
    assert "--cache" in opts["featcache build"] and "--table" in opts["maskfer eval"]
    assert "--output" in opts["maskfer predict"]


def test_workers_means_parallel_image_decoders_in_both_clis():
    helps = {where: p.help for where, cmd in _commands() for p in cmd.params if p.name == "workers"}
    assert set(helps) == {"featcache build", "maskfer train", "maskfer sweep"}
    helps = helps.values()
    for h in helps:
        assert h.startswith("Parallel image decoders") and "0: decode in the main process" in h, h


@pytest.fixture
def predicted(monkeypatch) -> None:
    import maskfer.predict
    from featcache.taxonomy import CLASSES

    probs = {c: 1.0 / len(CLASSES) for c in CLASSES}
    monkeypatch.setattr(maskfer.predict, "predict",
                        lambda run, inputs, **kw: [{"input": p, "face": 0, "prediction": CLASSES[0],
                                                    "probabilities": probs} for p in inputs])


def test_old_out_spellings_still_work_with_a_one_line_note(tmp_path, predicted):
    r = invoke(maskfer_main, "predict", "--run", tmp_path, "a.png", "--out", tmp_path / "p.csv")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p.csv").read_text().startswith("input,frame,time,face")
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("note:")]
    assert notes == ["note: --out is now --output here (--out always names a directory); the old spelling still "
                     "works"]
    r = invoke(maskfer_main, "predict", "--run", tmp_path, "a.png", "--output", tmp_path / "q.json")
    assert r.exit_code == 0 and json.loads((tmp_path / "q.json").read_text())[0]["input"] == "a.png"
    assert "note:" not in r.stderr
    # both spellings at once: a usage error, nothing run
    r = invoke(maskfer_main, "predict", "--run", tmp_path, "a.png", "--output", tmp_path / "x.csv", "--out",
               tmp_path / "y.csv")
    assert r.exit_code == 2 and "--out is the old name of --output" in r.output
    r = invoke(maskfer_main, "eval", "--run", tmp_path, "--test", "x", "--table", "t", "--out", "u")
    assert r.exit_code == 2 and "--out is the old name of --table" in r.output
    for group, cmd in ((maskfer_main, "predict"), (maskfer_main, "eval"), (featcache_main, "build")):
        assert not re.search(r"--out(?![a-z])", invoke(group, cmd, "--help").output)  # hidden


# ---------------------------------------------------------------- the docs table
TRAINING_MD = REPO / "docs" / "training.md"


def test_docs_training_table_is_the_generated_one():
    assert config.docs_table(TRAINING_MD.read_text()) == config.defaults_markdown()
    assert config.main(["--markdown", "--check", str(TRAINING_MD)]) == 0
    table = config.defaults_markdown()
    for name in FIELDS:  # one row per field, with its flag and default
        assert f"| `{config.option_name(name)}`" in table, name
    assert "| `--lambda` | 1.5 |" in table and "| `--sigmoid` / `--no-sigmoid` | on |" in table


def test_docs_table_check_fails_when_a_default_changes(monkeypatch, capsys):
    @dataclasses.dataclass
    class Changed(TrainConfig):
        epochs: int = config.option(61, "Training epochs.", range=(1, True, None, True))

    monkeypatch.setattr(config, "TrainConfig", Changed)
    assert "| `--epochs` | 61 |" in config.defaults_markdown()
    assert config.docs_table(TRAINING_MD.read_text()) != config.defaults_markdown()
    assert config.main(["--markdown", "--check", str(TRAINING_MD)]) == 1
    assert "out of date" in capsys.readouterr().out


def test_markdown_write_replaces_only_the_table(tmp_path):
    doc = tmp_path / "t.md"
    doc.write_text(f"intro\n\n{config.DOCS_BEGIN}\n| stale |\n{config.DOCS_END}\n\nafter\n")
    assert config.main(["--markdown", "--write", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n\n") and text.endswith(f"{config.DOCS_END}\n\nafter\n") and "stale" not in text
    assert config.docs_table(text) == config.defaults_markdown()
    r = subprocess.run([sys.executable, "-m", "maskfer.config", "--markdown"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == config.defaults_markdown()


def test_sweep_docs_name_every_per_model_option():
    text = re.sub(r"\s+", " ", (REPO / "docs" / "sweep.md").read_text())
    para = text.split("## `--parallel K`", 1)[1].split("trained K at a time", 1)[0]
    assert {m for m in re.findall(r"`([a-z-]+)`", para)} == {config.flag(n) for n in config.PER_MODEL_FIELDS}
