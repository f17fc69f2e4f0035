"""`maskfer export` (Hugging Face layout) and Predictor.from_pretrained: the packaged model predicts what the run
does, in a fresh process, with the run directory gone; the hub path is the same loader."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import maskfer_fixtures as mf
from maskfer_fixtures import fx_base, store  # noqa: F401 - pytest fixtures
from cli.maskfer_cli import main as maskfer_main
from featcache.taxonomy import CLASSES
from maskfer.predictor import Predictor, PredictorError

ROOT = Path(__file__).resolve().parents[1]


def _probs(rows) -> np.ndarray:
    return np.array([[r["probabilities"][c] for c in CLASSES] for r in rows])


@pytest.mark.parametrize("method", ["cafe", "baseline", "linear-probe"])
def test_the_exported_model_predicts_what_the_run_predicts_in_a_fresh_process_without_the_run(
        method, store, fx_base, tmp_path):  # noqa: F811
    src = mf.trained_run(fx_base, store, f"export-{method}", method=method, lr=5e-3)
    run = shutil.copytree(src, tmp_path / "run")                 # a copy: this test deletes it
    images = sorted((fx_base / "domA" / "test").rglob("*.png"))[:9]
    r = CliRunner().invoke(maskfer_main, ["predict", "--run", str(run), "--detect", "none", "--format", "json",
                                          "--device", "cpu", *map(str, images)])
    assert r.exit_code == 0, r.output
    expected = json.loads(r.stdout)
    r = CliRunner().invoke(maskfer_main, ["export", str(run), str(tmp_path / "model")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    shutil.rmtree(run)
    code = textwrap.dedent(f"""
        import json, sys
        from maskfer import Predictor
        p = Predictor.from_pretrained({str(tmp_path / 'model')!r}, device="cpu", detect="none")
        json.dump(p.predict({[str(i) for i in images]!r}), sys.stdout)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert [g["input"] for g in got] == [e["input"] for e in expected] == [str(i) for i in images]
    np.testing.assert_allclose(_probs(got), _probs(expected), atol=1e-5)
    assert [g["prediction"] for g in got] == [e["prediction"] for e in expected]


def test_config_and_model_card_say_what_the_model_is(store, fx_base, tmp_path):  # noqa: F811
    run = mf.trained_run(fx_base, store, "export-cafe", method="cafe", lr=5e-3)
    from maskfer.evaluate import evaluate_run

    evaluate_run(shutil.copytree(run, tmp_path / "run"), None, ["domA:test", "domB"], device="cpu", log=mf.quiet)
    from maskfer.export import export_model

    out = export_model(tmp_path / "run", tmp_path / "m", log=mf.quiet)
    cfg = json.loads((out / "config.json").read_text())
    stored = json.loads((run / "config.json").read_text())
    assert cfg["classes"] == list(CLASSES) and cfg["method"] == "cafe"
    assert cfg["image_size"] == stored["config"]["image_size"] and cfg["train_config"] == stored["config"]
    assert cfg["encoder"]["fingerprint"] == stored["encoder"]["fingerprint"]
    assert set(cfg["encoder"]) >= {"spec", "model_id", "revision", "preprocess", "fingerprint"}
    card = (out / "README.md").read_text()
    assert "| domA:test | yes |" in card and "| domB:test | no (cross-dataset) |" in card
    # exporting again over a previous export replaces it; over a folder that is not one is refused
    export_model(tmp_path / "run", tmp_path / "m", log=mf.quiet)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    from maskfer.evaluate import EvalError

    with pytest.raises(EvalError, match="not a model folder"):
        export_model(tmp_path / "run", tmp_path / "other", log=mf.quiet)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"


def test_hub_ids_go_through_the_same_loader_and_push_uploads_the_folder(store, fx_base, tmp_path, monkeypatch):  # noqa: F811
    import huggingface_hub

    from maskfer.export import export_model, push_folder

    run = mf.trained_run(fx_base, store, "export-cafe", method="cafe", lr=5e-3)
    folder = export_model(run, tmp_path / "m", log=mf.quiet)
    asked = []

    def fake_download(repo_id, revision=None, **kw):
        asked.append((repo_id, revision))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    img = np.asarray(__import__("PIL.Image").Image.open(sorted((fx_base / "domA" / "test").rglob("*.png"))[0]))
    a = Predictor.from_pretrained("someone/cafe-demo", device="cpu", detect="none", revision="v1").predict(img)
    b = Predictor.from_pretrained(folder, device="cpu", detect="none").predict(img)
    assert asked == [("someone/cafe-demo", "v1")] and a == b
    # what the hub holds is what export wrote
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls["create"] = (repo_id, kw.get("private"))

        def upload_folder(self, folder_path, repo_id, **kw):
            calls["upload"] = (sorted(p.name for p in Path(folder_path).iterdir()), repo_id)
            return "https://huggingface.co/someone/cafe-demo/commit/0"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    push_folder(folder, "someone/cafe-demo", private=True, log=mf.quiet)
    assert calls == {"create": ("someone/cafe-demo", True),
                     "upload": (["README.md", "config.json", "model.safetensors"], "someone/cafe-demo")}


