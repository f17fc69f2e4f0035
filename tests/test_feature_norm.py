"""--feature-norm standardize: training-split statistics, kept in the run, applied wherever the model runs."""
from __future__ import annotations

import torch

import maskfer_fixtures as mf
from maskfer import rundir
from maskfer.evaluate import load_run, predict_logits
from maskfer.model import FeatureNorm, LinearProbe, MaskModel, feature_stats
from maskfer.train import Trainer, train
from maskfer_fixtures import fx_base, store  # noqa: F401 - pytest fixtures


def test_off_is_the_paper_model_with_an_unchanged_state_dict():
    torch.manual_seed(0)
    plain = MaskModel("resnet18", 16, 7)
    assert not any(k.startswith("feat_norm") for k in plain.state_dict())
    assert set(LinearProbe(16).state_dict()) == {"fc.weight", "fc.bias"}


def test_standardized_model_equals_the_plain_model_on_standardized_features():
    torch.manual_seed(0)
    normed = MaskModel("resnet18", 16, 7, feature_norm=True).eval()
    plain = MaskModel("resnet18", 16, 7).eval()
    plain.load_state_dict({k: v for k, v in normed.state_dict().items() if not k.startswith("feat_norm")})
    feats = torch.randn(5, 16) * 40 + 7
    mean, std = feats.mean(0), feats.std(0)
    normed.feat_norm.set_stats(mean, std)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        a, b = normed(x, feats), plain(x, (feats - mean) / std)
    torch.testing.assert_close(a["logits"], b["logits"])
    torch.testing.assert_close(a["masked"], b["masked"])


def test_stats_come_from_the_training_rows_and_are_saved_in_the_run(store, tmp_path):
    run = tmp_path / "run"
    cfg = mf.small_cfg(store, method="linear-head", feature_norm="standardize", val_split="holdout:0.3", epochs=2)
    tr = Trainer(cfg, run, progress=False, log=mf.quiet)
    mean, std = feature_stats(tr.data.train_data.feats)           # holdout rows excluded, both views
    tr.run()
    sd, _, _ = rundir.load_checkpoint(run / rundir.LAST)
    torch.testing.assert_close(sd["feat_norm.mean"], mean)
    torch.testing.assert_close(sd["feat_norm.std"], std)
    model, _, _ = load_run(run, torch.device("cpu"))
    torch.testing.assert_close(model.feat_norm.mean, mean)
    # evaluation runs the standardization: logits equal fc on standardized features
    logits = predict_logits(model, tr.data.train_data, cfg.image_size, torch.device("cpu"))
    z = (tr.data.train_data.feats[:, 0] - mean) / std
    torch.testing.assert_close(logits, (z @ sd["fc.weight"].T + sd["fc.bias"]))


def test_holdout_rows_do_not_enter_the_statistics(store):
    full = Trainer(mf.small_cfg(store, method="linear-head", feature_norm="standardize"), "unused", progress=False,
                   log=mf.quiet)
    held = Trainer(mf.small_cfg(store, method="linear-head", feature_norm="standardize", val_split="holdout:0.3"),
                   "unused", progress=False, log=mf.quiet)
    torch.testing.assert_close(held.data.feat_stats[0], feature_stats(held.data.train_data.feats)[0])
    assert not torch.allclose(held.data.feat_stats[0], full.data.feat_stats[0])


def test_converged_probe_is_the_same_classifier_with_or_without_feature_norm(store, tmp_path):
    a, b = tmp_path / "raw", tmp_path / "std"
    train(mf.small_cfg(store, method="linear-probe", test=["domA:test"]), a, progress=False, log=mf.quiet)
    train(mf.small_cfg(store, method="linear-probe", feature_norm="standardize", test=["domA:test"]), b,
          progress=False, log=mf.quiet)
    ma, _, _ = load_run(a, torch.device("cpu"))
    mb, _, _ = load_run(b, torch.device("cpu"))
    feats = torch.randn(9, ma.fc.in_features) * 3
    torch.testing.assert_close(ma(None, feats)["logits"], mb(None, feats)["logits"], rtol=1e-4, atol=1e-4)


def test_a_parallel_group_of_one_equals_the_sequential_run_with_feature_norm(store, tmp_path):
    from maskfer.parallel import train_parallel

    cfg = mf.small_cfg(store, method="cafe", feature_norm="standardize", epochs=2, erasing=0.0)
    train(cfg, tmp_path / "seq", progress=False, log=mf.quiet)
    train_parallel([cfg], [tmp_path / "par"], progress=False, log=mf.quiet)
    sa, _, _ = rundir.load_checkpoint(tmp_path / "seq" / rundir.LAST)
    sb, _, _ = rundir.load_checkpoint(tmp_path / "par" / rundir.LAST)
    assert set(sa) == set(sb) and "feat_norm.mean" in sa
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_feature_norm_module_identity_when_off():
    f = torch.randn(3, 4)
    assert FeatureNorm(4, False)(f) is f


def test_eval_tables_tell_standardized_runs_from_raw_ones():
    from maskfer.evaluate import run_label

    store = "features.h5"  # only named in the configs
    for method in ("cafe", "linear-head", "linear-probe"):
        raw, std = (run_label(mf.small_cfg(store, method=method, feature_norm=n)) for n in ("none", "standardize"))
        assert raw == f"domA / {method}" and std == f"domA / {method} (feature-norm standardize)"
    assert run_label(mf.small_cfg(store, method="cafe", sigmoid=False, feature_norm="standardize")) == \
        "domA / cafe (no-sigmoid, feature-norm standardize)"
