"""Bad input to maskfer train / eval: each error says what is wrong and what to do, and trains nothing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import maskfer_fixtures as mf
from maskfer_fixtures import fx_base, store  # noqa: F401 - pytest fixtures
from featcache import StoreError
from featcache import store as st
from maskfer.backbones import BackboneLoadError
from maskfer.config import ConfigError, TrainConfig
from maskfer.evaluate import EvalError, evaluate_run
from maskfer.train import TrainError, Trainer, train



def _train(cfg, out):
    return train(cfg, out, progress=False, log=mf.quiet)


@pytest.fixture
def probe_run(store, fx_base):
    return mf.trained_run(fx_base, store, "errors-probe", method="linear-head", epochs=1)


@pytest.fixture
def other_clip_store(fx_base):
    """domA encoded by ANOTHER tiny CLIP (projection_dim 24) saved under the same directory name,
    so its store key is also 'tiny-clip': only dim and fingerprint tell them apart."""
    key = ("other-clip",)
    if key not in mf._CACHE:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        from conftest import _TINY_VISION, _save_processor

        clip = fx_base / "clip24" / "tiny-clip"
        torch.manual_seed(1)
        CLIPVisionModelWithProjection(CLIPVisionConfig(**{**_TINY_VISION, "projection_dim": 24})).save_pretrained(clip)
        _save_processor(clip)
        path = fx_base / "other-clip.h5"
        mf.build(path, "domA", fx_base / "domA", clip, ("train", "test"))
        mf._CACHE[key] = path
    return mf._CACHE[key]


# ---------------------------------------------------------------- what the store lacks
def test_store_without_the_dataset(store, tmp_path):
    with pytest.raises(StoreError, match=r"has no dataset 'ferplus' \(it has: domA, domB\)\. Add it with `featcache build"):
        _train(mf.small_cfg(store, train="ferplus"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_store_without_the_split(store, tmp_path):
    with pytest.raises(TrainError, match=r"no split 'val' \(splits: test, train; 'all' selects every row\)"):
        _train(mf.small_cfg(store, train="domA:val"), tmp_path / "run")


def test_store_without_the_encoder(store, tmp_path):
    with pytest.raises(TrainError, match=r"has no encoder 'clip-vit-base-patch32' \(it has: tiny-clip\)"):
        _train(mf.small_cfg(store, encoder="clip-vit-base-patch32"), tmp_path / "run")


def test_several_encoders_and_no_encoder_option(store, tmp_path, fx_base, tiny_clip_dir):
    two = mf.copy_store(store, tmp_path / "two.h5")
    mf.build(two, "domA", fx_base / "domA", tiny_clip_dir, ("train", "test"), encoder_key="tiny-clip-b")
    with pytest.raises(TrainError, match=r"has 2 encoders \(tiny-clip, tiny-clip-b\); pick one with --encoder KEY"):
        _train(mf.small_cfg(two, method="linear-head"), tmp_path / "run")
    tr = Trainer(mf.small_cfg(two, method="linear-head", encoder="tiny-clip-b"), tmp_path / "run2", progress=False)
    assert tr.enc_info["key"] == "tiny-clip-b"


def test_empty_split(store, tmp_path):
    bad = mf.copy_store(store, tmp_path / "empty.h5")
    import h5py

    with h5py.File(bad, "a") as f:
        g = st.write_dataset(f, "nothing", ids=[], labels=np.zeros(0, np.int8), splits=[],
                             attrs={"class_names": ["surprise", "fear", "disgust", "happiness", "sadness", "anger",
                                                    "neutral"], "root": str(tmp_path)})
        eg = g["encoders"].create_group("tiny-clip")
        eg.attrs["dim"], eg.attrs["fingerprint"] = 16, "0" * 16
        eg.create_dataset("features", shape=(0, 2, 16), dtype=np.float32)
    with pytest.raises(TrainError, match=r"split nothing:all in .* is empty .*pick another split with nothing:SPLIT"):
        _train(mf.small_cfg(bad, train="nothing:all", method="linear-head"), tmp_path / "run")


# ---------------------------------------------------------------- damaged stores
def _first_row(g, split):
    return int(np.flatnonzero(g["splits"].asstr()[()] == split)[0])


def test_nan_features(store, tmp_path, probe_run):
    bad = mf.copy_store(store, tmp_path / "nan.h5")

    def poison(g):
        for split in ("train", "test"):
            g["encoders/tiny-clip/features"][_first_row(g, split), 1, 3] = np.nan  # the flipped view only

    mf.edit_store(bad, "domA", poison)
    with pytest.raises(TrainError, match=r"1 feature rows of domA:train \(encoder tiny-clip\) contain NaN/inf, first id "
                                         r"'train/anger/train_anger_000.png'; run `featcache verify"):
        _train(mf.small_cfg(bad, method="linear-head"), tmp_path / "run")
    with pytest.raises(EvalError, match=r"domA:test .* contain NaN/inf.*rebuild that dataset"):
        evaluate_run(probe_run, str(bad), ["domA:test"], device="cpu", log=mf.quiet)


def test_labels_outside_the_classes(store, tmp_path):
    bad = mf.copy_store(store, tmp_path / "labels.h5")
    mf.edit_store(bad, "domA", lambda g: g["labels"].__setitem__(_first_row(g, "train"), 9))
    with pytest.raises(TrainError, match=r"1 label\(s\) of domA:train .* outside the classes 0\.\.6 .*label 9.*"
                                         r"rebuild dataset 'domA' with `featcache build`"):
        _train(mf.small_cfg(bad, method="linear-head"), tmp_path / "run")


# ---------------------------------------------------------------- runs and checkpoints that do not fit
def test_run_directory_from_another_config(store, tmp_path):
    run = tmp_path / "run"
    _train(mf.small_cfg(store, method="linear-head"), run)
    with pytest.raises(TrainError, match=r"another configuration \(differs in: method, train\)\. Use a new --out, "
                                         r"or delete that directory"):
        _train(mf.small_cfg(store, method="cafe", train="domB"), run)


def test_resume_against_features_of_another_encoder(probe_run, other_clip_store, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(probe_run, run)
    # --cache may change on resume (it is not part of the config identity), but not the features behind it
    with pytest.raises(TrainError, match=r"differs in: encoder features \(fingerprint [0-9a-f]{16} there"):
        _train(mf.small_cfg(other_clip_store, method="linear-head"), run)


def test_eval_on_features_of_another_dimension(probe_run, other_clip_store):
    with pytest.raises(EvalError, match=r"has encoder 'tiny-clip' features \(dim 24, fingerprint [0-9a-f]+\) but run .* "
                                        r"was trained on dim 16 .*build the test set with the same --model"):
        evaluate_run(probe_run, str(other_clip_store), ["domA:test"], device="cpu", log=mf.quiet)


def test_eval_of_something_that_is_not_a_run(tmp_path, store):
    with pytest.raises(EvalError, match=r"not a maskfer run directory .*train one with `maskfer train`"):
        evaluate_run(tmp_path, str(store), ["domA:test"], device="cpu")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EvalError, match="has no checkpoint yet"):
        evaluate_run(tmp_path, str(store), ["domA:test"], device="cpu")


@pytest.mark.parametrize("drop", [2, 10])
def test_drop_too_large_for_the_feature_dim(store, tmp_path, drop):
    # 16-d features in 7 class groups: 2 channels each (the last 4); at least one must stay
    with pytest.raises(ConfigError, match=rf"--drop {drop}: features of encoder 'tiny-clip' have 16 channels, so each "
                                          r"of the 7 class groups has 2\+ channels; drop at most 1"):
        _train(mf.small_cfg(store, drop=drop), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("weights,match", [
    ({"encoder.layer0.weight": torch.zeros(3)}, r"no key matches the ResNet backbone \(wrong architecture\?\)"),
    ({"conv1.weight": torch.zeros(64, 3, 3, 3), "bn1.weight": torch.ones(64)},
     r"1 key\(s\) have the wrong shape for ResNet .*conv1\.weight: model \(64, 3, 7, 7\) vs file \(64, 3, 3, 3\)"),
])
def test_pretrained_file_that_does_not_fit(store, tmp_path, weights, match):
    path = tmp_path / "weights.pth"
    torch.save(weights, path)
    for method in ("cafe", "baseline"):
        with pytest.raises(BackboneLoadError, match=match):
            _train(mf.small_cfg(store, method=method, pretrained=str(path)), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint_last.safetensors").exists()


def test_invalid_options():
    with pytest.raises(ConfigError, match="--method must be one of cafe, baseline, linear-probe, linear-head, zero-shot, not 'mask'"):
        TrainConfig(train="x", method="mask").validate()
    with pytest.raises(ConfigError, match="--backbone must be one of .*resnet18.*, not 'resnet19'"):
        TrainConfig(train="x", backbone="resnet19").validate()
    with pytest.raises(ConfigError, match=r"--train DATASET\[:SPLIT\] is required"):
        TrainConfig().validate()
    with pytest.raises(ConfigError, match="--erasing in"):
        TrainConfig(train="x", erasing=1.5).validate()
    with pytest.raises(ConfigError, match="unknown config option"):
        TrainConfig.from_dict({"train": "x", "learning_rate": 1})


def test_online_encoder_needs_features(store, tmp_path):
    with pytest.raises(ConfigError, match="--online-encoder recomputes features for an epoch loop: use it with --method cafe or linear-head"):
        _train(mf.small_cfg(store, method="baseline", online_encoder=True), tmp_path / "run")
