"""maskfer.parallel: K models fused into one network, per-model losses, and train_parallel run dirs.

Structural equivalence (stacked vs separate models) is checked in float64, where the fused
kernels' different summation orders stay ~1e-15 apart, so a real mismatch cannot hide under
float32 noise. K = 1 (a lone run or a group of one) against a plain reference loop with maskfer.model.cafe_loss
is checked bit for bit in float32.
"""
import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from maskfer import rundir
from maskfer.config import ConfigError
from maskfer.evaluate import evaluate_run, load_run
from maskfer.model import BaselineModel, LinearProbe, MaskModel, cafe_loss
from maskfer.losses import LossSpec, keep_to_channels, per_model_keep, stacked_cafe_loss
from maskfer.parallel import PARALLEL_FIELDS, check_group, group_key, train_parallel
from maskfer.stacking import StackedModel
from maskfer.separation import (
    channel_groups,
    diverse_loss,
    random_drop_mask,
    reference_diverse_loss,
    reference_group_bounds,
    reference_separation_logits,
)
from maskfer.batches import TrainingData, batch_bounds, epoch_generators, epoch_order
from maskfer.model import create_model
from maskfer.train import Trainer

from maskfer_fixtures import build, make_colour_dataset, quiet, small_cfg

TIMING = {"images_per_s", "group_model_images_per_s", "parallel_k"}


def _models(kind, seeds, sigmoids=None, feat_dim=16, mask_map="auto", dtype=torch.float64):
    out = []
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)
        if kind == "linear-head":
            m = LinearProbe(feat_dim)
        elif kind.startswith("baseline-"):
            m = BaselineModel(kind.split("-", 1)[1])
        else:
            m = MaskModel(kind, feat_dim, use_sigmoid=True if sigmoids is None else sigmoids[i], mask_map=mask_map)
        out.append(m.to(dtype))
    return out


# ------------------------------------------------------------------ the fused model
@pytest.mark.parametrize("kind,mask_map,layout", [
    ("resnet18", "auto", "grouped"), ("mobilenet_v2", "auto", "grouped"), ("resnet18", "linear", "grouped"),
    ("baseline-mobilenet_v2", "auto", "grouped"), ("linear-head", "auto", "grouped"),
    ("resnet18", "auto", "loop"), ("mobilenet_v2", "linear", "loop")])
def test_stacked_forward_and_bn_stats_equal_separate_models(kind, mask_map, layout):
    models = _models(kind, [0, 1, 2], [True, False, True], mask_map=mask_map)
    stacked = StackedModel(copy.deepcopy(models), layout)
    assert stacked.k == 3
    if layout == "grouped":
        assert list(stacked.state_dict()) == list(models[0].state_dict())
    for k, m in enumerate(models):  # unstacking returns exactly the separate models' state dicts
        own = stacked.model_state_dict(k)
        assert all(torch.equal(own[n], v) for n, v in m.state_dict().items())
    torch.manual_seed(5)
    x, f = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    for mode in ("train", "eval"):
        stacked.train(mode == "train")
        out = stacked(x, f)
        assert out["logits"].shape == (4, 3, 7)
        for k, m in enumerate(models):
            m.train(mode == "train")
            ref = m(x, f)
            for key in ref:
                torch.testing.assert_close(out[key][:, k], ref[key], rtol=1e-9, atol=1e-9)
            own = stacked.model_state_dict(k)  # includes BN running stats and batch counters
            for n, v in m.state_dict().items():
                torch.testing.assert_close(own[n], v, rtol=1e-9, atol=1e-9, msg=f"{mode} {k} {n}")


