"""`maskfer train`: fit cafe / baseline / linear-head (epoch loop) or linear-probe (maskfer.probe), resumably.

Determinism: the model is initialised from ``seed``; every epoch draws its sample order,
augmentation and channel drops from generators seeded by (seed, epoch). A run resumed from
the checkpoint of epoch k therefore continues exactly as the uninterrupted run would.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from featcache.devices import DeviceError, resolve_device  # noqa: F401 - maskfer modules import it from here
from featcache.progress import progress_bar
from featcache.taxonomy import CLASSES
from maskfer import rundir
from maskfer.augment import IMAGENET_MEAN, IMAGENET_STD, augment_batch, prepare_images
from maskfer.config import FEATURE_ONLY_METHODS, ConfigError, TrainConfig
from maskfer.data import DataError, SplitData, holdout_split, load_split, parse_holdout
from maskfer.model import BaselineModel, LinearProbe, MaskModel, cafe_loss, feature_stats

NUM_CLASSES = 7
LOSS_PARTS = ("loss", "ce", "sep", "div")  # logged per epoch as train_<part>
PROBE_HOLDOUT = 0.1  # share of the training split the probe picks its L2 strength on, without a val split
PROGRESS_EVERY = 10  # steps between progress-bar loss/acc refreshes (each one is a device sync)


class TrainError(Exception):
    pass


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each training batch of an epoch over ``n`` samples.

    A last batch of ONE sample is folded into the batch before it (which then holds batch_size + 1):
    BatchNorm cannot normalise a lone sample in training mode (torch raises when a channel has a
    single value, e.g. at small image sizes) and its statistics would be meaningless anyway; folding
    keeps every sample in every epoch, where dropping it would not. Training only: evaluation
    (maskfer.evaluate.predict_logits) runs in eval mode and sees every row in plain batches.
    """
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if batch_size > 1 and len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:  # (--batch-size 1: as asked)
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def track_nonfinite(first_bad: torch.Tensor, bad_value: torch.Tensor, row: torch.Tensor, step: int):
    """Device-side record of the first step at which each entry of ``row`` (the step's loss terms) was
    NaN/inf: ``first_bad`` (-1 = never) and the value then. Elementwise ops only, so no host sync; the
    trainers read it where they sync anyway (progress refreshes, the end of the epoch)."""
    new = (first_bad < 0) & ~torch.isfinite(row)
    return torch.where(new, step, first_bad), torch.where(new, row.to(bad_value.dtype), bad_value)


def nonfinite_message(first_bad: torch.Tensor, bad_value: torch.Tensor, epoch: int, epochs: int, steps: int,
                      terms: tuple[str, ...] = LOSS_PARTS) -> str | None:
    """None when every recorded term stayed finite, else the sentence naming epoch, step and term(s).
    ``first_bad``/``bad_value``: (len(terms),) as on the device (reading them syncs)."""
    fb, bv = first_bad.cpu(), bad_value.cpu()
    if not bool((fb >= 0).any()):
        return None
    step = int(fb[fb >= 0].min())
    hit = [i for i in range(len(terms)) if int(fb[i]) == step]
    named = [i for i in hit if terms[i] != "loss"] or hit  # the parts say which term; the total only if none
    what = ", ".join(f"{terms[i]} = {float(bv[i])}" for i in named)
    return f"the training loss is not finite in epoch {epoch + 1}/{epochs}, step {step + 1}/{steps} ({what})"


def _diverged(msg: str, out: Path, epoch: int) -> TrainError:
    kept = f"{out} keeps the checkpoint of epoch {epoch}" if epoch else f"no checkpoint was written to {out}"
    return TrainError(f"{msg}: training stopped, {kept} (the weights of a non-finite step are not saved). Look for "
                      "features of extreme magnitude (`featcache verify`), or lower --lr")


