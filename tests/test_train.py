"""maskfer.train: run directories, paper defaults, learning, flip views, resume, balanced sampling, --online-encoder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import maskfer_fixtures as mf
from maskfer_fixtures import fx_base, store  # noqa: F401 - pytest fixtures
from maskfer import rundir
from maskfer import batches as batches_mod
from maskfer import engine as engine_mod
from featcache.views import draw_params
from maskfer.augment import augment_batch, recipe_of
from maskfer.config import TrainConfig
from maskfer.batches import epoch_order
from maskfer.model import create_model
from maskfer.train import Trainer, TrainError, train


VARIANTS = {
    "cafe": dict(method="cafe"),
    "baseline": dict(method="baseline"),
    "linear-head": dict(method="linear-head"),
    "no-sigmoid": dict(method="cafe", sigmoid=False),
    "no-separation": dict(method="cafe", separation=False),
    "no-diverse": dict(method="cafe", diverse=False),
}


# ---------------------------------------------------------------- run directory per method / ablation
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_method_and_ablation_writes_the_run_dir(store, tmp_path, variant):
    cfg = mf.small_cfg(store, train="domB", epochs=2, test=["domA:test", "domB"], **VARIANTS[variant])
    summary = train(cfg, tmp_path / "run", progress=False, log=mf.quiet)
    run = tmp_path / "run"

    stored = json.loads((run / "config.json").read_text())
    assert stored["config"] == cfg.to_dict()            # the resolved config, every field
    assert stored["config_hash"] == cfg.identity_hash()
    assert stored["feat_dim"] == 16 and stored["encoder"]["key"] == "tiny-clip"
    assert len(stored["encoder"]["fingerprint"]) == 16

    lines = (run / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in rows] == [0, 1]           # one JSON line per epoch
    for r in rows:
        assert {"lr", "train_acc", "train_loss", "images_per_s"} <= set(r)
    parts = {k for k in rows[0] if k in ("train_ce", "train_sep", "train_div")}
    expected = {"cafe": {"train_ce", "train_sep", "train_div"}, "no-sigmoid": {"train_ce", "train_sep", "train_div"},
                "no-separation": {"train_ce", "train_div"}, "no-diverse": {"train_ce", "train_sep"}}
    assert parts == expected.get(variant, {"train_ce"})

    # ONE safetensors file: model and optimizer tensors, JSON metadata with the epoch and optimizer groups
    ckpt = run / "checkpoint_last.safetensors"
    with safe_open(str(ckpt), framework="pt") as f:
        keys, blob = list(f.keys()), json.loads(f.metadata()["maskfer"])
    assert any(k.startswith("model.") for k in keys) and any(k.startswith("optim.") for k in keys)
    assert blob["meta"]["epoch"] == 1 and blob["meta"]["config_hash"] == cfg.identity_hash()
    assert blob["meta"]["metrics"] == rows                    # the rows the checkpoint covers (restored on resume)
    assert blob["optimizer"]["param_groups"][0]["lr"] == pytest.approx(cfg.lr * cfg.gamma ** 2)
    model_sd, opt_sd, meta = rundir.load_checkpoint(ckpt)
    model = create_model(cfg, 16)
    model.load_state_dict(model_sd)                       # strict: the checkpoint is complete
    if variant == "no-sigmoid":
        assert model.use_sigmoid is False
    if cfg.method == "cafe":
        assert type(model).__name__ == "MaskModel"

    res = json.loads((run / "results.json").read_text())
    assert set(res["tests"]) == {"domA:test", "domB:test"} and res["method"] == cfg.method
    assert res["tests"]["domB:test"]["absent_classes"] == ["neutral"]
    assert summary["results"]["tests"].keys() == res["tests"].keys()
    assert not list(run.glob("*.tmp-*"))


@pytest.mark.parametrize("method,lr,least", [("cafe", 1e-2, 0.35), ("linear-head", 5e-2, 0.6)])
def test_training_accuracy_rises_above_chance(store, tmp_path, method, lr, least):
    # domA: 7 classes x 6 images, each class its own colour and stripes; chance is 1/7 = 0.14.
    # (seeds 0-3 end at 0.64/0.86/0.86/0.38 for cafe and 1.0/0.95/0.95/1.0 for the probe here)
    cfg = mf.small_cfg(store, method=method, lr=lr, epochs=5, erasing=0.0, seed=0)
    train(cfg, tmp_path / "run", progress=False, log=mf.quiet)
    acc = [r["train_acc"] for r in rundir.read_metrics(tmp_path / "run")]
    assert acc[-1] >= least, acc
    assert acc[-1] > acc[0] + 0.15, acc


# ---------------------------------------------------------------- paper defaults, optimizer, schedule
def test_trainconfig_defaults_are_the_papers():
    c = TrainConfig()
    assert (c.lr, c.weight_decay, c.gamma, c.epochs, c.batch_size, c.image_size) == (2e-4, 1e-4, 0.9, 60, 32, 224)
    assert (c.lam, c.beta, c.drop, c.method, c.backbone) == (1.5, 5.0, 10, "cafe", "resnet18")
    assert (c.flip, c.erasing, c.sigmoid, c.separation, c.diverse, c.balanced) == (True, 0.5, True, True, True, False)


def test_optimizer_is_adam_and_lr_decays_once_per_epoch(store, tmp_path, monkeypatch):
    made = {}
    real_adam, real_sched = torch.optim.Adam, torch.optim.lr_scheduler.ExponentialLR

    class SpyAdam(real_adam):
        def __init__(self, params, **kw):
            made["adam"] = kw
            super().__init__(params, **kw)

    class SpySched(real_sched):
        def __init__(self, opt, **kw):
            made["sched"] = kw
            super().__init__(opt, **kw)

    monkeypatch.setattr(torch.optim, "Adam", SpyAdam)
    monkeypatch.setattr(torch.optim.lr_scheduler, "ExponentialLR", SpySched)
    d = TrainConfig()
    # paper lr / weight decay / gamma; 42 images in batches of 16 = 3 steps per epoch
    cfg = mf.small_cfg(store, method="linear-head", epochs=3, lr=d.lr, weight_decay=d.weight_decay, gamma=d.gamma)
    train(cfg, tmp_path / "run", progress=False, log=mf.quiet)
    assert made["adam"] == {"lr": 2e-4, "weight_decay": 1e-4}
    assert made["sched"] == {"gamma": 0.9}
    lrs = [r["lr"] for r in rundir.read_metrics(tmp_path / "run")]
    # the row of epoch k is written after k+1 scheduler steps (not 3 per epoch: that would be 0.9**3 per row)
    assert lrs == pytest.approx([2e-4 * 0.9 ** (k + 1) for k in range(3)], rel=1e-9)
    _, opt_sd, _ = rundir.load_checkpoint(tmp_path / "run" / "checkpoint_last.safetensors")
    g = opt_sd["param_groups"][0]
    assert g["betas"] == [0.9, 0.999] and g["weight_decay"] == 1e-4 and not g["amsgrad"]
    assert not g.get("decoupled_weight_decay", False)     # Adam with L2 weight decay, not AdamW
    assert set(opt_sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert float(opt_sd["state"][0]["step"]) == 9


# ---------------------------------------------------------------- the flipped cached view
def _flipped_in_pixels(x: torch.Tensor) -> torch.Tensor:
    """The fixture's white bar is on the left; after a flip it is on the right."""
    return x[:, :, :, -1].mean(dim=(1, 2)) > x[:, :, :, 0].mean(dim=(1, 2))