@pytest.mark.parametrize("layout", ["grouped", "loop"])
def test_adam_on_the_stack_equals_k_separate_adams(layout):
    models = _models("mobilenet_v2", [0, 1, 2], [True, False, True])
    stacked = StackedModel(copy.deepcopy(models), layout)
    opt = torch.optim.Adam(stacked.parameters(), lr=1e-3, weight_decay=1e-4)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3, weight_decay=1e-4) for m in models]
    spec = LossSpec(lam=[1.5, 0.7, 0.0], beta=[5.0, 0.3, 2.0], drops=[1, 1, 0], sample=[True, True, True],
                    use_sep=[True, True, False], use_div=[True, True, True], draw_drops=[1, 1, 0],
                    draw_sample=[True, True, True], slots=[0, 1, 2])
    groups = channel_groups(16, 7)
    torch.manual_seed(3)
    for _ in range(2):
        x, f = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.randn(6, 16, dtype=torch.float64)
        y = torch.randint(0, 7, (6,))
        keep = per_model_keep(6, groups, spec.drops, torch.Generator().manual_seed(1), dtype=torch.float64)
        loss, _ = stacked_cafe_loss(stacked(x, f), y, spec, keep=keep)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        keep_ch = keep_to_channels(keep, groups)
        for k, (m, o) in enumerate(zip(models, opts)):
            out = m(x, f)
            total = F.cross_entropy(out["logits"], y) + spec.beta[k] * diverse_loss(out["masked"], 7)
            if spec.use_sep[k]:
                total = total + spec.lam[k] * F.cross_entropy(
                    reference_separation_logits(out["masked"], 7, keep_ch[:, k]), y)
            o.zero_grad()
            total.backward()
            o.step()
    opt_sd = opt.state_dict()
    for k, (m, o) in enumerate(zip(models, opts)):
        own = stacked.model_state_dict(k)
        for n, v in m.state_dict().items():
            torch.testing.assert_close(own[n], v, rtol=1e-7, atol=1e-9, msg=n)
        mine, ref = stacked.optimizer_state(opt_sd, k), o.state_dict()
        assert mine["param_groups"] == ref["param_groups"]
        assert mine["state"].keys() == ref["state"].keys()
        for pid, s in ref["state"].items():
            for key, v in s.items():
                torch.testing.assert_close(mine["state"][pid][key], v, rtol=1e-7, atol=1e-12)
    # restacking the K slices gives back the stacked optimizer state
    again = stacked.stack_optimizer_states([stacked.optimizer_state(opt_sd, k) for k in range(3)])
    assert all(torch.equal(again["state"][p][key], v) for p, s in opt_sd["state"].items() for key, v in s.items())


# ------------------------------------------------------------------ channel drop
@pytest.mark.parametrize("c,drops", [(512, [10, 0, 3, 72]), (16, [1, 0, 1]), (49, [2, 2, 2])])
def test_per_model_drop_exact_counts_padding_and_patterns(c, drops):
    groups = channel_groups(c, 7)
    keep = per_model_keep(64, groups, drops, torch.Generator().manual_seed(0))
    assert keep.shape == (64, len(drops), 7, groups.max_size)
    ch = keep_to_channels(keep, groups)
    for k, d in enumerate(drops):
        for s, e in reference_group_bounds(c, 7):
            assert ((ch[:, k, s:e] == 0).sum(1) == d).all()
        pad = keep[:, k][:, ~groups.valid]
        assert (pad == (0.0 if d else 1.0)).all()
        if d:  # a new pattern per sample
            assert len({tuple(r) for r in ch[:, k].tolist()}) > 50


