"""Train K configurations at once on one device, sharing every decoded and augmented batch.

``maskfer sweep --parallel K`` groups configurations that differ only in :data:`PARALLEL_FIELDS`
and calls :func:`train_parallel` once per group. Many small models fill a GPU far better
than one; the data pipeline (store read, decode, augmentation, host->device copy) runs once
per batch instead of K times.

Design: one fused module (grouped convolutions), not ``torch.func.vmap``
------------------------------------------------------------------------
The K models are fused into ONE ordinary ``nn.Module`` (:class:`StackedModel`) whose tensors
carry the K models side by side along the channel axis ("channel-concatenated layout"):

* the backbone's first Conv2d(3, out) receives the shared image batch and becomes
  Conv2d(3, K*out) with the K weight tensors concatenated along dim 0: one GEMM with K*out
  outputs reads the image once (cheaper than repeating the batch to (B, 3K, S, S));
* every other Conv2d(in, out, groups=g) becomes Conv2d(K*in, K*out, groups=K*g), so block k of
  the output depends only on block k of the input (model k's own channels);
* every BatchNorm2d(C) becomes BatchNorm2d(K*C): BN is per channel, so each model keeps its
  own batch statistics and its own running mean/var, updated in place as usual;
* every Linear(in, out) becomes :class:`StackedLinear` (weights (K*out, in), one ``baddbmm``),
  or a plain Linear(in, K*out) where the input is shared (the linear probe's features);
* parameter-free modules (ReLU, pooling, residual adds, flatten) are channel-agnostic and
  run unchanged, so the backbone's own ``forward`` drives the fused network.

Why not ``torch.func.stack_module_state`` + ``vmap(functional_call)``: (1) vmap's batching rule
for a convolution with batched weights IS a grouped convolution (the model axis is folded into
``groups``), so it would run the same kernels with extra indirection; (2) BatchNorm updates its
running statistics in place during the forward; under vmap the stacked buffers must be passed
in, updated and written back each step, and the documented functorch recipe for BN
(``replace_all_batch_norm_modules_``) simply stops tracking them, which changes the model;
(3) the fused module is an ordinary ``nn.Module``: ordinary Adam over its parameters,
ordinary state dict, no functional plumbing. Every stacked tensor keeps the MaskModel key name
with the K slices along dim 0: unstacking is slicing, one Adam over the stack is exactly K
independent Adams (Adam is elementwise; lr, weight decay and gamma are shared fields), and
with K = 1 it IS the sequential model (same modules, same kernels), so a K = 1 group
reproduces :class:`maskfer.train.Trainer` bit for bit on CPU (tests check it).

Two backbone layouts, same everything else (``train_parallel(layout=...)``):

* ``"grouped"`` (default on CUDA): the fused network above. It turns K small kernel launches per
  layer into one wide one, which is what fills a GPU.
* ``"loop"`` (default on CPU): the K backbones stay separate modules, called one after another
  on the shared batch inside the one step; mask map, sigmoid, classifier, loss, drop and
  optimizer stay fused and vectorised. Reason, measured on this project's CPU (oneDNN 3.12,
  torch 2.13, resnet18, 112 px, batch 32, K = 8, one thread): a grouped convolution forward +
  backward took ~1.75x the time of the K ordinary convolutions it replaces (17.6 s vs
  10.0 s per step), and channels-last or the non-oneDNN path did not help; end to end
  (benchmarks/sweep_parallel.py) grouped ran at 0.65x the sequential runs, loop at 1.00x. A CPU has no idle
  parallelism for the wide kernel to use, so there the group saves the repeated data
  pipeline and per-run overhead and runs the convolutions as fast as the sequential runs.
  Each model then computes exactly what it computes alone (bitwise), BN included.

Per-model switches, all vectorised over K (no Python loop over models, samples, channels or
classes in the step): ``lam``/``beta`` are (K,) weights (0 where a model turns the loss off),
``sigmoid`` is ``where(sigmoid_k, sigmoid(M), M)``, and channel drop draws uniform scores in
the grouped (rows, K, L, g_max) layout and zeroes each group's d_k lowest-scoring real slots
(:func:`per_model_keep`); ``drop_mode`` may differ per model (a "batch" model uses row 0 of
the draw for every sample). The per-model losses are summed and backpropagated once; the
models share no parameter, so their gradients do not interact.

Shared data (what "sharing each batch" means)
--------------------------------------------
A group runs ONE data stream: each epoch's sample order, augmentation and channel-drop scores
come from generators seeded by ``(cfgs[0].seed, epoch)`` exactly as ``Trainer`` seeds them
(the *data seed* of the group, recorded in every run's config.json under
``"parallel_group"``). ``seed`` per model only sets its initialisation (``torch.manual_seed``
then ``build_model``, exactly as Trainer). Hence K = 1 equals the sequential run, and with
K > 1 each model differs from its own sequential run only in the data stream (order,
augmentation, and the drop scores, which are drawn for all K models at once).

Metrics
-------
Each run's metrics.jsonl has Trainer's keys (epoch, lr, train_loss/_ce/_sep/_div, train_acc,
val_acc when ``val_split`` is set, evaluated for all K models in one batched pass) and:
``images_per_s`` = images of the shared batch stream per second, i.e. how fast THIS run
trained (the group's model-images/s divided by K); ``group_model_images_per_s`` = K x that,
the group's throughput, comparable with the sum of sequential runs' ``images_per_s``;
``parallel_k`` = the number of models trained together in that epoch.

Resume
------
Each run directory is a normal one (config.json, metrics.jsonl, checkpoint_last.safetensors
with that model's own unstacked weights and Adam state), so ``maskfer eval/predict`` and
``load_run`` read it and a plain ``maskfer train`` can resume it alone. When the group is run
again, directories whose checkpoints are at the same epoch are restacked (weights + Adam +
scheduler) and continue. If they disagree (a crash between the K checkpoint writes, or a
configuration added to an old group), the lagging runs catch up first, trained together as
a sub-group until they reach the next run's epoch, drawing their drop scores at their slots
of the full group's draw. A catch-up therefore sees exactly the data, augmentation and drop
patterns of the uninterrupted group (only float rounding differs: a smaller stack runs other
kernels), provided the group is given in the same order. A resume where all runs agree is
bit-exact on CPU.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from featcache.progress import progress_bar
from maskfer import rundir
from maskfer.config import ConfigError, TrainConfig
from maskfer.evaluate import predict_logits
from maskfer.separation import ChannelGroups, channel_groups
from maskfer.stacking import (LAYOUTS, StackedLinear, StackedModel, default_layout, stack_modules,  # noqa: F401
                              unsupported_for_grouping)

__all__ = [
    "PARALLEL_FIELDS",
    "group_key",
    "check_group",
    "StackedLinear",
    "StackedModel",
    "LossSpec",
    "per_model_keep",
    "keep_to_channels",
    "stacked_cafe_loss",
    "LAYOUTS",
    "default_layout",
    "stack_modules",
    "unsupported_for_grouping",
    "train_parallel",
]

# Fields that may differ inside one parallel group (everything else must be equal).
PARALLEL_FIELDS = ("seed", "lam", "beta", "drop", "drop_mode", "sigmoid", "separation", "diverse", "pretrained")

NUM_CLASSES = 7


# ---------------------------------------------------------------------------- grouping
def group_key(cfg: TrainConfig) -> str:
    """A string equal for two configurations iff they may train in one parallel group."""
    shared = {k: v for k, v in cfg.to_dict().items() if k not in PARALLEL_FIELDS}
    return json.dumps(shared, sort_keys=True, default=str)


def check_group(cfgs: list[TrainConfig]) -> None:
    """Raise ConfigError (a ValueError) unless ``cfgs`` may train together."""
    if not cfgs:
        raise ConfigError("train_parallel needs at least one configuration")
    base = cfgs[0].to_dict()
    for i, cfg in enumerate(cfgs[1:], 1):
        d = cfg.to_dict()
        diff = [k for k in base if k not in PARALLEL_FIELDS and d[k] != base[k]]
        if diff:
            shown = ", ".join(f"{k} ({base[k]!r} vs {d[k]!r})" for k in diff)
            raise ConfigError(
                f"configurations 0 and {i} cannot train in one parallel group: they differ in {shown}. "
                f"Only {', '.join(PARALLEL_FIELDS)} may differ within a group; group configurations by "
                "maskfer.parallel.group_key (or run them with --parallel 1)"
            )
    if cfgs[0].method not in ("cafe", "baseline", "linear-head"):
        raise ConfigError(f"--parallel stacks epoch-trained methods (cafe, baseline, linear-head), not {cfgs[0].method!r}: "
                          "the linear probe is one L-BFGS solve per run (maskfer.probe); train it with --parallel 1")


class _StateDictOf:
    """Duck type for rundir.save_checkpoint, which only calls ``.state_dict()``."""

    def __init__(self, sd: dict):
        self._sd = sd

    def state_dict(self) -> dict:
        return self._sd


# ---------------------------------------------------------------------------- losses
@dataclass
class LossSpec:
    """Per-model loss settings of the models being trained, and the group's drop draw.

    ``drops`` are effective counts (0 where a model has no separation loss). The draw is made
    for the whole group (``draw_drops``, ``draw_sample``: K_group entries) and ``slots`` picks
    the trained models' positions in it, so a sub-group catching up draws exactly what the
    full group draws.
    """

    lam: list[float]
    beta: list[float]
    drops: list[int]
    sample: list[bool]
    use_sep: list[bool]
    use_div: list[bool]
    draw_drops: list[int]
    draw_sample: list[bool]
    slots: list[int]

    @classmethod
    def from_configs(cls, cfgs: list[TrainConfig], slots: list[int] | None = None) -> "LossSpec":
        """``cfgs``: the whole group; ``slots``: the positions being trained (default: all)."""
        slots = list(range(len(cfgs))) if slots is None else list(slots)
        cafe = cfgs[0].method == "cafe"
        eff = [c.drop if cafe and c.separation else 0 for c in cfgs]
        smp = [c.drop_mode == "sample" for c in cfgs]
        return cls(lam=[cfgs[i].lam if cfgs[i].separation else 0.0 for i in slots],
                   beta=[cfgs[i].beta if cfgs[i].diverse else 0.0 for i in slots],
                   drops=[eff[i] for i in slots], sample=[smp[i] for i in slots],
                   use_sep=[cafe and cfgs[i].separation for i in slots],
                   use_div=[cafe and cfgs[i].diverse for i in slots],
                   draw_drops=eff, draw_sample=smp, slots=slots)

    @property
    def k(self) -> int:
        return len(self.slots)

    def tensors(self, device, dtype=torch.float32) -> dict[str, torch.Tensor]:
        key = (str(device), dtype)
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = {
                "lam": torch.tensor(self.lam, dtype=dtype, device=device),
                "beta": torch.tensor(self.beta, dtype=dtype, device=device),
                "use_sep": torch.tensor(self.use_sep, device=device),
                "use_div": torch.tensor(self.use_div, device=device),
                "sample": torch.tensor(self.sample, device=device),
                "drops": torch.tensor(self.drops, device=device),
                "slots": torch.tensor(self.slots, device=device),
            }
        return cache[key]


def per_model_keep(rows: int, groups: ChannelGroups, drops: list[int], generator: torch.Generator | None = None,
                   device=None, dtype: torch.dtype = torch.float32, slots: list[int] | None = None,
                   equal_path: bool | None = None, tensors: dict | None = None) -> torch.Tensor:
    """0/1 keep mask (rows, K, L, g_max) in grouped layout: exactly ``drops[k]`` zeros among
    each group's real slots for model k, a uniformly random subset per row and model.

    Scores are i.i.d. uniform, drawn as (rows, K_draw, L, g_max) with K_draw = len(drops); the
    d_k lowest-scoring real slots of each group are dropped (padding scores are pushed above
    every uniform, so padding is never chosen). ``slots`` keeps only those models' draws (for a
    sub-group; ``drops`` is then the whole group's list). Padding slots get keep 0 where
    d_k > 0, as in :func:`maskfer.separation.separation_losses` (a dropped channel's 0 is
    already in the group), and 1 where d_k = 0 (they repeat a kept channel). With one model
    this consumes the generator and returns exactly what separation's drop draws.
    ``equal_path`` (default: all drops equal) selects the one-topk path; the general path
    takes the sorted ``topk(max d)`` and drops its first d_k. ``tensors`` may hold "slots" and
    "drops" (the sub-group's counts) already on ``device``, so a training step copies nothing
    from the host (on CUDA such a copy would wait for the queued work).
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if max(drops) >= min(groups.sizes) or min(drops) < 0:
        raise ValueError(f"drops {drops} must be in [0, {min(groups.sizes) - 1}] for {groups.num_channels} "
                         f"channels in {groups.num_classes} groups")
    _, valid, _ = groups.tensors_on(device)
    scores = torch.rand(rows, len(drops), groups.num_classes, groups.max_size, generator=generator, device=device)
    tensors = tensors or {}
    if slots is not None:
        idx = tensors["slots"] if "slots" in tensors else torch.as_tensor(slots, device=device)
        scores = scores.index_select(1, idx)
        drops = [drops[i] for i in slots]
    k = len(drops)
    if not groups.equal_sizes:
        scores = scores.masked_fill(~valid, 2.0)
    d_t = tensors["drops"] if "drops" in tensors else torch.tensor(drops, device=device)
    base = torch.where(valid, True, (d_t == 0).view(k, 1, 1)).to(dtype)        # (K, L, g_max)
    keep = base.expand(rows, -1, -1, -1).clone()
    d_max = max(drops)
    if d_max == 0:
        return keep
    if equal_path if equal_path is not None else len(set(drops)) == 1:
        picked = scores.topk(d_max, dim=3, largest=False, sorted=False).indices
        return keep.scatter_(3, picked, 0.0)
    picked = scores.topk(d_max, dim=3, largest=False, sorted=True).indices      # ascending: rank 0..d_max-1
    drop_rank = torch.arange(d_max, device=device).view(1, 1, 1, d_max) < d_t.view(1, k, 1, 1)
    values = (~drop_rank).to(dtype).expand(rows, k, groups.num_classes, d_max).contiguous()
    return keep.scatter_(3, picked, values)


def keep_to_channels(keep: torch.Tensor, groups: ChannelGroups) -> torch.Tensor:
    """(rows, K, L, g_max) grouped keep -> (rows, K, C) channel keep."""
    rows, k = keep.shape[:2]
    if groups.equal_sizes:
        return keep.reshape(rows, k, groups.num_channels)
    _, valid, _ = groups.tensors_on(keep.device)
    return keep[:, :, valid]


def _grouped(x: torch.Tensor, groups: ChannelGroups) -> torch.Tensor:
    """(B, K, C) -> (B, K, L, g_max)."""
    b, k = x.shape[:2]
    if groups.equal_sizes:
        return x.view(b, k, groups.num_classes, groups.max_size)
    flat_index, _, _ = groups.tensors_on(x.device)
    return x.index_select(2, flat_index).view(b, k, groups.num_classes, groups.max_size)


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-model mean cross-entropy: logits (B, K, L), y (B,) -> (K,).

    One model: ``F.cross_entropy`` itself, whose forward sums in another order than ``mean``
    (the gradients are identical either way); so a K = 1 group logs the sequential losses bit for bit.
    """
    b, k, _ = logits.shape
    if k == 1:
        return F.cross_entropy(logits[:, 0], y).unsqueeze(0)
    logp = F.log_softmax(logits, dim=2)
    return -logp.gather(2, y.view(b, 1, 1).expand(b, k, 1)).squeeze(2).mean(0)


def stacked_cafe_loss(out: dict[str, torch.Tensor], y: torch.Tensor, spec: LossSpec,
                      generator: torch.Generator | None = None, training: bool = True,
                      keep: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-model CAFE objectives ``CE + lam_k * sep_k + beta_k * div_k`` -> totals (K,) and parts.

    Model k's total equals ``maskfer.model.cafe_loss`` with its own settings on its slice of
    ``out`` given the same drop mask. ``keep`` (rows or B, K, L, g_max) overrides the drawn mask.
    parts: "ce", "total" and, when any model uses them, "sep" / "div" (each (K,), detached;
    a model that does not use a part has its value computed but weighted 0).
    """
    logits = out["logits"]
    ce = _ce(logits, y)
    total, parts = ce, {"ce": ce.detach()}
    use_sep, use_div = any(spec.use_sep), any(spec.use_div)
    if use_sep or use_div:
        masked = out["masked"]
        b, k, c = masked.shape
        t = spec.tensors(masked.device, masked.dtype)
        groups = channel_groups(c, logits.shape[2])
        grouped = _grouped(masked, groups)
        if use_sep:
            if keep is None and training and max(spec.draw_drops) > 0:
                rows = b if any(spec.draw_sample) else 1
                keep = per_model_keep(rows, groups, spec.draw_drops, generator, masked.device, masked.dtype,
                                      slots=None if spec.slots == list(range(len(spec.draw_drops))) else spec.slots,
                                      equal_path=len(set(spec.draw_drops)) == 1, tensors=t)
                if rows > 1 and not all(spec.sample):  # "batch" models share row 0's pattern
                    keep = torch.where(t["sample"].view(1, k, 1, 1), keep, keep[:1])
            sep_logits = (grouped * keep).amax(dim=3) if keep is not None else grouped.amax(dim=3)
            sep = _ce(sep_logits, y)
            total = total + t["lam"] * sep
            parts["sep"] = sep.detach()
        if use_div:
            _, _, sizes = groups.tensors_on(masked.device)
            div = 1.0 - (grouped.amax(dim=3) / sizes.to(grouped.dtype)).mean(dim=(0, 2))
            total = total + t["beta"] * div
            parts["div"] = div.detach()
    parts["total"] = total.detach()
    return total, parts


# ---------------------------------------------------------------------------- training
def _checkpoint_epoch(path: Path) -> int:
    """Epoch of a checkpoint from its metadata alone (-1 when there is none)."""
    if not path.exists():
        return -1
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return int(json.loads(f.metadata()["maskfer"])["meta"]["epoch"])
    except Exception as e:  # noqa: BLE001
        raise rundir.RunDirError(f"cannot read checkpoint {path}: {e}") from e


class _Group:
    def __init__(self, cfgs: list[TrainConfig], outs: list[Path], progress: bool, log, layout: str,
                 trust_plugins: bool = False):
        from maskfer.train import Trainer

        self.cfgs, self.outs, self.progress, self.log = cfgs, outs, progress, log
        self.k = len(cfgs)
        # The sequential Trainer of the first configuration loads the data and builds batches, so
        # the group's data path is the sequential one by construction (K = 1 reproduces it).
        self.data = Trainer(cfgs[0], outs[0], progress=False, log=log, trust_plugins=trust_plugins)
        self.device, self.feat_dim = self.data.device, self.data.feat_dim
        self.layout = default_layout(self.device) if layout == "auto" else layout
        if cfgs[0].method != "linear-head" and self.layout == "grouped":
            from maskfer.backbones import create_backbone

            reason = unsupported_for_grouping(create_backbone(cfgs[0].backbone))
            if reason and layout == "auto":
                log(f"note: backbone {cfgs[0].backbone!r} cannot be fused ({reason}); its K copies run in a loop")
                self.layout = "loop"
            elif reason:
                raise ConfigError(f"layout 'grouped' cannot fuse backbone {cfgs[0].backbone!r}: {reason}; "
                                  "use layout 'loop' or 'auto'")
        smallest = self.feat_dim // NUM_CLASSES
        for i, cfg in enumerate(cfgs):
            if cfg.method == "cafe" and cfg.separation and cfg.drop >= smallest:
                raise ConfigError(
                    f"--drop {cfg.drop} (configuration {i}, {outs[i]}): features of encoder "
                    f"{self.data.enc_info['key']!r} have {self.feat_dim} channels, so each of the {NUM_CLASSES} "
                    f"class groups has {smallest}+ channels; drop at most {smallest - 1}")
        self.data_seed = cfgs[0].seed

    # -------------------------------------------------------------- run dirs
    def _note(self, i: int) -> dict:
        return {"index": i, "k": self.k, "runs": [str(o) for o in self.outs], "data_seed": self.data_seed,
                "per_model_fields": list(PARALLEL_FIELDS), "layout": self.layout}

    def prepare_dirs(self) -> list[int]:
        """Write or check each config.json (as Trainer does); returns each run's last finished epoch."""
        from featcache.taxonomy import CLASSES
        from maskfer.train import TrainError

        epochs = []
        for i, (cfg, out) in enumerate(zip(self.cfgs, self.outs)):
            out.mkdir(parents=True, exist_ok=True)
            cfg_path, ckpt = out / rundir.CONFIG, out / rundir.LAST
            stored = {"config": cfg.to_dict(), "config_hash": cfg.identity_hash(), "feat_dim": self.feat_dim,
                      "encoder": {k: self.data.enc_info.get(k) for k in ("key", "spec", "fingerprint", "dim")},
                      "classes": list(CLASSES), "parallel_group": self._note(i)}
            if cfg_path.exists() and ckpt.exists():
                old, old_cfg = rundir.read_run_config(out)  # a damaged file: an error naming it and the field
                if old.get("config_hash") != stored["config_hash"]:
                    old_id = old_cfg.identity()
                    diff = sorted(k for k, v in cfg.identity().items() if old_id.get(k) != v)
                    raise TrainError(
                        f"run directory {out} holds a run with another configuration (differs in: {', '.join(diff)}). "
                        "Use a new --out, or delete that directory to start over.")
                before = (old.get("parallel_group") or {}).get("data_seed", cfg.seed)
                if before != self.data_seed:
                    self.log(f"note: {out} was trained so far with data seed {before}; it continues with this "
                             f"group's data seed {self.data_seed}")
                old["parallel_group"] = stored["parallel_group"]
                rundir.write_json(cfg_path, old)
            else:  # nothing trained yet: a corrected command may replace the config
                rundir.write_json(cfg_path, stored)
            epochs.append(_checkpoint_epoch(ckpt))
        return epochs

    def run(self) -> list[dict]:
        total = self.cfgs[0].epochs
        done = self.prepare_dirs()
        while min(done) < total - 1:
            m = min(done)
            active = [i for i, e in enumerate(done) if e == m]
            stop = min([e for e in done if e > m], default=total - 1)
            if len(active) < self.k:
                self.log(f"catching up {len(active)} of {self.k} runs from epoch {m + 1} to {stop + 1}")
            self._segment(active, m + 1, stop)
            for i in active:
                done[i] = stop
        return [{"epochs": cfg.epochs, "last": (rundir.read_metrics(out) or [{}])[-1] if cfg.epochs else {},
                 "parallel_group": self._note(i)}
                for i, (cfg, out) in enumerate(zip(self.cfgs, self.outs))]

    # -------------------------------------------------------------- one segment
    def _build(self, active: list[int], start: int):
        from maskfer.train import build_model

        cfg0, dev = self.cfgs[0], self.device
        models, opt_sds, sched_sd = [], [], None
        for i in active:
            cfg = self.cfgs[i]
            torch.manual_seed(cfg.seed)
            model = build_model(cfg, self.feat_dim, self.data.feat_stats)
            if start > 0:
                sd, opt_sd, meta = rundir.load_checkpoint(self.outs[i] / rundir.LAST)
                model.load_state_dict(sd)
                opt_sds.append(opt_sd)
                sched_sd = sched_sd or meta["scheduler"]
                if i == active[0]:
                    self.log(f"resuming {len(active)} run(s) after epoch {meta['epoch'] + 1}/{cfg.epochs}")
            models.append(model)
        stacked = StackedModel(models, self.layout).to(dev)
        del models
        opt = torch.optim.Adam(stacked.parameters(), lr=cfg0.lr, weight_decay=cfg0.weight_decay)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg0.gamma)
        if start > 0:
            opt.load_state_dict(stacked.stack_optimizer_states(opt_sds))
            sched.load_state_dict(sched_sd)
        return stacked, opt, sched

    def _segment(self, active: list[int], start: int, stop: int) -> None:
        from maskfer.evaluate import metrics as eval_metrics
        from maskfer.train import PROGRESS_EVERY, _generators, batch_bounds, epoch_order, track_nonfinite

        cfg0, dev, data = self.cfgs[0], self.device, self.data
        stacked, opt, sched = self._build(active, start)
        ka = len(active)
        spec = LossSpec.from_configs(self.cfgs, active)
        cafe = cfg0.method == "cafe"
        use_sep = torch.tensor(spec.use_sep, device=dev)
        use_div = torch.tensor(spec.use_div, device=dev)
        n = len(data.train_data)
        bounds = batch_bounds(n, cfg0.batch_size)  # a lone last sample joins the batch before it, as in Trainer
        steps = len(bounds)
        for epoch in range(start, stop + 1):
            cpu_gen, dev_gen = _generators(cfg0, epoch, dev)
            order = epoch_order(data.train_data.labels, cfg0.balanced, cpu_gen)
            stacked.train()
            sums = torch.zeros(4, ka, dtype=torch.float64, device=dev)   # loss, ce, sep, div (as Trainer: float64)
            correct = torch.zeros(ka, dtype=torch.long, device=dev)
            first_bad = torch.full((4, ka), -1, dtype=torch.long, device=dev)  # see maskfer.train.track_nonfinite
            bad_value = torch.zeros(4, ka, device=dev)
            seen, t0 = 0, time.perf_counter()
            desc = f"epoch {epoch + 1}/{cfg0.epochs} x{ka}"
            with progress_bar(desc, total=n, enabled=self.progress) as advance:
                for s, (lo, hi) in enumerate(bounds):
                    pos = order[lo:hi]
                    b = data._batch(data.train_data, pos, True, dev_gen)
                    o = stacked(b.x, b.feats)
                    if cafe:
                        loss, parts = stacked_cafe_loss(o, b.y, spec, generator=dev_gen, training=True)
                    else:
                        loss = _ce(o["logits"], b.y)
                        parts = {"ce": loss.detach(), "total": loss.detach()}
                    opt.zero_grad(set_to_none=True)
                    loss.sum().backward()
                    opt.step()
                    bs = len(pos)
                    zero = torch.zeros_like(parts["ce"])
                    row = torch.stack([
                        parts["total"], parts["ce"],
                        torch.where(use_sep, parts["sep"], zero) if "sep" in parts else zero,
                        torch.where(use_div, parts["div"], zero) if "div" in parts else zero,
                    ])
                    first_bad, bad_value = track_nonfinite(first_bad, bad_value, row, s)
                    sums += row.double() * bs
                    correct += (o["logits"].detach().argmax(2) == b.y.view(-1, 1)).sum(0)
                    seen += bs
                    if self.progress and ((s + 1) % PROGRESS_EVERY == 0 or s + 1 == steps):
                        advance(bs, loss=float(sums[0].mean()) / seen, acc=float(correct.float().mean()) / seen)
                        self._check_finite(first_bad, bad_value, active, epoch, steps)  # synced just above
                    else:
                        advance(bs)
            self._check_finite(first_bad, bad_value, active, epoch, steps)  # the epoch's sync point
            sched.step()
            dt = time.perf_counter() - t0
            sums_l, correct_l = sums.cpu().tolist(), correct.cpu().tolist()
            lr = opt.param_groups[0]["lr"]
            val_acc = None
            if data.val_data is not None:
                logits = predict_logits(stacked, data.val_data, cfg0.image_size, dev)  # (N, K, L) for a stacked model
                labels = data.val_data.labels.numpy()
                val_acc = [eval_metrics(labels, logits[:, j].argmax(1).numpy())["accuracy"] for j in range(ka)]
            opt_sd = opt.state_dict()
            for j, i in enumerate(active):
                cfg, out = self.cfgs[i], self.outs[i]
                row = {"epoch": epoch, "lr": lr, "train_acc": correct_l[j] / seen,
                       "images_per_s": seen / dt, "group_model_images_per_s": ka * seen / dt, "parallel_k": ka,
                       **{f"train_{key}": sums_l[r][j] / seen
                          for r, key in enumerate(("loss", "ce", "sep", "div")) if sums_l[r][j] or key == "loss"}}
                if val_acc is not None:
                    row["val_acc"] = val_acc[j]
                meta = {"epoch": epoch, "config_hash": cfg.identity_hash(), "scheduler": sched.state_dict(),
                        "feat_dim": self.feat_dim, "parallel_group": self._note(i)}
                rundir.save_checkpoint(out / rundir.LAST, _StateDictOf(stacked.model_state_dict(j)),
                                       _StateDictOf(stacked.optimizer_state(opt_sd, j)), meta)
                rundir.append_metrics(out, row)
                self.log(f"[{i + 1}/{self.k}] {out}: epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f} "
                         f"acc {row['train_acc']:.4f}" + (f" val_acc {row['val_acc']:.4f}" if "val_acc" in row else "")
                         + f" ({row['images_per_s']:.1f} img/s shared by {ka} models, "
                           f"{row['group_model_images_per_s']:.1f} model-img/s)")
        self.model = stacked


    def _check_finite(self, first_bad, bad_value, active: list[int], epoch: int, steps: int) -> None:
        """Stop the group when any model's loss went NaN/inf (before any checkpoint of this epoch is written:
        every run directory keeps its previous epoch); the error names the diverged runs."""
        from maskfer.train import _diverged, nonfinite_message

        fb, bv = first_bad.cpu(), bad_value.cpu()
        msgs = []
        for j, i in enumerate(active):
            m = nonfinite_message(fb[:, j], bv[:, j], epoch, self.cfgs[i].epochs, steps)
            if m:
                msgs.append(f"run {i + 1}/{self.k} ({self.outs[i]}): {m}")
        if msgs:
            where = ", ".join(str(self.outs[i]) for i in active)
            raise _diverged("; ".join(msgs) + f" (trained in one parallel group with {where})",
                            self.outs[active[0]] if len(active) == 1 else Path("each run directory"), epoch)