def test_flipped_view_is_used_exactly_when_the_image_is_flipped(store):
    cfg = mf.small_cfg(store, method="cafe", erasing=0.0)
    tr = Trainer(cfg, Path("unused"), progress=False, log=mf.quiet)
    data = tr.data.train_data
    pos = torch.arange(32)
    views = data.feats[pos]                                   # (B, 2, C)
    assert (views[:, 0] - views[:, 1]).abs().amax(1).min() > 1e-3  # the two cached views are distinguishable
    b = tr.data.batch(data, pos, True, torch.Generator().manual_seed(5))
    flipped = _flipped_in_pixels(b.x)
    assert 0 < int(flipped.sum()) < len(pos)                  # this seed flips some, not all
    assert torch.equal(b.feats, views[torch.arange(len(pos)), flipped.long()])
    # the same seeded generator through augment_batch gives the same flip decisions
    imgs = data.bank.get(data.rows[pos.numpy()])
    _, params = augment_batch(imgs, cfg.image_size, recipe_of(cfg), generator=torch.Generator().manual_seed(5))
    assert torch.equal(params[:, 0] > 0.5, flipped)
    # evaluation batches are never flipped: view 0
    e = tr.data.batch(data, pos, False, None)
    assert not _flipped_in_pixels(e.x).any() and torch.equal(e.feats, views[:, 0])
    # --no-flip: never flipped, always view 0
    tr.cfg.flip = False
    nf = tr.data.batch(data, pos, True, torch.Generator().manual_seed(5))
    assert not _flipped_in_pixels(nf.x).any() and torch.equal(nf.feats, views[:, 0])