def test_clear_errors_for_what_is_not_a_model(tmp_path, monkeypatch):
    with pytest.raises(PredictorError, match="no config.json; not a model made by `maskfer export`"):
        (tmp_path / "empty").mkdir() or Predictor.from_pretrained(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"format": "something-else"}))
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"")
    with pytest.raises(PredictorError, match="cannot read the weights"):
        Predictor.from_pretrained(tmp_path / "bad")
    with pytest.raises(PredictorError, match="no such model folder"):
        Predictor.from_pretrained(tmp_path / "missing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PredictorError, match="cannot fetch model 'nobody/nothing' from the Hugging Face hub"):
        Predictor.from_pretrained("nobody/nothing")


def test_predict_takes_paths_pil_images_and_arrays_and_the_cli_takes_the_model(store, fx_base, tmp_path):  # noqa: F811
    from PIL import Image

    from maskfer.export import export_model

    run = mf.trained_run(fx_base, store, "export-cafe", method="cafe", lr=5e-3)
    folder = export_model(run, tmp_path / "m", log=mf.quiet)
    path = sorted((fx_base / "domA" / "test").rglob("*.png"))[3]
    p = Predictor.from_pretrained(folder, device="cpu", detect="none")
    pil = Image.open(path)
    rows = p.predict([path, pil, np.asarray(pil.convert("RGB")), np.asarray(pil.convert("L"))])
    assert [r["input"] for r in rows] == [str(path), 1, 2, 3]
    probs = _probs(rows)
    np.testing.assert_allclose(probs[1:3], probs[[0, 0]], atol=1e-6)
    r = CliRunner().invoke(maskfer_main, ["predict", "--model", str(folder), "--detect", "none", "--format", "json",
                                          "--device", "cpu", str(path)])
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(_probs(json.loads(r.stdout)), probs[:1], atol=1e-6)
    with pytest.raises(PredictorError, match="input 0: expected an \\(H, W, 3\\) RGB array, got shape \\(2, 3, 4, 5\\)"):
        p.predict(np.zeros((2, 3, 4, 5), np.uint8))
    r = CliRunner().invoke(maskfer_main, ["predict", "--model", str(folder), "--run", str(run), str(path)])
    assert r.exit_code == 2 and "give one of --run RUN_DIR or --model DIR_OR_HUB_ID" in r.output


def test_the_onnx_backend_feeds_the_exported_graph_what_it_was_exported_for(store, fx_base, tmp_path):  # noqa: F811
    pytest.importorskip("onnxruntime")
    import torch
    from PIL import Image

    from featcache.images import resize_uint8
    from maskfer.onnx_export import fused_module

    run = mf.trained_run(fx_base, store, "export-cafe", method="cafe", lr=5e-3)
    r = CliRunner().invoke(maskfer_main, ["export", str(run), str(tmp_path / "m"), "--format", "onnx"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.onnx",
                                                                  "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.onnx", "model.safetensors"):  # written private by mkstemp / safetensors, then shared
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    images = sorted((fx_base / "domA" / "test").rglob("*.png"))[:5]
    p = Predictor.from_pretrained(tmp_path / "m", detect="none", backend="onnx")
    got = _probs(p.predict(images))
    s = json.loads((tmp_path / "m" / "config.json").read_text())["source_image_size"]
    pix = torch.from_numpy(np.stack([resize_uint8(Image.open(i).convert("RGB"), s) for i in images]))
    with torch.no_grad():
        want = fused_module(run)(pix).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    r = CliRunner().invoke(maskfer_main, ["predict", "--model", str(tmp_path / "m"), "--backend", "onnx", "--detect",
                                          "none", "--format", "json", *map(str, images)])
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(_probs(json.loads(r.stdout)), got, atol=1e-6)
    with pytest.raises(PredictorError, match="no model.onnx; export it with"):
        from maskfer.export import export_model

        Predictor.from_pretrained(export_model(run, tmp_path / "plain", log=mf.quiet), backend="onnx")
