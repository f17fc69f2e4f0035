"""maskfer with augmented feature views (--views augmented) and the exact online reference (--online-encoder):
F and the CNN input stay paired, the view is chosen per image by the epoch generator, evaluation of an online run
encodes the test images too. The store side (featcache build --aug-views) is tested in tests/test_aug_views.py;
here the views are put into the loaded split directly, so the batching logic is tested alone."""
from __future__ import annotations

from pathlib import Path

import torch

import maskfer_fixtures as mf
from maskfer_fixtures import fx_base, store  # noqa: F401 - pytest fixtures
from featcache.views import OFFICIAL, image_keys, view_params
from maskfer.augment import augment_with
from maskfer.data import AugViews
from maskfer.train import Trainer, paper_differences


def _with_views(tr: Trainer, k: int = 3) -> AugViews:
    data = tr.data.train_data
    n, c = data.feats.shape[0], data.feats.shape[2]
    params = view_params(image_keys(data.ids), range(k), OFFICIAL, seed=0)
    feats = torch.randn(n, k, c, generator=torch.Generator().manual_seed(0))
    data.views = AugViews(feats, params, {**OFFICIAL.to_dict(), "seed": 0})
    return data.views


def test_augmented_views_pair_the_stored_feature_with_its_augmentation(store):
    cfg = mf.small_cfg(store, method="cafe", views="clean")
    tr = Trainer(cfg, Path("unused"), progress=False, log=mf.quiet)
    views = _with_views(tr)
    data = tr.data.train_data
    pos = torch.arange(24)
    b = tr.data.batch(data, pos, True, torch.Generator().manual_seed(3))
    # the view of each image: the epoch generator's draw, the same for F and the CNN input
    v = torch.randint(views.k, (24,), generator=torch.Generator().manual_seed(3))
    assert 0 < int((v == 0).sum()) < 24
    rows = torch.arange(24)
    assert torch.equal(b.feats, views.feats[pos][rows, v])
    imgs = data.bank.get(data.rows[pos.numpy()])
    expected = augment_with(imgs, views.params[pos][rows, v], cfg.image_size, OFFICIAL.noise_std)
    assert torch.equal(b.x, expected)
    # evaluation batches: the plain image and the clean original view, whatever the views
    e = tr.data.batch(data, pos, False, None)
    assert torch.equal(e.feats, data.feats[pos, 0])


def test_clean_views_draw_the_augmentation_from_the_epoch_generator(store):
    cfg = mf.small_cfg(store, method="cafe")
    tr = Trainer(cfg, Path("unused"), progress=False, log=mf.quiet)
    data = tr.data.train_data
    pos = torch.arange(24)
    a = tr.data.batch(data, pos, True, torch.Generator().manual_seed(4))
    b = tr.data.batch(data, pos, True, torch.Generator().manual_seed(4))
    c = tr.data.batch(data, pos, True, torch.Generator().manual_seed(5))
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)


def test_an_online_run_is_evaluated_online(store, tmp_path, monkeypatch):
    from maskfer.online import OnlineEncoder

    cfg = mf.small_cfg(store, method="linear-head", online_encoder=True, test=["domB"])
    calls = []
    real = OnlineEncoder.encode
    monkeypatch.setattr(OnlineEncoder, "encode",
                        lambda self, imgs, params=None, noise_std=0.0: calls.append(params is None)
                        or real(self, imgs, params, noise_std))
    from maskfer.train import train

    res = train(cfg, tmp_path / "run", progress=False, log=mf.quiet)
    assert calls.count(False) >= 1          # training batches: augmented, encoded
    assert calls.count(True) >= 1           # test batches: plain images, encoded (not the cached view)
    assert res["results"]["tests"]


def test_train_says_once_where_it_cannot_follow_the_paper(store, tmp_path):
    logs = []
    from maskfer.train import train

    train(mf.small_cfg(store, method="cafe"), tmp_path / "a", progress=False, log=logs.append)
    assert sum("MS-Celeb-1M" in m for m in logs) == 1
    assert paper_differences(mf.small_cfg(store, method="linear-head")) == []


# ---------------------------------------------------------------- through a real store with --aug-views
import pytest  # noqa: E402

from maskfer.errors import TrainError  # noqa: E402
from maskfer.config import ConfigError  # noqa: E402


@pytest.fixture
def views_store(fx_base, tiny_clip_dir, tmp_path):
    root = mf.make_colour_dataset(tmp_path / "dv", {"train": 3, "test": 1}, seed=4)
    path = tmp_path / "views.h5"
    mf.build(path, "dv", root, tiny_clip_dir, ("train", "test"), aug_views=2)
    return path, root


def test_a_run_on_stored_views_records_them_and_refuses_to_resume_on_other_views(views_store, tiny_clip_dir,
                                                                                   tmp_path):
    from maskfer.train import train
    from maskfer import rundir

    store, root = views_store
    cfg = mf.small_cfg(store, train="dv", views="augmented", epochs=1)
    train(cfg, tmp_path / "run", progress=False, log=mf.quiet)
    stored, _ = rundir.read_run_config(tmp_path / "run")
    assert stored["aug_views"] == {"k": 2, "seed": 0}
    mf.build(store, "dv", root, tiny_clip_dir, ("train", "test"), aug_views=3)  # views added since
    with pytest.raises(TrainError, match=r"differs in: augmented views \(\{'k': 2"):
        train(mf.small_cfg(store, train="dv", views="augmented", epochs=1), tmp_path / "run", progress=False,
              log=mf.quiet)


def test_stored_views_refuse_a_run_that_asks_for_another_augmentation_or_method(views_store, tmp_path):
    store, _ = views_store
    with pytest.raises(TrainError, match=r"drawn with another augmentation \(erase_p 0.5 there, 0.0 asked"):
        Trainer(mf.small_cfg(store, train="dv", views="augmented", erasing=0.0), tmp_path / "r", log=mf.quiet)
    for method in ("linear-probe", "baseline"):
        with pytest.raises(ConfigError, match=f"--views augmented trains on stored augmented views .*\\({method}"):
            Trainer(mf.small_cfg(store, train="dv", views="augmented", method=method), tmp_path / "r", log=mf.quiet)


def test_resuming_with_a_field_switched_to_its_legacy_value_is_refused(store, tmp_path):
    """identity() leaves a field out while it holds its legacy value; the resume check must still see it."""
    from maskfer.train import train

    train(mf.small_cfg(store, method="cafe", epochs=1), tmp_path / "run", progress=False, log=mf.quiet)
    with pytest.raises(TrainError, match=r"differs in: groups\)"):
        train(mf.small_cfg(store, method="cafe", epochs=1, groups="balanced"), tmp_path / "run", progress=False,
              log=mf.quiet)


def test_a_probe_killed_between_its_checkpoint_and_its_metrics_resumes(store, tmp_path):
    from maskfer.train import train
    from maskfer import rundir

    run = tmp_path / "probe"
    train(mf.small_cfg(store, method="linear-probe"), run, progress=False, log=mf.quiet)
    (run / rundir.METRICS).unlink()  # the kill came after the checkpoint, before metrics.jsonl
    logs = []
    train(mf.small_cfg(store, method="linear-probe"), run, progress=False, log=logs.append)
    assert any("already fitted" in m for m in logs) and rundir.read_metrics(run)[-1]["solver"] == "lbfgs"
