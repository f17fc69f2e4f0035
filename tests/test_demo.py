"""`maskfer demo` (the README's first command): generated faces in two renderings -> featcache build ->
maskfer train (linear probe, baseline, CAFE) -> maskfer eval's table, and a reading computed from it.

The default runs use the tiny random CLIP and a few images; the real default demo (EfficientNet-Lite0)
is the slow test at the end."""
from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from cli.maskfer_cli import main as cli
from featcache import open_store
from featcache.taxonomy import CLASSES
from maskfer.demo import (DOMAINS, EXPRESSIONS, METHODS, SEEN, STYLES, TINY_ENCODER, UNSEEN, DemoError, DemoRun,
                          DemoSettings, demo_reading, demo_table, render_face, run_demo)

TINY = dict(encoder=TINY_ENCODER, epochs=1, image_size=16, per_class=(3, 2), progress=False)


def test_demo_runs_build_train_eval_and_hands_back_the_run_directories(tmp_path):
    logs: list[str] = []
    run = run_demo(tmp_path, log=logs.append, **TINY)
    assert list(run.runs) == list(METHODS) == ["linear-probe", "baseline", "cafe"]
    for method, path in run.runs.items():  # the hook the final predict step uses: finished run directories
        assert path == tmp_path / "runs" / method and (path / "config.json").is_file()
    assert [r["method"] for r in run.results] == list(METHODS)
    for r in run.results:
        assert r["label"].endswith("[tiny random CLIP]")
        assert set(r["tests"]) == {f"{SEEN}:test", f"{UNSEEN}:test"}
        assert all(m["n"] == 14 for m in r["tests"].values())  # 7 classes x 2 test images per domain
    with open_store(tmp_path / "features.h5") as s:
        assert s.datasets() == [SEEN, UNSEEN]
        assert len(s.dataset(SEEN)) == 7 * (3 + 2) and len(s.dataset(UNSEEN)) == 7 * 2  # unseen: test only
    # Rerun: the store is complete, the runs are finished; nothing is rebuilt or retrained.
    logs.clear()
    trained = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/checkpoint*")}
    assert len(trained) == 3
    again = run_demo(tmp_path, log=logs.append, **TINY)
    assert sum("(already built)" in m for m in logs) == 2
    assert not any(m.startswith("epoch ") for m in logs)
    assert trained == {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/checkpoint*")}
    assert [r["tests"] for r in again.results] == [r["tests"] for r in run.results]


def test_demo_refuses_a_directory_made_with_other_settings(tmp_path):
    run_demo(tmp_path, log=lambda m: None, **TINY)
    with pytest.raises(DemoError, match=r"seed: 0 there, 1 now.*another --out"):
        run_demo(tmp_path, seed=1, log=lambda m: None, **TINY)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not a demo")
    with pytest.raises(DemoError, match="not a demo directory"):
        run_demo(tmp_path / "other", log=lambda m: None, **TINY)


def test_the_two_domains_draw_the_same_expressions_in_different_renderings():
    """Fairness: one geometry table for every rendering; the renderings differ; classes differ within one."""
    assert set(EXPRESSIONS) == set(CLASSES) and set(DOMAINS.values()) <= set(STYLES)
    faces = {(c, s): np.asarray(render_face(c, s, np.random.default_rng(7)), np.float32)
             for c in CLASSES for s in DOMAINS.values()}
    seen, unseen = DOMAINS[SEEN], DOMAINS[UNSEEN]
    for c in CLASSES:
        # another rendering: colours differ clearly (mean colour over the image)
        assert np.abs(faces[c, seen].mean((0, 1)) - faces[c, unseen].mean((0, 1))).max() > 20
    # within a rendering, the same random draws with another expression change only the face's features
    diff = np.abs(faces["happiness", seen] - faces["sadness", seen]).mean(2)
    assert 0 < (diff > 30).mean() < 0.1
    # deterministic per seed
    a = np.asarray(render_face("fear", unseen, np.random.default_rng(1)))
    assert np.array_equal(a, np.asarray(render_face("fear", unseen, np.random.default_rng(1))))
    assert not np.array_equal(a, np.asarray(render_face("fear", unseen, np.random.default_rng(2))))


def _fake_run(acc: dict[str, tuple[float, float]], n: int = 105) -> DemoRun:
    results = [{"method": m, "label": f"{SEEN} / {m}",
                "tests": {f"{SEEN}:test": {"accuracy": a[0], "n": n}, f"{UNSEEN}:test": {"accuracy": a[1], "n": n}}}
               for m, a in acc.items()]
    return DemoRun(out=None, store=None, settings=DemoSettings(), runs={}, results=results)


def test_the_reading_is_computed_from_the_table():
    run = _fake_run({"linear-probe": (0.95, 0.50), "baseline": (0.99, 0.20), "cafe": (0.97, 0.55)})
    text = demo_reading(run)
    assert "CAFE scores 55.0 %" in text and "above the end-to-end baseline's 20.0 %" in text
    assert "level with the linear probe's 50.0 %" in text  # 5 points on 105 images is within the noise
    assert "not evidence" in text
    text = demo_reading(_fake_run({"linear-probe": (0.95, 0.70), "baseline": (0.99, 0.50), "cafe": (0.12, 0.15)}))
    assert "below the end-to-end baseline's 50.0 %" in text and "below the linear probe's 70.0 %" in text
    assert "only linear probe, end-to-end baseline clearly beat chance" in text
    table = demo_table(run)
    assert table.splitlines()[0] == f"| method | {SEEN}:test (seen domain) | {UNSEEN}:test (unseen domain) |"
    assert f"| {SEEN} / cafe | 97.00 | 55.00 |" in table.splitlines()


def test_demo_cli_prints_the_table_and_a_reading(tmp_path):
    res = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path), "--encoder", TINY_ENCODER, "--epochs", "1",
                                   "--image-size", "16", "--train-per-class", "3", "--test-per-class", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "DEMO result on GENERATED" in res.output and "[tiny random CLIP]" in res.output
    assert "Reading: the encoder is a tiny RANDOM CLIP" in res.output
    assert (tmp_path / "table.md").exists()