def test_per_model_drop_matches_separation_statistics_and_draws():
    groups = channel_groups(512, 7)
    # One model: the very same draw as maskfer.separation (same generator consumption and result).
    for per_sample in (True, False):
        rows = 8 if per_sample else 1
        mine = keep_to_channels(per_model_keep(rows, groups, [10], torch.Generator().manual_seed(4)), groups)[:, 0]
        ref = random_drop_mask(8, 512, 7, 10, per_sample=per_sample, generator=torch.Generator().manual_seed(4))
        assert torch.equal(mine, ref)
    # Unequal counts (the sorted-topk path): each channel dropped with probability d / group size.
    n = 4000
    keep = keep_to_channels(per_model_keep(n, groups, [10, 3], torch.Generator().manual_seed(1)), groups)
    ref = random_drop_mask(n, 512, 7, 10, generator=torch.Generator().manual_seed(2))
    sizes = torch.tensor(groups.sizes, dtype=torch.float64)[groups.group_of]
    for freq, d in ((1 - keep[:, 0].double().mean(0), 10), (1 - keep[:, 1].double().mean(0), 3),
                    (1 - ref.double().mean(0), 10)):
        p = d / sizes
        assert ((freq - p).abs() < 5 * (p * (1 - p) / n).sqrt()).all()
    # A sub-group draws its slots of the full group's draw.
    full = per_model_keep(5, groups, [10, 3, 7], torch.Generator().manual_seed(9))
    sub = per_model_keep(5, groups, [10, 3, 7], torch.Generator().manual_seed(9), slots=[2, 0])
    assert torch.equal(sub, full[:, [2, 0]])
    with pytest.raises(ValueError, match="drops"):
        per_model_keep(1, groups, [73], torch.Generator())


# ------------------------------------------------------------------ losses
def _with_groups(cfg, groups):
    cfg.groups = groups  # the shared pooling mode (a TrainConfig field; set directly so any version works)
    return cfg


@pytest.mark.parametrize("groups", ["official", "balanced"])
def test_stacked_losses_equal_cafe_loss_per_model(groups):
    from maskfer.config import TrainConfig

    base = dict(train="x")
    cfgs = [TrainConfig(**base), TrainConfig(**base, lam=0.7, beta=0.3, drop=0),
            TrainConfig(**base, separation=False, drop=40), TrainConfig(**base, diverse=False, drop=3, drop_mode="batch"),
            TrainConfig(**base, drop=10, drop_mode="batch")]
    cfgs = [_with_groups(c, groups) for c in cfgs]
    spec = LossSpec.from_configs(cfgs)
    assert spec.drops == [10, 0, 0, 3, 10] and spec.groups == groups
    b, k, c = 6, len(cfgs), 512
    torch.manual_seed(0)
    logits = torch.randn(b, k, 7, requires_grad=True)
    masked = torch.randn(b, k, c).sigmoid().requires_grad_()
    y = torch.randint(0, 7, (b,))
    out = {"logits": logits, "masked": masked}
    cg = channel_groups(c, 7)
    totals, parts = stacked_cafe_loss(out, y, spec, generator=torch.Generator().manual_seed(7))
    keep = per_model_keep(b, cg, spec.drops, torch.Generator().manual_seed(7))
    keep = torch.where(torch.tensor(spec.sample).view(1, k, 1, 1), keep, keep[:1])
    totals2, _ = stacked_cafe_loss(out, y, spec, keep=keep)
    assert torch.equal(totals, totals2)  # the internal draw is that mask
    ch = keep_to_channels(keep, cg)
    assert torch.equal(stacked_cafe_loss(out, y, spec, keep=ch)[0], totals)  # the channel-layout keep
    assert torch.equal(ch[:, 4], ch[:1, 4].expand(b, -1))  # "batch" model: one pattern for the batch
    totals.sum().backward()
    for j, cfg in enumerate(cfgs):
        lg, mk = logits.detach()[:, j].requires_grad_(), masked.detach()[:, j].requires_grad_()
        expected = F.cross_entropy(lg, y)
        if cfg.separation:
            expected = expected + cfg.lam * F.cross_entropy(reference_separation_logits(mk, 7, ch[:, j], groups), y)
        if cfg.diverse:
            expected = expected + cfg.beta * reference_diverse_loss(mk, 7, groups)
        torch.testing.assert_close(totals[j], expected.detach(), rtol=1e-6, atol=1e-6)
        # cafe_loss itself, given model j's mask (a "batch" model's is one (1, C) row)
        given = ch[:1, j] if cfg.drop_mode == "batch" else ch[:, j]
        ref, _ = cafe_loss({"logits": lg, "masked": mk}, y, cfg.lam, cfg.beta, cfg.drop, cfg.drop_mode == "sample",
                           cfg.separation, cfg.diverse, groups=groups, keep=given if spec.drops[j] else None)
        torch.testing.assert_close(totals[j], ref.detach(), rtol=1e-6, atol=1e-6)
        expected.backward()
        torch.testing.assert_close(logits.grad[:, j], lg.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(masked.grad[:, j], mk.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("c,drop,mode,groups", [(512, 10, "sample", "official"), (512, 10, "batch", "official"),
                                               (49, 2, "sample", "official"), (512, 10, "sample", "balanced"),
                                               (512, 10, "batch", "balanced")])
def test_one_model_loss_is_bitwise_cafe_loss(c, drop, mode, groups):
    from maskfer.config import TrainConfig

    cfg = _with_groups(TrainConfig(train="x", lam=0.7, beta=0.3, drop=drop, drop_mode=mode), groups)
    torch.manual_seed(1)
    logits, masked, y = torch.randn(10, 1, 7), torch.rand(10, 1, c), torch.randint(0, 7, (10,))
    mine, parts = stacked_cafe_loss({"logits": logits, "masked": masked}, y, LossSpec.from_configs([cfg]),
                                    generator=torch.Generator().manual_seed(3))
    ref, ref_parts = cafe_loss({"logits": logits[:, 0], "masked": masked[:, 0]}, y, 0.7, 0.3, drop, mode == "sample",
                               generator=torch.Generator().manual_seed(3), groups=groups)
    assert torch.equal(mine[0], ref) and all(torch.equal(parts[key][0], v) for key, v in ref_parts.items())


def test_loss_spec_reads_the_shared_grouping():
    from maskfer.config import TrainConfig

    cfgs = [TrainConfig(train="x"), TrainConfig(train="x", seed=1)]
    assert LossSpec.from_configs(cfgs).groups == "official"  # the default, with or without the config field
    assert LossSpec.from_configs([_with_groups(c, "balanced") for c in cfgs], [1]).groups == "balanced"
    with pytest.raises(ValueError, match="share the pooling mode"):
        LossSpec.from_configs([_with_groups(cfgs[0], "official"), _with_groups(cfgs[1], "balanced")])
    with pytest.raises(ValueError, match="groups must be one of"):
        LossSpec.from_configs([_with_groups(TrainConfig(train="x"), "paper")])


# ------------------------------------------------------------------ train_parallel
@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_clip_dir):
    base = tmp_path_factory.mktemp("parallel")
    root = make_colour_dataset(base / "domA", {"train": 6, "val": 2}, domain=0, seed=1)
    path = base / "features.h5"
    build(path, "domA", root, tiny_clip_dir, ("train", "val"))
    return path


def _rows(run):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rundir.read_metrics(run)]


