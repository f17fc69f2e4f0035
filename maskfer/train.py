"""`maskfer train`: fit cafe / baseline / linear-probe against a feature store, resumably.

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
from maskfer.config import ConfigError, TrainConfig
from maskfer.data import DataError, SplitData, holdout_split, load_split, parse_holdout
from maskfer.model import BaselineModel, LinearProbe, MaskModel, cafe_loss

NUM_CLASSES = 7
LOSS_PARTS = ("loss", "ce", "sep", "div")  # logged per epoch as train_<part>
PROGRESS_EVERY = 10  # steps between progress-bar loss/acc refreshes (each one is a device sync)


class TrainError(Exception):
    pass


def build_model(cfg: TrainConfig, feat_dim: int) -> torch.nn.Module:
    if cfg.method == "cafe":
        return MaskModel(cfg.backbone, feat_dim, NUM_CLASSES, use_sigmoid=cfg.sigmoid, mask_map=cfg.mask_map,
                         pretrained=cfg.pretrained)
    if cfg.method == "baseline":
        return BaselineModel(cfg.backbone, NUM_CLASSES, pretrained=cfg.pretrained)
    return LinearProbe(feat_dim, NUM_CLASSES)


def uses_images(cfg: TrainConfig) -> bool:
    return cfg.method != "linear-probe"


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
    def __init__(self, cfg: TrainConfig, out: Path, progress: bool = True, log=print):
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
        smallest = self.feat_dim // NUM_CLASSES
        if cfg.method == "cafe" and cfg.separation and cfg.drop >= smallest:
            raise ConfigError(
                f"--drop {cfg.drop}: features of encoder {self.enc_info['key']!r} have {self.feat_dim} channels, "
                f"so each of the {NUM_CLASSES} class groups has {smallest}+ channels; drop at most {smallest - 1}"
            )
        self.online = None
        if cfg.online_encoder:
            if cfg.method == "baseline":
                raise ConfigError("--online-encoder needs features: use it with --method cafe or linear-probe")
            from maskfer.online import OnlineEncoder

            self.online = OnlineEncoder(self.enc_info, self.device)

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
        model = build_model(cfg, self.feat_dim).to(self.device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.gamma)
        start = self._prepare_dir(model, opt, sched)
        n = len(self.train_data)
        steps = (n + cfg.batch_size - 1) // cfg.batch_size
        for epoch in range(start, cfg.epochs):
            cpu_gen, dev_gen = _generators(cfg, epoch, self.device)
            order = epoch_order(self.train_data.labels, cfg.balanced, cpu_gen)
            model.train()
            # Running sums stay on the device: reading them every step would sync the GPU each step.
            sums = torch.zeros(len(LOSS_PARTS), dtype=torch.float64, device=self.device)
            correct = torch.zeros((), dtype=torch.long, device=self.device)
            seen, t0 = 0, time.perf_counter()
            with progress_bar(f"epoch {epoch + 1}/{cfg.epochs}", total=n, enabled=self.progress) as advance:
                for s in range(steps):
                    pos = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
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
                    sums += torch.stack([loss.detach()] + [parts.get(p, zero) for p in LOSS_PARTS[1:]]).double() * k
                    correct += (o["logits"].detach().argmax(1) == b.y).sum()
                    seen += k
                    if self.progress and ((s + 1) % PROGRESS_EVERY == 0 or s + 1 == steps):
                        advance(k, loss=float(sums[0]) / seen, acc=int(correct) / seen)
                    else:
                        advance(k)
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
            old = rundir.read_json(cfg_path)
            diff = []
            if old.get("config_hash") != stored["config_hash"]:
                old_id = TrainConfig.from_dict(old["config"]).identity()
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



def train(cfg: TrainConfig, out: str | Path, progress: bool = True, log=print, evaluate_tests: bool = True) -> dict:
    """Train (or resume) a run and, when ``cfg.test`` is set, evaluate it on those test sets."""
    trainer = Trainer(cfg, Path(out), progress, log)
    summary = trainer.run()
    if evaluate_tests and cfg.test:
        from maskfer.evaluate import evaluate_run

        summary["results"] = evaluate_run(Path(out), cfg.cache, cfg.test, trainer=trainer, log=log)
    return summary