def test_linear_probe_flip_picks_the_flipped_view(store):
    cfg = mf.small_cfg(store, method="linear-head")
    tr = Trainer(cfg, Path("unused"), progress=False, log=mf.quiet)
    data = tr.data.train_data
    assert data.bank is None                                  # no images needed
    pos = torch.arange(32)
    b = tr.data.batch(data, pos, True, torch.Generator().manual_seed(1))
    expect = draw_params(32, recipe_of(cfg), torch.Generator().manual_seed(1))[:, 0] > 0.5
    assert 0 < int(expect.sum()) < 32
    assert torch.equal(b.feats, data.feats[pos, expect.long()])
    tr.cfg.flip = False
    assert torch.equal(tr.data.batch(data, pos, True, torch.Generator().manual_seed(1)).feats, data.feats[pos, 0])


# ---------------------------------------------------------------- resume, interrupts
def _resume_cfg(store, **kw):
    # cafe with flips, erasing and per-sample channel drop: every RNG stream matters
    return mf.small_cfg(store, train="domB", method="cafe", epochs=3, lr=1e-3, **kw)


@pytest.fixture
def reference_run(store, fx_base):
    """An uninterrupted 3-epoch run (trained once per session)."""
    return mf.trained_run(fx_base, store, "resume-reference", train="domB", method="cafe", epochs=3, lr=1e-3)


def _final_weights(run: Path) -> dict:
    return rundir.load_checkpoint(run / rundir.LAST)[0]