def _same_checkpoints(a, b, exact=True):
    sa, oa, ma = rundir.load_checkpoint(a / rundir.LAST)
    sb, ob, mb = rundir.load_checkpoint(b / rundir.LAST)
    assert sa.keys() == sb.keys() and ma["epoch"] == mb["epoch"] and ma["scheduler"] == mb["scheduler"]
    pairs = [(sa[n], sb[n]) for n in sa] + [(oa["state"][p][k], ob["state"][p][k])
                                             for p in oa["state"] for k in oa["state"][p]]
    for x, y in pairs:
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)


def _reference_fit(cfg) -> dict:
    """The readable specification of one run: ONE plain model, maskfer.model.cafe_loss (or plain CE), plain
    Adam + ExponentialLR, the run's seeded epoch order, batches and drop draws. No stacking, no batched loss."""
    data = TrainingData(cfg)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg, data.feat_dim, data.feat_stats)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.gamma)
    for epoch in range(cfg.epochs):
        cpu_gen, dev_gen = epoch_generators(cfg.seed, epoch, torch.device("cpu"))
        order = epoch_order(data.train_data.labels, cfg.balanced, cpu_gen)
        model.train()
        for lo, hi in batch_bounds(len(data.train_data), cfg.batch_size):
            b = data.batch(data.train_data, order[lo:hi], True, dev_gen)
            o = model(b.x, b.feats)
            if cfg.method == "cafe":
                loss, _ = cafe_loss(o, b.y, cfg.lam, cfg.beta, cfg.drop, cfg.drop_mode == "sample", cfg.separation,
                                    cfg.diverse, generator=dev_gen, training=True,
                                    groups=getattr(cfg, "groups", "official"))
            else:
                loss = F.cross_entropy(o["logits"], b.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model.state_dict()


@pytest.mark.parametrize("kw,layout", [(dict(lam=0.7, beta=0.3), "loop"), (dict(lam=0.7, beta=0.3), "grouped"),
                                       (dict(method="linear-head"), "auto"),
                                       (dict(method="baseline", backbone="mobilenet_v2"), "auto"),
                                       (dict(sigmoid=False, drop_mode="batch", balanced=True), "auto"),
                                       (dict(groups="balanced", drop_mode="sample"), "auto")])
def test_the_engine_with_one_model_reproduces_the_reference_loop(store, tmp_path, kw, layout):
    """One training loop serves a lone run (train) and a group (train_parallel); with one model both must
    compute exactly what the plain reference loop computes, bit for bit on CPU. (16-d features: the official
    windows 7 x 2 and the balanced groups 6 x 2 + 4 differ, so the engine must pass the pooling mode on.)"""
    from dataclasses import fields

    from maskfer.config import TrainConfig

    if "groups" in kw and "groups" not in {f.name for f in fields(TrainConfig)}:
        pytest.skip("TrainConfig has no groups field")
    cfg = small_cfg(store, epochs=2, val_split="val", **kw)
    expected = _reference_fit(cfg)
    Trainer(cfg, tmp_path / "seq", progress=False, log=quiet).run()
    res = train_parallel([cfg], [tmp_path / "par"], progress=False, log=quiet, layout=layout)
    assert _rows(tmp_path / "seq") == _rows(tmp_path / "par")
    assert res[0]["last"]["epoch"] == 1 and "val_acc" in res[0]["last"]
    _same_checkpoints(tmp_path / "seq", tmp_path / "par")
    got = rundir.load_checkpoint(tmp_path / "seq" / rundir.LAST)[0]
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


GROUP = [dict(), dict(lam=0.5, beta=1.0, drop=0, seed=3), dict(sigmoid=False, drop_mode="batch", separation=False)]


def test_group_run_dirs_load_evaluate_and_resume(store, tmp_path):
    cfgs = [small_cfg(store, epochs=1, val_split="val", **kw) for kw in GROUP]
    outs = [tmp_path / f"r{i}" for i in range(3)]
    res = train_parallel(cfgs, outs, progress=False, log=quiet, layout="grouped")
    assert [r["last"]["epoch"] for r in res] == [0, 0, 0]
    for i, out in enumerate(outs):
        stored = rundir.read_json(out / rundir.CONFIG)
        assert stored["parallel_group"]["runs"] == [str(o) for o in outs] and stored["parallel_group"]["index"] == i
        assert stored["config"]["seed"] == cfgs[i].seed and stored["parallel_group"]["data_seed"] == 0
        assert stored["parallel_group"]["layout"] == "grouped"
        row = rundir.read_metrics(out)[-1]
        assert row["parallel_k"] == 3 and row["group_model_images_per_s"] == pytest.approx(3 * row["images_per_s"])
        assert ("train_sep" in row) == cfgs[i].separation
        model, cfg, _ = load_run(out, torch.device("cpu"))
        assert isinstance(model, MaskModel) and model.use_sigmoid == cfgs[i].sigmoid
        result = evaluate_run(out, None, ["domA:val"], device="cpu", log=quiet)
        assert result["tests"]["domA:val"]["accuracy"] == pytest.approx(row["val_acc"])
    # the three models are different models
    w = [rundir.load_checkpoint(o / rundir.LAST)[0]["fc.weight"] for o in outs]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])
    # a finished group resumes to nothing
    assert train_parallel(cfgs, outs, progress=False, log=quiet)[0]["last"] == res[0]["last"]


