"""`maskfer demo` (the README's main job): offline it falls back to a tiny random CLIP and says so."""
from __future__ import annotations

from click.testing import CliRunner

from cli.maskfer_cli import main as cli
from featcache import open_store
from maskfer.demo import run_demo


def test_demo_runs_build_train_eval_offline_and_labels_the_stand_in(tmp_path):
    logs: list[str] = []
    results = run_demo(tmp_path, epochs=1, image_size=16, per_class=(3, 2), progress=False, log=logs.append)
    assert any("tiny RANDOM CLIP" in m for m in logs)
    assert [r["method"] for r in results] == ["linear-probe", "cafe"]
    for r in results:
        assert r["label"].endswith("[tiny random CLIP]")
        assert set(r["tests"]) == {"demo-a:test", "demo-b:test"}
        assert all(m["n"] == 14 for m in r["tests"].values())  # 7 classes x 2 test images
    with open_store(tmp_path / "features.h5") as s:
        assert s.datasets() == ["demo-a", "demo-b"]
        assert len(s.dataset("demo-a")) == 7 * (3 + 2)
    # Rerun: the store is complete, the runs are finished; nothing is rebuilt.
    logs.clear()
    run_demo(tmp_path, epochs=1, image_size=16, per_class=(3, 2), progress=False, log=logs.append)
    assert sum("(already built)" in m for m in logs) == 2


def test_demo_cli_prints_a_labelled_table(tmp_path):
    res = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path), "--epochs", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "DEMO result" in res.output and "[tiny random CLIP]" in res.output
    assert (tmp_path / "table.md").exists()
