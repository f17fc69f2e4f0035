"""maskfer.evaluate (metrics, cross-dataset table, evaluate_run) and maskfer.predict on raw images."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import maskfer_fixtures as mf
from maskfer_fixtures import fx_base, store  # noqa: F401 - pytest fixtures
from featcache import open_store
from featcache.taxonomy import CLASSES
from maskfer.augment import prepare_images
from maskfer.evaluate import (EvalError, cross_table, evaluate_run, load_run, metrics, predict_logits, table_markdown,
                              write_tables)
from maskfer.predict import predict



# ---------------------------------------------------------------- metrics by hand
def test_metrics_match_a_hand_computation():
    # classes: 0 surprise 1 fear 2 disgust 3 happiness 4 sadness 5 anger 6 neutral
    y_true = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5, 6, 6])
    y_pred = np.array([0, 0, 1, 1, 6, 2, 3, 3, 0, 3, 5, 5, 6, 0])
    m = metrics(y_true, y_pred)
    assert m["n"] == 14
    assert m["accuracy"] == pytest.approx(9 / 14)   # correct: 0,0,1,2,3,3,3,5,6
    per = {"surprise": 2 / 3, "fear": 1 / 2, "disgust": 1.0, "happiness": 3 / 4, "sadness": 0.0, "anger": 1.0,
           "neutral": 1 / 2}
    assert m["per_class_accuracy"] == pytest.approx(per)
    assert m["mean_class_accuracy"] == pytest.approx(sum(per.values()) / 7)
    assert m["absent_classes"] == [] and m["support"] == dict(zip(CLASSES, [3, 2, 1, 4, 1, 1, 2]))
    cm = np.zeros((7, 7), int)
    for t, p in zip(y_true, y_pred):
        cm[t, p] += 1
    assert m["confusion"] == cm.tolist()
    assert m["confusion"][0] == [2, 1, 0, 0, 0, 0, 0] and m["confusion"][6] == [1, 0, 0, 0, 0, 0, 1]


def test_metrics_with_a_test_set_missing_classes():
    # no neutral (6) and no fear (1) in the truth; fear is still predicted once
    y_true = np.array([0, 0, 2, 3, 3, 4, 5, 5])
    y_pred = np.array([0, 1, 2, 3, 6, 4, 5, 0])
    m = metrics(y_true, y_pred)
    assert m["absent_classes"] == ["fear", "neutral"]
    assert m["per_class_accuracy"]["fear"] is None and m["per_class_accuracy"]["neutral"] is None
    present = {"surprise": 0.5, "disgust": 1.0, "happiness": 0.5, "sadness": 1.0, "anger": 0.5}
    assert {k: v for k, v in m["per_class_accuracy"].items() if v is not None} == pytest.approx(present)
    assert m["mean_class_accuracy"] == pytest.approx(np.mean(list(present.values())))  # over the 5 present
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["support"]["neutral"] == 0 and sum(m["confusion"][6]) == 0 and m["confusion"][0][1] == 1


# ---------------------------------------------------------------- the cross-dataset table
def _res(label, accs):
    return {"label": label, "tests": {t: {"accuracy": a, "mean_class_accuracy": a / 2} for t, a in accs.items()}}


def test_cross_table_markdown_csv_json(tmp_path):
    results = [_res("ferplus / cafe", {"ferplus:test": 0.8, "muxspace:all": 0.5}),
               _res("ferplus / baseline", {"ferplus:test": 0.9, "ckplus:all": 0.3})]
    header, rows = cross_table(results)
    assert header == ["run", "ferplus:test", "muxspace:all", "ckplus:all", "mean"]
    assert rows[0] == ["ferplus / cafe", 0.8, 0.5, None, pytest.approx(0.65)]
    assert rows[1] == ["ferplus / baseline", 0.9, None, 0.3, pytest.approx(0.6)]
    md = table_markdown(header, rows)
    assert md.splitlines()[0] == "| run | ferplus:test | muxspace:all | ckplus:all | mean |"
    assert "| ferplus / cafe | 80.00 | 50.00 | – | 65.00 |" in md

    paths = write_tables(results, tmp_path / "sub" / "table.v1")   # a dotted prefix in a missing folder
    assert paths["markdown"] == tmp_path / "sub" / "table.v1.md" and paths["json"] == tmp_path / "sub" / "table.v1.json"
    md_text = paths["markdown"].read_text()
    assert "### accuracy (%)" in md_text and "### mean class accuracy (%)" in md_text and "| 40.00 |" in md_text
    with open(paths["csv_accuracy"]) as fh:
        got = list(csv.reader(fh))
    assert got[0] == header and got[1] == ["ferplus / cafe", "0.800000", "0.500000", "", "0.650000"]
    with open(tmp_path / "sub" / "table.v1_mean_class_accuracy.csv") as fh:
        assert list(csv.reader(fh))[2] == ["ferplus / baseline", "0.450000", "", "0.150000", "0.300000"]
    assert json.loads(paths["json"].read_text()) == results


# ---------------------------------------------------------------- evaluate_run on trained runs
@pytest.fixture
def cafe_run(store, fx_base):
    # trained at 12 px from the store's 16 px image cache: eval and predict must both resize 16 -> 12
    return mf.trained_run(fx_base, store, "eval-cafe", method="cafe", image_size=12, lr=5e-3, epochs=2)


@pytest.fixture
def probe_run(store, fx_base):
    return mf.trained_run(fx_base, store, "eval-probe", method="linear-head", lr=5e-2, epochs=3)


def test_evaluate_run_linear_probe_against_numpy(store, probe_run):
    res = evaluate_run(probe_run, None, ["domA:test", "domB"], device="cpu", log=mf.quiet)
    assert res["label"] == "domA / linear-head" and res["epochs_trained"] == 3 and res["train"] == "domA"
    assert list(res["tests"]) == ["domA:test", "domB:test"]    # 'domB' -> its test split
    model, _, _ = load_run(probe_run, torch.device("cpu"))
    w, b = model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy()
    s = open_store(store)
    for name, spec in (("domA", "test"), ("domB", "test")):
        ds = s.dataset(name)
        rows = ds.indices(spec)
        feats = ds.features("tiny-clip", rows, views=("orig",))[:, 0]
        pred = (feats @ w.T + b).argmax(1)
        y = ds.labels[rows]
        m = res["tests"][f"{name}:{spec}"]
        assert m["n"] == len(rows) and m["accuracy"] == pytest.approx(float((pred == y).mean()))
        for c, cls in enumerate(CLASSES):
            sel = y == c
            assert m["per_class_accuracy"][cls] == (pytest.approx(float((pred[sel] == c).mean())) if sel.any() else None)
    assert res["tests"]["domB:test"]["absent_classes"] == ["neutral"]
    assert json.loads((probe_run / "results.json").read_text())["tests"].keys() == res["tests"].keys()


def test_evaluate_run_cafe_uses_images_and_view0(store, cafe_run):
    res = evaluate_run(cafe_run, str(store), ["domA:test"], device="cpu", log=mf.quiet)
    model, cfg, stored = load_run(cafe_run, torch.device("cpu"))
    assert cfg.image_size == 12 and stored["source_image_size"] == 16
    ds = open_store(store).dataset("domA")
    rows = ds.indices("test")
    x = prepare_images(torch.from_numpy(ds.images(16, rows)), 12)
    feats = torch.from_numpy(ds.features("tiny-clip", rows, views=("orig",))[:, 0])
    with torch.no_grad():
        pred = model(x, feats)["logits"].argmax(1).numpy()
    assert res["tests"]["domA:test"] == metrics(ds.labels[rows], pred)


# ---------------------------------------------------------------- predict on raw images
def _eval_probs(run: Path, store: Path, spec: str) -> dict[str, np.ndarray]:
    """id -> softmax of the logits evaluation computes through the store."""
    from maskfer.data import load_split

    model, cfg, stored = load_run(run, torch.device("cpu"))
    data, _ = load_split(str(store), spec, "test", stored["encoder"]["key"], cfg.method_spec.needs_images, cfg.image_size)
    probs = torch.softmax(predict_logits(model, data, cfg.image_size, torch.device("cpu")), 1).numpy()
    return dict(zip(data.ids.tolist(), probs))


@pytest.mark.parametrize("which", ["cafe", "probe"])
def test_predict_equals_eval_through_the_store(store, fx_base, cafe_run, probe_run, which):
    run = cafe_run if which == "cafe" else probe_run
    root = fx_base / "domA"
    res = predict(run, [str(root / "test")], device="cpu", detect="none")
    expected = _eval_probs(run, store, "domA:test")
    assert len(res) == len(expected) == 14
    for r in res:
        p = np.array([r["probabilities"][c] for c in CLASSES])
        assert p.sum() == pytest.approx(1.0, abs=1e-5)
        assert r["prediction"] == CLASSES[int(p.argmax())]
        rel = Path(r["input"]).relative_to(root).as_posix()
        np.testing.assert_allclose(p, expected[rel], atol=1e-5)


def test_predict_walks_folders_and_reports_unreadable_files(tmp_path, fx_base, cafe_run):
    src = fx_base / "domA" / "test"
    nested = tmp_path / "in" / "deeper" / "still"
    nested.mkdir(parents=True)
    good = sorted(src.rglob("*.png"))[:3]
    for i, f in enumerate(good):
        (nested if i else tmp_path / "in").joinpath(f"img{i}.png").write_bytes(f.read_bytes())
    (tmp_path / "in" / "deeper" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "in" / "notes.txt").write_text("not an image, not listed")
    single = tmp_path / "single.jpg"
    single.write_bytes(b"")                                   # given explicitly: reported, not fatal
    res = predict(cafe_run, [str(tmp_path / "in"), str(single)], device="cpu", batch_size=2, detect="none")
    paths = [Path(r["input"]).name for r in res]
    assert sorted(paths) == ["broken.png", "img0.png", "img1.png", "img2.png", "single.jpg"]
    errors = {Path(r["input"]).name: r["error"] for r in res if "error" in r}
    assert set(errors) == {"broken.png", "single.jpg"}
    assert "not an image" in errors["broken.png"] and "zero-byte" in errors["single.jpg"]
    for r in res:
        if "error" not in r:
            assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(EvalError, match="no such file or folder"):
        predict(cafe_run, [str(tmp_path / "missing.png")], device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="no images found"):
        predict(cafe_run, [str(tmp_path / "empty")], device="cpu")