@pytest.fixture(scope="module")
def uninterrupted(store, tmp_path_factory):
    cfgs = [small_cfg(store, epochs=2, **kw) for kw in GROUP[:2]]
    base = tmp_path_factory.mktemp("uninterrupted")
    ref = [base / f"u{i}" for i in range(2)]
    train_parallel(cfgs, ref, progress=False, log=quiet)
    return cfgs, ref


@pytest.mark.parametrize("crash_at", [3, 4])
def test_interrupted_group_resumes_and_catches_up(uninterrupted, tmp_path, monkeypatch, crash_at):
    """crash_at 3: both runs have epoch 0 (restack, bit-exact); 4: run 1 lags and catches up alone."""
    cfgs, ref = uninterrupted
    outs = [tmp_path / f"r{i}" for i in range(2)]
    real, calls = rundir.save_state, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == crash_at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(rundir, "save_state", flaky)
    with pytest.raises(KeyboardInterrupt):
        train_parallel(cfgs, outs, progress=False, log=quiet)
    monkeypatch.setattr(rundir, "save_state", real)
    logs = []
    train_parallel(cfgs, outs, progress=False, log=logs.append)
    assert any("catching up" in m for m in logs) == (crash_at == 4)
    for r, o in zip(ref, outs):
        if crash_at == 3:
            assert _rows(r) == _rows(o)
        else:  # same data and drops; the 1-model stack rounds differently from the 2-model one
            for a, b in zip(_rows(r), _rows(o)):
                assert a.keys() == b.keys() and all(v == pytest.approx(b[k], rel=1e-4) for k, v in a.items())
        _same_checkpoints(r, o, exact=crash_at == 3)