def build_model(cfg: TrainConfig, feat_dim: int, feat_stats: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.nn.Module:
    """The method's model; ``feat_stats`` (mean, std) initialise --feature-norm standardize (a checkpoint
    loaded afterwards carries its own)."""
    norm = cfg.feature_norm == "standardize"
    if cfg.method == "cafe":
        model = MaskModel(cfg.backbone, feat_dim, NUM_CLASSES, use_sigmoid=cfg.sigmoid, mask_map=cfg.mask_map,
                          pretrained=cfg.pretrained, feature_norm=norm)
    elif cfg.method == "baseline":
        return BaselineModel(cfg.backbone, NUM_CLASSES, pretrained=cfg.pretrained)
    else:
        model = LinearProbe(feat_dim, NUM_CLASSES, feature_norm=norm)
    if norm and feat_stats is not None:
        model.feat_norm.set_stats(*feat_stats)
    return model


def uses_images(cfg: TrainConfig) -> bool:
    return cfg.method not in FEATURE_ONLY_METHODS


def _generators(cfg: TrainConfig, epoch: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    seed = cfg.seed * 100_003 + epoch
    cpu = torch.Generator().manual_seed(seed)
    dev = torch.Generator(device=device).manual_seed(seed) if device.type != "cpu" else cpu
    return cpu, dev


def epoch_order(labels: torch.Tensor, balanced: bool, gen: torch.Generator) -> torch.Tensor:
    """A permutation, or a class-balanced sample of the same length (each class equally likely)."""
    n = len(labels)
    if not balanced:
        return torch.randperm(n, generator=gen)
    counts = torch.bincount(labels, minlength=NUM_CLASSES).float()
    weights = (1.0 / counts.clamp(min=1))[labels]
    return torch.multinomial(weights, n, replacement=True, generator=gen)


@dataclass
class Batch:
    x: torch.Tensor | None     # normalised images (B, 3, S, S) or None (linear probe)
    feats: torch.Tensor        # (B, C): the view matching the image's flip
    y: torch.Tensor


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, progress: bool = True, log=print, trust_plugins: bool = False):
        # trust_plugins (--trust-plugins) is deliberately NOT a config field: config.json files are shared.
        self.cfg, self.out, self.progress, self.log = cfg.validate(), Path(out), progress, log
        try:
            self.device = resolve_device(cfg.device)
        except DeviceError as e:
            raise TrainError(str(e)) from None
        try:
            # --online-encoder recomputes features from augmented images, so even the linear probe needs them.
            need_images = uses_images(cfg) or cfg.online_encoder
            self.train_data, self.enc_info = load_split(
                cfg.cache, cfg.train, "train", cfg.encoder, need_images, cfg.image_size, cfg.root, cfg.workers)
            self.val_data = None
            holdout = parse_holdout(cfg.val_split)
            if holdout:
                self.train_data, self.val_data = holdout_split(self.train_data, holdout)
            elif cfg.val_split:
                name = cfg.train.partition(":")[0]
                self.val_data, _ = load_split(cfg.cache, f"{name}:{cfg.val_split}", cfg.val_split, self.enc_info["key"],
                                              uses_images(cfg), cfg.image_size, cfg.root, cfg.workers)
        except DataError as e:
            raise TrainError(str(e)) from None
        self.feat_dim = int(self.enc_info["dim"])
        # --feature-norm statistics: the training rows only (a holdout is already excluded), both views
        self.feat_stats = feature_stats(self.train_data.feats) if cfg.feature_norm == "standardize" else None
        if uses_images(cfg) and len(self.train_data) < 2:
            raise TrainError(f"{self.train_data.name} has {len(self.train_data)} training image(s): the {cfg.backbone} "
                             "backbone's BatchNorm needs at least 2 per batch")
        smallest = self.feat_dim // NUM_CLASSES
        if cfg.method == "cafe" and cfg.separation and cfg.drop >= smallest:
            raise ConfigError(
                f"--drop {cfg.drop}: features of encoder {self.enc_info['key']!r} have {self.feat_dim} channels, "
                f"so each of the {NUM_CLASSES} class groups has {smallest}+ channels; drop at most {smallest - 1}"
            )
        self.online = None
        if cfg.online_encoder:
            if cfg.method in ("baseline", "linear-probe"):
                raise ConfigError("--online-encoder recomputes features for an epoch loop: use it with --method cafe or "
                                  "linear-head (baseline uses no features; linear-probe fits the cached ones once)")
            from maskfer.online import OnlineEncoder

            self.online = OnlineEncoder(self.enc_info, self.device, trust_plugins=trust_plugins, source=(
                f"{cfg.cache} (attribute 'spec' of /datasets/{cfg.train.partition(':')[0]}/encoders/{self.enc_info['key']})"))

    # ------------------------------------------------------------------ batches
    def _batch(self, data: SplitData, pos: torch.Tensor, train: bool, gen: torch.Generator | None) -> Batch:
        cfg = self.cfg
        y = data.labels[pos].to(self.device)
        feats_all = data.feats[pos].to(self.device)  # (B, 2, C)
        x = None
        flip = torch.zeros(len(pos), dtype=torch.bool, device=self.device)
        if data.bank is not None:
            imgs = data.bank.get(data.rows[pos.numpy()]).to(self.device, non_blocking=True)
            if train:
                x, flip = augment_batch(imgs, cfg.image_size, generator=gen, flip_p=0.5 if cfg.flip else 0.0,
                                        erase_p=cfg.erasing, noise_std=cfg.noise_std)
            else:
                x = prepare_images(imgs, cfg.image_size)
        elif train and cfg.flip:  # linear probe: flipping is just picking the flipped view
            flip = torch.rand(len(pos), generator=gen, device=self.device) < 0.5
        if self.online is not None and train:
            x01 = (x * torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
                   + torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)).clamp(0, 1)
            feats = self.online(x01)
        else:
            feats = feats_all[torch.arange(len(pos), device=self.device), flip.long()]
        return Batch(x, feats, y)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        cfg, out = self.cfg, self.out
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, self.feat_dim, self.feat_stats).to(self.device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.gamma)
        start = self._prepare_dir(model, opt, sched)
        if cfg.method == "linear-probe":
            return self._fit_probe(model, opt, sched, done=start > 0)
        n = len(self.train_data)
        bounds = batch_bounds(n, cfg.batch_size)
        steps = len(bounds)
        for epoch in range(start, cfg.epochs):
            cpu_gen, dev_gen = _generators(cfg, epoch, self.device)
            order = epoch_order(self.train_data.labels, cfg.balanced, cpu_gen)
            model.train()
            # Running sums stay on the device: reading them every step would sync the GPU each step.
            sums = torch.zeros(len(LOSS_PARTS), dtype=torch.float64, device=self.device)
            correct = torch.zeros((), dtype=torch.long, device=self.device)
            first_bad = torch.full((len(LOSS_PARTS),), -1, dtype=torch.long, device=self.device)
            bad_value = torch.zeros(len(LOSS_PARTS), device=self.device)
            seen, t0 = 0, time.perf_counter()
            with progress_bar(f"epoch {epoch + 1}/{cfg.epochs}", total=n, enabled=self.progress) as advance:
                for s, (lo, hi) in enumerate(bounds):
                    pos = order[lo:hi]
                    b = self._batch(self.train_data, pos, True, dev_gen)
                    o = model(b.x, b.feats)
                    if cfg.method == "cafe":
                        loss, parts = cafe_loss(o, b.y, cfg.lam, cfg.beta, cfg.drop, cfg.drop_mode == "sample",
                                                cfg.separation, cfg.diverse, generator=dev_gen, training=True)
                    else:
                        loss = F.cross_entropy(o["logits"], b.y)
                        parts = {"ce": loss.detach()}
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    k = len(pos)
                    zero = torch.zeros_like(loss.detach())
                    terms = torch.stack([loss.detach()] + [parts.get(p, zero) for p in LOSS_PARTS[1:]])
                    first_bad, bad_value = track_nonfinite(first_bad, bad_value, terms, s)
                    sums += terms.double() * k
                    correct += (o["logits"].detach().argmax(1) == b.y).sum()
                    seen += k
                    if self.progress and ((s + 1) % PROGRESS_EVERY == 0 or s + 1 == steps):
                        advance(k, loss=float(sums[0]) / seen, acc=int(correct) / seen)
                        bad = nonfinite_message(first_bad, bad_value, epoch, cfg.epochs, steps)  # synced just above
                        if bad:
                            raise _diverged(bad, out, epoch)
                    else:
                        advance(k)
            bad = nonfinite_message(first_bad, bad_value, epoch, cfg.epochs, steps)  # the epoch's sync point
            if bad:
                raise _diverged(bad, out, epoch)
            sched.step()
            totals = dict(zip(LOSS_PARTS, sums.tolist()))
            row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_acc": int(correct) / seen,
                   "images_per_s": seen / (time.perf_counter() - t0),
                   **{f"train_{k}": v / seen for k, v in totals.items() if v or k == "loss"}}
            if self.val_data is not None:
                from maskfer.evaluate import evaluate_split

                row["val_acc"] = evaluate_split(model, self.val_data, cfg.image_size, self.device)["accuracy"]
            # The checkpoint carries the metrics rows up to its epoch: a kill after the checkpoint and before
            # metrics.jsonl is rewritten would otherwise lose this epoch's row for good (the resumed run
            # starts after it); resuming restores metrics.jsonl from the checkpoint.
            history = [r for r in rundir.read_metrics(out) if r.get("epoch", -1) < epoch] + [row]
            rundir.save_checkpoint(out / rundir.LAST, model, opt,
                                   {"epoch": epoch, "config_hash": cfg.identity_hash(),
                                    "scheduler": sched.state_dict(), "feat_dim": self.feat_dim, "metrics": history})
            rundir.append_metrics(out, row)
            self.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
                     + (f" val_acc {row['val_acc']:.4f}" if "val_acc" in row else "")
                     + f" ({row['images_per_s']:.1f} img/s)")
        self.model = model
        return {"epochs": cfg.epochs, "last": rundir.read_metrics(out)[-1] if cfg.epochs else {}}

    def _fit_probe(self, model, opt, sched, done: bool) -> dict:
        """The converged linear probe (maskfer.probe): one L-BFGS solve per L2 strength, no epochs.

        Its checkpoint counts as the run's last epoch, so resume, sweeps and evaluation treat a
        fitted probe as a finished run.
        """
        from maskfer.probe import fit_probe

        cfg, out = self.cfg, self.out
        if done and not any(r.get("solver") == "lbfgs" for r in rundir.read_metrics(out)):
            # method 'linear-probe' named the epoch-trained FC before the converged probe existed
            raise TrainError(f"run directory {out} holds an epoch-trained linear head (what --method linear-probe "
                             "trained before it became the converged L-BFGS probe; now --method linear-head), not "
                             "a fitted probe. Use a new --out, or delete that directory to fit the probe")
        if not done:
            train, select, refit = self.train_data, self.val_data, None
            if select is None:  # no validation data given: choose the L2 strength on a holdout, refit on all
                train, select = holdout_split(self.train_data, PROBE_HOLDOUT)
                refit = self.train_data
            t0 = time.perf_counter()
            views = slice(None) if cfg.flip else slice(0, 1)  # --no-flip: the original view only
            fit = fit_probe(train.feats[:, views], train.labels, select.feats[:, 0], select.labels,
                            refit.feats[:, views] if refit else None, refit.labels if refit else None, NUM_CLASSES,
                            log=self.log if self.progress else None)
            w, b = fit.weight, fit.bias                  # on raw features
            if model.feat_norm.enabled:                  # the model standardizes first: x = std * z + mean
                mean, std = (t.cpu() for t in (model.feat_norm.mean, model.feat_norm.std))
                w, b = w * std, b + w @ mean
            with torch.no_grad():
                model.fc.weight.copy_(w.to(self.device))
                model.fc.bias.copy_(b.to(self.device))
            row = {"epoch": cfg.epochs - 1, "solver": "lbfgs", "train_loss": fit.train_loss, "train_acc": fit.train_acc,
                   "val_acc": fit.val_acc, "probe_lambda": fit.lam, "probe_iterations": fit.iterations,
                   "probe_converged": fit.converged, "probe_curve": fit.curve,
                   "selected_on": select.name, "seconds": time.perf_counter() - t0}
            rundir.save_checkpoint(out / rundir.LAST, model, opt,
                                   {"epoch": cfg.epochs - 1, "config_hash": cfg.identity_hash(),
                                    "scheduler": sched.state_dict(), "feat_dim": self.feat_dim, "metrics": [row]})
            rundir.append_metrics(out, row)
            self.log(f"linear probe: L2 {fit.lam:.3g} chosen on {select.name} (val acc {fit.val_acc:.4f}), "
                     f"train acc {fit.train_acc:.4f}, {fit.iterations} L-BFGS iterations"
                     + ("" if fit.converged else " (NOT converged)"))
        self.model = model
        return {"epochs": cfg.epochs, "last": rundir.read_metrics(out)[-1]}

    def _prepare_dir(self, model, opt, sched) -> int:
        """Write the config, or check it and resume from the last checkpoint. Returns the first epoch to run."""
        cfg, out = self.cfg, self.out
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob("*.tmp-*"):  # a write cut short by kill -9 (Ctrl-C cleans up after itself)
            stale.unlink(missing_ok=True)
        cfg_path = out / rundir.CONFIG
        bank = self.train_data.bank
        stored = {"config": cfg.to_dict(), "config_hash": cfg.identity_hash(), "feat_dim": self.feat_dim,
                  "encoder": {k: self.enc_info.get(k) for k in ("key", "spec", "fingerprint", "dim")},
                  "classes": list(CLASSES),
                  # size of the uint8 images the training batches were resized from (predict mirrors it)
                  "source_image_size": bank.size if bank is not None else None}
        ckpt = out / rundir.LAST
        if cfg_path.exists() and ckpt.exists():
            old, old_cfg = rundir.read_run_config(out)  # a damaged file: an error naming it and the field
            diff = []
            if old.get("config_hash") != stored["config_hash"]:
                old_id = old_cfg.identity()
                diff = sorted(k for k, v in cfg.identity().items() if old_id.get(k) != v)
            old_fp = (old.get("encoder") or {}).get("fingerprint")
            if old_fp != stored["encoder"]["fingerprint"]:
                diff.append(f"encoder features (fingerprint {old_fp} there, {stored['encoder']['fingerprint']} in "
                            f"{cfg.cache})")
            if diff:
                raise TrainError(
                    f"run directory {out} holds a run with another configuration (differs in: {', '.join(diff)}). "
                    "Use a new --out, or delete that directory to start over."
                )
        else:  # nothing trained yet: a corrected command may replace the config
            rundir.write_json(cfg_path, stored)
        if not ckpt.exists():
            return 0
        model_sd, opt_sd, meta = rundir.load_checkpoint(ckpt)
        model.load_state_dict(model_sd)
        opt.load_state_dict(opt_sd)
        sched.load_state_dict(meta["scheduler"])
        # metrics.jsonl = the rows of the epochs the checkpoint holds, no more and no fewer
        rows = meta.get("metrics") or [r for r in rundir.read_metrics(out) if r.get("epoch", -1) <= meta["epoch"]]
        rundir.atomic_write_text(out / rundir.METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        self.log(f"resuming {out} after epoch {meta['epoch'] + 1}/{cfg.epochs}")
        return int(meta["epoch"]) + 1



def train(cfg: TrainConfig, out: str | Path, progress: bool = True, log=print, evaluate_tests: bool = True,
          trust_plugins: bool = False) -> dict:
    """Train (or resume) a run and, when ``cfg.test`` is set, evaluate it on those test sets.

    ``trust_plugins``: let --online-encoder import a plug-in encoder spec named in the store."""
    trainer = Trainer(cfg, Path(out), progress, log, trust_plugins=trust_plugins)
    if evaluate_tests and cfg.test:  # a wrong --test fails now, not after the training it would follow
        from maskfer.data import check_test_sets

        info = trainer.enc_info
        try:
            check_test_sets(cfg.cache, cfg.test, info["key"], info.get("fingerprint"), trainer.feat_dim,
                            uses_images(cfg), cfg.root, trained=f"this run (training set {cfg.train})")
        except DataError as e:
            raise TrainError(str(e)) from None
    summary = trainer.run()
    if evaluate_tests and cfg.test:
        from maskfer.evaluate import evaluate_run

        summary["results"] = evaluate_run(Path(out), cfg.cache, cfg.test, trainer=trainer, log=log)
    return summary