def test_demo_without_efficientnet_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)  # import fails as if not installed
    with pytest.raises(DemoError, match=r"bash scripts/setup.sh.*pip install 'cafe-fer\[efficientnet\]'"):
        run_demo(tmp_path, per_class=(1, 1), progress=False, log=lambda m: None)
    res = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path / "cli"), "--quiet"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "cafe-fer[efficientnet]" in res.output and "--encoder tiny-random-clip" in res.output


def _table_rows(output: str) -> dict[str, list[float]]:
    rows = {}
    for line in output.splitlines():
        m = re.match(rf"\| {SEEN} / ([a-z-]+) \| ([\d.]+) \| ([\d.]+) \|$", line)
        if m:
            rows[m.group(1)] = [float(m.group(2)), float(m.group(3))]
    return rows


@pytest.mark.slow
def test_the_real_default_demo_prints_three_methods_on_two_domains(tmp_path):
    """The README's command as shipped: EfficientNet-Lite0, default sizes (a few minutes on 2 CPU cores)."""
    pytest.importorskip("efficientnet_lite_pytorch")
    res = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path), "--quiet"])
    assert res.exit_code == 0, res.output
    rows = _table_rows(res.output)
    assert set(rows) == {"linear-probe", "baseline", "cafe"}, res.output  # three methods x two domains
    assert rows["linear-probe"][0] > 50  # the seen domain is learnable (chance 14.3 %)
    assert "Reading: " in res.output and "CAFE scores" in res.output and "[tiny" not in res.output


def test_the_cli_defaults_are_the_demos():
    """The CLI declares the demo's defaults without importing torch: they must stay maskfer.demo's."""
    defaults = {p.name: p.default for p in cli.commands["demo"].params}
    d = DemoSettings()
    assert (defaults["encoder"], defaults["seed"], defaults["epochs"], defaults["image_size"]) == (
        d.encoder, d.seed, d.epochs, d.image_size)
    assert (defaults["train_per_class"], defaults["test_per_class"]) == (d.train_per_class, d.test_per_class)