def test_mismatched_groups_are_refused(store, tmp_path):
    a, b = small_cfg(store), small_cfg(store, lr=1e-3, image_size=32)
    assert group_key(small_cfg(store, seed=1, lam=0.2, drop=0)) == group_key(a) != group_key(b)
    assert set(PARALLEL_FIELDS) >= {"seed", "lam", "beta", "drop", "sigmoid", "separation", "diverse"}
    with pytest.raises(ValueError, match=r"differ in image_size \(16 vs 32\), lr"):
        check_group([a, b])
    with pytest.raises(ValueError, match="differ in lr"):
        train_parallel([a, small_cfg(store, lr=1e-3)], [tmp_path / "x", tmp_path / "y"], progress=False, log=quiet)
    with pytest.raises(ValueError, match="2 run directories"):
        train_parallel([a], [tmp_path / "x", tmp_path / "y"], progress=False, log=quiet)
    with pytest.raises(ValueError, match="more than once"):
        train_parallel([a, a], [tmp_path / "x", tmp_path / "x"], progress=False, log=quiet)
    with pytest.raises(ConfigError, match=r"--drop 2 \(configuration 1"):
        train_parallel([a, small_cfg(store, drop=2)], [tmp_path / "x", tmp_path / "y"], progress=False, log=quiet)
    assert not (tmp_path / "x").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_catching_up_sub_group_without_separation_consumes_the_generator_like_the_whole_group():
    """Runs of one group share one random stream; a lagging sub-group must draw the group's channel drops even
    when its own models use no separation loss, or every later draw of the epoch (augmentation) shifts."""
    cfgs = [small_cfg("unused.h5", drop=1), small_cfg("unused.h5", drop=1, separation=False)]
    full, sub = LossSpec.from_configs(cfgs), LossSpec.from_configs(cfgs, slots=[1])
    b, c = 4, 16
    y = torch.arange(b) % 7
    after = []
    for spec in (full, sub):
        g = torch.Generator().manual_seed(3)
        k = spec.k
        out = {"logits": torch.randn(b, k, 7), "masked": torch.randn(b, k, c)}
        stacked_cafe_loss(out, y, spec, generator=g, training=True)
        after.append(torch.rand(3, generator=g))
    assert torch.equal(after[0], after[1])
