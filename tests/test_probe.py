"""The converged linear probe (maskfer.probe): CLIP's protocol, checked against independent solutions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import maskfer_fixtures as mf
from maskfer.config import TrainConfig
from maskfer import rundir
from maskfer.evaluate import load_run
from maskfer.model import feature_stats
from maskfer.probe import fit_logreg, fit_probe
from maskfer.train import train
from maskfer_fixtures import fx_base, store  # noqa: F401 - pytest fixtures


def _blobs(n=300, c=20, k=4, seed=0, scale=50.0, offset=30.0):
    """k Gaussian classes in c channels, badly scaled (large offset and spread) as raw encoder features are."""
    g = np.random.default_rng(seed)
    centers = g.normal(0, 1.0, (k, c))
    y = g.integers(0, k, n)
    x = centers[y] + g.normal(0, 1.0, (n, c))
    x = x * scale * g.uniform(0.1, 1.0, c) + offset
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def test_fit_is_the_minimum_of_the_regularised_objective():
    x, y = _blobs()
    mean, std = feature_stats(x.double())
    z = (x.double() - mean) / std
    lam = 1e-2
    w, b, iters, converged = fit_logreg(z, y, lam, 4)
    assert converged and iters > 0

    def objective(w_, b_):
        return float(F.cross_entropy(z @ w_.T + b_, y) + 0.5 * lam * (w_ * w_).sum())

    # the gradient vanishes ...
    wg, bg = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = F.cross_entropy(z @ wg.T + bg, y) + 0.5 * lam * (wg * wg).sum()
    loss.backward()
    assert float(wg.grad.abs().max()) < 1e-4 and float(bg.grad.abs().max()) < 1e-4
    # ... and no perturbation lowers the (strictly convex) objective
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        dw, db = torch.randn(w.shape, generator=g, dtype=w.dtype), torch.randn(b.shape, generator=g, dtype=b.dtype)
        assert objective(w + 1e-3 * dw, b + 1e-3 * db) >= objective(w, b) - 1e-12


def test_standardization_is_folded_into_raw_weights_and_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = _blobs(seed=1)
    views = torch.stack([x, x + 0.01], dim=1)          # (n, 2, C): both views are training rows
    fit = fit_probe(views, y, x[:50], y[:50], num_classes=4, lambdas=(1e-2,), refine=())
    # the folded raw-space probe gives the same logits as the standardized one
    rows, labels = views.reshape(-1, x.shape[1]).double(), y.repeat_interleave(2)
    mean, std = feature_stats(rows)
    z = (rows - mean) / std
    w, b, _, _ = fit_logreg(z, labels, 1e-2, 4)
    np.testing.assert_allclose((rows.float() @ fit.weight.T + fit.bias).numpy(), (z @ w.T + b).float().numpy(),
                               rtol=1e-3, atol=1e-3)
    # sklearn's multinomial logistic regression on the same rows: C = 1 / (lam * n) for a mean-CE objective
    ref = sklearn.LogisticRegression(C=1.0 / (1e-2 * len(labels)), max_iter=5000, tol=1e-10)
    ref.fit(z.numpy(), labels.numpy())
    assert (ref.predict(z.numpy()) == (z @ w.T + b).argmax(1).numpy()).mean() > 0.99
    np.testing.assert_allclose(ref.predict_proba(z.numpy()), torch.softmax(z @ w.T + b, 1).numpy(), atol=5e-3)


def test_l2_strength_is_chosen_on_the_selection_data():
    x, y = _blobs(n=400, seed=2)
    views = x[:300, None]
    fit = fit_probe(views, y[:300], x[300:], y[300:], num_classes=4, lambdas=(1e-4, 1e-2, 1.0))
    lams = [p["lam"] for p in fit.curve]
    assert lams[:3] == [1.0, 1e-2, 1e-4]                      # the decade grid, strong to weak, then refinement
    assert len(lams) == len(set(lams)) and 3 < len(lams) <= 7
    best = max(fit.curve, key=lambda p: (p["val_acc"], -p["val_loss"]))
    assert fit.lam == best["lam"] and fit.val_acc == best["val_acc"]
    coarse = max(fit.curve[:3], key=lambda p: (p["val_acc"], -p["val_loss"]))["lam"]
    assert all(coarse / 10 ** 0.76 < lam < coarse * 10 ** 0.76 for lam in lams[3:])   # refined around the best
    # a selection set whose labels contradict the training labels picks a different strength than the honest one
    honest = fit_probe(views, y[:300], x[300:], y[300:], num_classes=4, lambdas=(1e3, 1e-3))
    assert honest.lam < 1e-2
    shifted = (y[300:] + 1) % 4          # every selection label wrong: the accurate probe scores ~0 there
    wrong = fit_probe(views, y[:300], x[300:], shifted, num_classes=4, lambdas=(1e3, 1e-3))
    assert wrong.lam > 1e2


def test_accuracy_ties_are_broken_by_the_validation_loss(monkeypatch):
    import maskfer.probe as probe

    monkeypatch.setattr(probe, "_accuracy", lambda *a: 0.5)   # every strength ties on accuracy
    x, y = _blobs(n=400, seed=3)
    fit = fit_probe(x[:300, None], y[:300], x[300:], y[300:], num_classes=4, lambdas=(1e2, 1e-2))
    assert fit.lam == min(fit.curve, key=lambda p: p["val_loss"])["lam"]
    assert fit.curve[0]["val_loss"] > fit.curve[1]["val_loss"]   # the near-constant probe is not chosen on a tie


def test_probe_run_converges_and_evaluates(store, tmp_path):
    run = tmp_path / "probe"
    summary = train(mf.small_cfg(store, method="linear-probe", epochs=7, test=["domA:test"]), run, progress=False,
                    log=mf.quiet)
    (row,) = rundir.read_metrics(run)
    assert row["solver"] == "lbfgs" and row["probe_converged"] and row["selected_on"].startswith("domA:train[holdout")
    assert row["train_acc"] == 1.0                           # domA's colours are linearly separable
    assert len(row["probe_curve"]) >= 9 and row["epoch"] == 6
    res = summary["results"]
    assert res["epochs_trained"] == 7 and res["tests"]["domA:test"]["accuracy"] > 0.9
    # rerunning finds the probe fitted and does nothing; the model is an ordinary linear layer on raw features
    logs = []
    train(mf.small_cfg(store, method="linear-probe", epochs=7), run, progress=False, log=logs.append)
    assert len(rundir.read_metrics(run)) == 1 and any("resuming" in line for line in logs)
    model, cfg, _ = load_run(run, torch.device("cpu"))
    assert type(model).__name__ == "LinearProbe" and cfg.method == "linear-probe"


def test_probe_beats_the_recipe_trained_head_on_badly_scaled_features(store, tmp_path):
    """The reason for the protocol: Adam 2e-4 with ExponentialLR 0.9 leaves a head on raw features under-fit."""
    probe = tmp_path / "probe"
    head = tmp_path / "head"
    train(mf.small_cfg(store, method="linear-probe"), probe, progress=False, log=mf.quiet)
    train(mf.small_cfg(store, method="linear-head", epochs=3), head, progress=False, log=mf.quiet)
    assert rundir.read_metrics(probe)[-1]["train_acc"] > rundir.read_metrics(head)[-1]["train_acc"]


def test_report_of_a_probe_run_says_finished_and_shows_its_validation_curve(store, tmp_path):
    """Its one metrics row stands for every epoch: not 'training: 1 of 3 epochs', no stale-results note."""
    pytest.importorskip("matplotlib")
    from maskfer.report import write_report

    run = tmp_path / "probe"
    train(mf.small_cfg(store, method="linear-probe", epochs=3, test=["domA:test"]), run, progress=False, log=mf.quiet)
    (row,) = rundir.read_metrics(run)
    text = write_report(run, tmp_path / "rep", tsne=False, log=mf.quiet).read_text()
    assert "finished: linear probe fit by L-BFGS" in text and "training: 1 of 3" not in text
    assert "results.json was written after epoch" not in text and "still training" not in text
    table = text.split('id="probe-curve"')[1].split("</table>")[0]
    assert table.count("<tr>") == 1 + len(row["probe_curve"]) + 1    # header, every strength tried, the refit
    assert table.count("★") == 1 and not (tmp_path / "rep" / "curves.png").exists()


def test_an_epoch_trained_linear_probe_run_from_before_is_not_taken_for_a_fitted_probe(store, tmp_path):
    """Before the converged probe, --method linear-probe trained the FC by the epoch loop (now linear-head):
    such a run directory must not count as a fitted probe (rerun, sweep) and silently keep its old weights."""
    from maskfer.sweep import _finished
    from maskfer.train import TrainError

    run = tmp_path / "old"
    train(mf.small_cfg(store, method="linear-head", epochs=2), run, progress=False, log=mf.quiet)
    stored = rundir.read_json(run / rundir.CONFIG)
    stored["config"]["method"] = "linear-probe"      # what the run directory of the old method looks like
    stored["config_hash"] = TrainConfig.from_record(stored["config"]).identity_hash()
    rundir.write_json(run / rundir.CONFIG, stored)
    cfg = mf.small_cfg(store, method="linear-probe", epochs=2)
    assert not _finished(run, cfg)
    with pytest.raises(TrainError, match="epoch-trained linear head"):
        train(cfg, run, progress=False, log=mf.quiet)


def test_no_flip_fits_the_probe_on_the_original_view_only(store, tmp_path, monkeypatch):
    import maskfer.train as probe  # the run-level probe fit calls maskfer.probe.fit_probe through this name

    seen = []
    real = probe.fit_probe

    def spy(train_feats, *a, **k):
        seen.append(train_feats.shape[1])
        return real(train_feats, *a, **k)

    monkeypatch.setattr(probe, "fit_probe", spy)
    train(mf.small_cfg(store, method="linear-probe"), tmp_path / "a", progress=False, log=mf.quiet)
    train(mf.small_cfg(store, method="linear-probe", flip=False), tmp_path / "b", progress=False, log=mf.quiet)
    assert seen == [2, 1]
