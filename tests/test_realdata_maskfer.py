"""The whole pipeline on real files: build muxspace with the tiny CLIP, train, evaluate, predict.

Checks that real images (JPEG, grey and colour, mixed sizes, a duplicated legend row) go through
featcache -> maskfer train/eval/predict; not accuracy (the encoder is random).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import maskfer_fixtures as mf
from featcache import open_store
from featcache.build import build_store
from featcache.taxonomy import CLASSES
from maskfer import rundir
from maskfer.data import load_split
from maskfer.evaluate import load_run, predict_logits
from maskfer.predict import predict
from maskfer.train import train

pytestmark = pytest.mark.realdata


def test_muxspace_build_train_eval_predict(fer_data_dir, tiny_clip_dir, tmp_path):
    root = fer_data_dir / "muxspace"
    store = tmp_path / "mux.h5"
    rep = build_store(store, "muxspace", root, model=str(tiny_clip_dir), image_size=24, progress=False, workers=0,
                      on_error="skip", log=mf.quiet)
    n_images = len(list((root / "images").glob("*.jpg")))
    assert rep.rows == n_images - 1 - 9                       # one duplicated legend row, 9 contempt dropped
    assert [s[0] for s in rep.skipped] == ["images/Avinash_30.jpg"]
    ds = open_store(store).dataset("muxspace")
    assert ds.split_names() == ["all"] and ds.image_sizes() == [24]

    results = {}
    for method, kw in (("linear-probe", {}), ("cafe", {"batch_size": 64})):
        run = tmp_path / method
        cfg = mf.small_cfg(store, train="muxspace:all", method=method, image_size=24, test=["muxspace"], **kw)
        summary = train(cfg, run, progress=False, log=mf.quiet)
        (row,) = rundir.read_metrics(run)
        assert np.isfinite(row["train_loss"]) and 0 <= row["train_acc"] <= 1
        m = summary["results"]["tests"]["muxspace:all"]            # 'muxspace' has no test split: all rows
        assert m["n"] == rep.rows and m["absent_classes"] == [] and sum(map(sum, m["confusion"])) == rep.rows
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["mean_class_accuracy"] <= 1
        results[method] = run

    # predict on real files (spread over the listing: several sizes and colour modes) equals evaluation
    run = results["cafe"]
    ids = ds.ids[:: len(ds.ids) // 5][:5].tolist()
    res = predict(run, [str(root / i) for i in ids], device="cpu", detect="none")
    model, cfg, stored = load_run(run, torch.device("cpu"))
    data, _ = load_split(str(store), "muxspace:all", "test", stored["encoder"]["key"], True, cfg.image_size)
    pos = ds.index_of(ids)
    sub = dataclasses.replace(data, rows=data.rows[pos], ids=data.ids[pos], labels=data.labels[pos],
                              feats=data.feats[pos])
    expected = torch.softmax(predict_logits(model, sub, cfg.image_size, torch.device("cpu")), 1).numpy()
    assert [r["input"] for r in res] == [str(root / i) for i in ids]
    for r, e in zip(res, expected):
        p = np.array([r["probabilities"][c] for c in CLASSES])
        assert p.sum() == pytest.approx(1, abs=1e-5) and r["prediction"] == CLASSES[int(p.argmax())]
        np.testing.assert_allclose(p, e, atol=1e-4)