def _assert_same_run(run: Path, ref: Path):
    assert mf.metrics_without_speed(run) == mf.metrics_without_speed(ref)
    a, b = _final_weights(run), _final_weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_keyboard_interrupt_keeps_checkpoint_and_resume_matches_uninterrupted(store, tmp_path, monkeypatch,
                                                                                reference_run):
    run = tmp_path / "run"
    calls = {"n": 0}
    real = batches_mod.augment_with

    def interrupting(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # domB has 21 images = 2 batches per epoch: this is epoch 2's first batch
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(batches_mod, "augment_with", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(_resume_cfg(store), run, progress=False, log=mf.quiet)
    _, _, meta = rundir.load_checkpoint(run / rundir.LAST)      # intact and loadable
    assert meta["epoch"] == 0 and len(rundir.read_metrics(run)) == 1
    assert not list(run.glob("*.tmp-*"))
    monkeypatch.setattr(batches_mod, "augment_with", real)
    (run / "checkpoint_last.safetensors.tmp-99999").write_bytes(b"left by a kill -9 mid-write")
    logs = []
    train(_resume_cfg(store, test=["domB"]), run, progress=False, log=logs.append)  # --test may differ on resume
    assert any("resuming" in m and "after epoch 1/3" in m for m in logs)
    _assert_same_run(run, reference_run)
    assert not list(run.glob("*.tmp-*"))                      # the stale temp file was cleaned on resume


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_around_the_checkpoint_write_resumes_to_identical_metrics(store, tmp_path, monkeypatch, reference_run,
                                                                       when):
    """Die just before / just after the 2nd epoch's checkpoint is written, then rerun the same config."""
    run = tmp_path / "run"
    real = rundir.save_state
    calls = {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2 and when == "before":
            raise KeyboardInterrupt
        real(*a, **kw)
        if calls["n"] == 2 and when == "after":
            raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "save_state", dying)
    with pytest.raises(KeyboardInterrupt):
        train(_resume_cfg(store), run, progress=False, log=mf.quiet)
    monkeypatch.setattr(rundir, "save_state", real)
    train(_resume_cfg(store), run, progress=False, log=mf.quiet)
    _assert_same_run(run, reference_run)


def test_interrupt_inside_the_checkpoint_write_leaves_the_previous_one(store, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = rundir.save_file
    calls = {"n": 0}

    def half_written(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(filename).write_bytes(b"\x00" * 100)  # a partial temp file, then Ctrl-C
            raise KeyboardInterrupt
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(rundir, "save_file", half_written)
    with pytest.raises(KeyboardInterrupt):
        train(mf.small_cfg(store, train="domB", method="linear-head", epochs=3), run, progress=False, log=mf.quiet)
    model_sd, opt_sd, meta = rundir.load_checkpoint(run / rundir.LAST)
    assert meta["epoch"] == 0 and opt_sd is not None and "fc.weight" in model_sd
    assert not list(run.glob("*.tmp-*"))                      # no half-written file left behind


def test_run_dir_of_another_config_names_the_differing_options(store, tmp_path):
    run = tmp_path / "run"
    train(mf.small_cfg(store, method="linear-head"), run, progress=False, log=mf.quiet)
    before = (run / rundir.LAST).read_bytes()
    with pytest.raises(TrainError, match=r"differs in: lr, seed\)\. Use a new --out"):
        train(mf.small_cfg(store, method="linear-head", lr=1e-3, seed=3), run, progress=False, log=mf.quiet)
    assert (run / rundir.LAST).read_bytes() == before        # nothing touched
    # options that do not change what is trained (test sets, device, workers) may differ: it just resumes
    train(mf.small_cfg(store, method="linear-head", test=["domA:test"], workers=1), run, progress=False,
          log=mf.quiet)


# ---------------------------------------------------------------- class-balanced sampling
def test_balanced_epoch_order_draws_classes_uniformly():
    counts = [200, 20, 5, 50, 10, 100, 15]                     # imbalanced, 400 images
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    gen = torch.Generator().manual_seed(0)
    drawn = torch.cat([labels[epoch_order(labels, True, gen)] for _ in range(10)])
    assert len(drawn) == 4000
    freq = torch.bincount(drawn, minlength=7).double() / len(drawn)
    assert (freq - 1 / 7).abs().max() < 0.03, freq               # 5 sigma for 4000 draws
    plain = epoch_order(labels, False, gen)
    assert sorted(plain.tolist()) == list(range(400))           # unbalanced: a permutation
    natural = torch.bincount(labels[plain], minlength=7).double() / 400
    assert natural[0] == 0.5 and natural[2] == 5 / 400
    # classes absent from the training set are never drawn; the others stay uniform
    sub = labels[labels != 6]
    freq2 = torch.bincount(sub[epoch_order(sub, True, gen)], minlength=7).double() / len(sub)
    assert freq2[6] == 0 and (freq2[:6] - 1 / 6).abs().max() < 0.08


def test_balanced_option_reaches_the_sampler(store, tmp_path, monkeypatch):
    seen = []
    real = engine_mod.epoch_order
    monkeypatch.setattr(engine_mod, "epoch_order", lambda labels, balanced, gen: seen.append(balanced) or
                        real(labels, balanced, gen))
    train(mf.small_cfg(store, method="linear-head", epochs=2, balanced=True), tmp_path / "run", progress=False,
          log=mf.quiet)
    assert seen == [True, True]


# ---------------------------------------------------------------- --online-encoder
@pytest.fixture
def online_store(fx_base, tiny_clip_dir):
    """48 px images cached at 48 px: the online path sees the same pixels the build's CLIP processor saw,
    resized 48 -> 32 by batched bicubic instead of PIL's bicubic."""
    key = ("online", str(tiny_clip_dir))
    if key not in mf._CACHE:
        root = fx_base / "online48"
        rng = np.random.default_rng(7)
        from PIL import Image
        from featcache.taxonomy import CLASSES

        for split, n in (("train", 3),):
            for label, cls in enumerate(CLASSES):
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    Image.fromarray(mf.class_image(label, 0, rng, size=48)).save(root / split / cls / f"{i}.png")
        path = fx_base / "online48.h5"
        mf.build(path, "on", root, tiny_clip_dir, ("train",), image_size=48)
        mf._CACHE[key] = path
    return mf._CACHE[key]


def test_online_features_match_cached_on_unaugmented_inputs(online_store):
    cfg = mf.small_cfg(online_store, train="on", method="cafe", image_size=48, erasing=0.0, flip=False,
                       noise_std=0.0, online_encoder=True)
    tr = Trainer(cfg, Path("unused"), progress=False, log=mf.quiet)
    pos = torch.arange(len(tr.data.train_data))
    b = tr.data.batch(tr.data.train_data, pos, True, torch.Generator().manual_seed(0))
    cached = tr.data.train_data.feats[pos, 0]
    assert not torch.equal(b.feats, cached)                   # really recomputed, not the cached view
    cos = torch.nn.functional.cosine_similarity(b.feats, cached, dim=1)
    rel = (b.feats - cached).norm(dim=1) / cached.norm(dim=1)
    # the augmented image is rendered at the encoder's input size by a bilinear resize (as the official Resize
    # and featcache build --aug-views), the cached one by the processor's bicubic: close, not equal
    assert cos.min() > 0.999 and rel.max() < 0.03, (cos.min(), rel.max())  # here: 0.9998 and 0.021
    # and an unrelated image's cached features are much further away than that
    other = torch.nn.functional.cosine_similarity(b.feats, cached.roll(3, 0), dim=1)
    assert other.mean() < cos.min()


@pytest.mark.parametrize("method", ["cafe", "linear-head"])
def test_online_encoder_trains(online_store, tmp_path, monkeypatch, method):
    from maskfer.online import OnlineEncoder

    calls = []
    real = OnlineEncoder.__call__
    monkeypatch.setattr(OnlineEncoder, "__call__", lambda self, x: calls.append(tuple(x.shape)) or real(self, x))
    cfg = mf.small_cfg(online_store, train="on", method=method, image_size=16, online_encoder=True)
    train(cfg, tmp_path / "run", progress=False, log=mf.quiet)
    # the encoder gets each augmented face rendered from the cached 48 px image at its own input size (the tiny
    # CLIP's 32 px), not the CNN's 16 px input; 21 training images
    assert calls and calls[0][1:] == (3, 32, 32) and sum(c[0] for c in calls) == 21
    rows = rundir.read_metrics(tmp_path / "run")
    assert len(rows) == 1 and np.isfinite(rows[0]["train_loss"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["online_encoder"] is True


def test_without_cached_images_training_decodes_from_the_dataset_root(tmp_path, tiny_clip_dir):
    """A store built without --image-size: images come from the root recorded in the store (or --root)."""
    import shutil

    import numpy as np

    from featcache.images import load_image, resize_uint8
    from maskfer.data import RootBank
    from maskfer.train import Trainer
    from maskfer_fixtures import build, make_colour_dataset, quiet, small_cfg

    root = make_colour_dataset(tmp_path / "dom", {"train": 2, "test": 1}, seed=3)
    store = tmp_path / "nocache.h5"
    build(store, "dom", root, tiny_clip_dir, ("train", "test"), image_size=None)
    cfg = small_cfg(store, train="dom", test=["dom"], workers=2)
    trainer = Trainer(cfg, tmp_path / "run", progress=False, log=quiet)
    bank = trainer.data.train_data.bank
    assert isinstance(bank, RootBank)
    rows = trainer.data.train_data.rows[:3]
    expected = np.stack([resize_uint8(load_image(root / i), cfg.image_size) for i in trainer.data.train_data.ids[:3]])
    assert np.array_equal(bank.get(rows).numpy(), expected)
    trainer.run()
    assert (tmp_path / "run" / "checkpoint_last.safetensors").exists()

    # The root moved: the recorded path fails with a message naming --root; --root fixes it.
    moved = tmp_path / "moved"
    shutil.move(root, moved)
    with pytest.raises(TrainError, match="--root"):
        Trainer(small_cfg(store, train="dom"), tmp_path / "run2", progress=False, log=quiet)
    t2 = Trainer(small_cfg(store, train="dom", root=str(moved)), tmp_path / "run2", progress=False, log=quiet)
    assert isinstance(t2.data.train_data.bank, RootBank)