def train_parallel(cfgs: list[TrainConfig], outs: list[Path], progress: bool = True, log=print,
                   layout: str = "auto", trust_plugins: bool = False) -> list[dict]:
    """Train (or resume) K configurations as one fused model on one device; one run directory each.

    Preconditions: the configurations differ only in :data:`PARALLEL_FIELDS` (else ConfigError,
    a ValueError); one distinct ``out`` per configuration. The data stream is the one
    ``Trainer`` would give ``cfgs[0]`` (see the module docstring). Returns, per configuration,
    what ``Trainer.run`` returns (``{"epochs", "last"}``) plus its ``"parallel_group"`` note.
    ``layout``: "grouped", "loop" or "auto" (grouped on CUDA, loop on CPU); see the module docstring.
    """
    if layout not in ("auto",) + LAYOUTS:
        raise ConfigError(f"layout must be auto, {' or '.join(LAYOUTS)}, not {layout!r}")
    cfgs = [c.validate() for c in cfgs]
    outs = [Path(o) for o in outs]
    if len(cfgs) != len(outs):
        raise ConfigError(f"train_parallel got {len(cfgs)} configurations but {len(outs)} run directories")
    check_group(cfgs)
    resolved = [o.resolve() for o in outs]
    if len(set(resolved)) != len(resolved):
        dup = next(str(o) for o in outs if resolved.count(o.resolve()) > 1)
        raise ConfigError(f"each configuration needs its own run directory; {dup} is given more than once")
    return _Group(cfgs, outs, progress, log, layout, trust_plugins).run()

