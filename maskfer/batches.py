"""What the training engine reads: the run's data, its batches, and each epoch's random draws.

Determinism: every epoch draws its sample order, augmentation and channel drops from generators
seeded by (seed, epoch), so a run resumed after epoch k continues exactly as the uninterrupted
run would, and models trained in one group share one data stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from featcache.devices import DeviceError, resolve_device
from featcache.views import draw_params
from maskfer.augment import augment_with, recipe_of
from maskfer.config import ConfigError, TrainConfig
from maskfer.data import DataError, SplitData, holdout_split, load_split, parse_holdout
from maskfer.errors import TrainError
from maskfer.evaluate import eval_inputs
from maskfer.methods import get_method, method_names
from maskfer.model import NUM_CLASSES, feature_stats
from maskfer.online import OnlineEncoder


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


def epoch_generators(seed: int, epoch: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(host generator for the sample order, device generator for augmentation and drops) of one epoch."""
    s = seed * 100_003 + epoch
    cpu = torch.Generator().manual_seed(s)
    dev = torch.Generator(device=device).manual_seed(s) if device.type != "cpu" else cpu
    return cpu, dev


def epoch_order(labels: torch.Tensor, balanced: bool, gen: torch.Generator) -> torch.Tensor:
    """A permutation, or a class-balanced sample of the same length (each class equally likely)."""
    n = len(labels)
    if not balanced:
        return torch.randperm(n, generator=gen)
    counts = torch.bincount(labels, minlength=NUM_CLASSES).float()
    weights = (1.0 / counts.clamp(min=1))[labels]
    return torch.multinomial(weights, n, replacement=True, generator=gen)


def check_online_encoder(cfg: TrainConfig) -> None:
    method = cfg.method_spec
    if cfg.online_encoder and not method.online_encoder_ok:
        why = "uses no features" if not method.needs_features else "fits the cached ones once"
        ok = " or ".join(m for m in method_names() if get_method(m).online_encoder_ok)
        raise ConfigError(f"--online-encoder recomputes features for an epoch loop: use it with --method {ok} "
                          f"({cfg.method} {why})")


def check_views(cfg: TrainConfig) -> None:
    """--views augmented feeds stored views to an epoch loop that reads features."""
    method = cfg.method_spec
    if cfg.views == "augmented" and not (method.epoch_trained and method.needs_features):
        ok = " or ".join(m for m in method_names() if get_method(m).online_encoder_ok)
        why = "uses no features" if not method.needs_features else "fits the clean cached features once"
        raise ConfigError(f"--views augmented trains on stored augmented views in an epoch loop: use it with "
                          f"--method {ok} ({cfg.method} {why})", field="views")


def check_recipe(cfg: TrainConfig, stored: dict, where: str) -> None:
    """The stored views were drawn with the store's recipe; the run's augmentation options must say the same,
    or the run would record options it does not train with."""
    mine = recipe_of(cfg).to_dict()
    theirs = {k: stored.get(k) for k in mine}
    diff = [k for k in mine if theirs[k] is None or not np.allclose(mine[k], theirs[k], rtol=0, atol=1e-9)]
    if diff:
        shown = ", ".join(f"{k} {theirs[k]} there, {mine[k]} asked" for k in diff)
        raise TrainError(f"--views augmented: the views of {where} were drawn with another augmentation ({shown}). "
                         "Train with the store's augmentation options (featcache info shows them), or rebuild the "
                         "views with this recipe into a new --cache")


def check_drop(cfg: TrainConfig, feat_dim: int, encoder_key: str, where: str = "") -> None:
    """--drop must leave at least one channel in the smallest class group of this encoder's features."""
    smallest = feat_dim // NUM_CLASSES
    if cfg.method_spec.loss == "cafe" and cfg.separation and cfg.drop >= smallest:
        raise ConfigError(
            f"--drop {cfg.drop}{where}: features of encoder {encoder_key!r} have {feat_dim} channels, "
            f"so each of the {NUM_CLASSES} class groups has {smallest}+ channels; drop at most {smallest - 1}")


@dataclass
class Batch:
    x: torch.Tensor | None     # normalised images (B, 3, S, S), or None for a features-only method
    feats: torch.Tensor        # (B, C): the view matching the image's flip (or recomputed online)
    y: torch.Tensor


class TrainingData:
    """The training (and validation) split of a configuration, on its device, and its batches.

    Everything here depends only on the data fields of ``cfg`` (maskfer.config), so the models of a
    parallel group share one TrainingData. ``trust_plugins`` (--trust-plugins) is deliberately not a
    config field: config.json files are shared.
    """

    def __init__(self, cfg: TrainConfig, trust_plugins: bool = False):
        self.cfg = cfg
        method = cfg.method_spec
        check_views(cfg)
        try:
            self.device = resolve_device(cfg.device)
        except DeviceError as e:
            raise TrainError(str(e)) from None
        try:
            # --online-encoder recomputes features from augmented images, so even a features-only method needs them.
            need_images = cfg.reads_images
            self.train_data, self.enc_info = load_split(
                cfg.cache, cfg.train, "train", cfg.encoder, need_images, cfg.image_size, cfg.root, cfg.workers,
                aug_views=cfg.views == "augmented")
            self.val_data = None
            holdout = parse_holdout(cfg.val_split)
            if holdout:
                self.train_data, self.val_data = holdout_split(self.train_data, holdout)
            elif cfg.val_split:
                name = cfg.train.partition(":")[0]
                self.val_data, _ = load_split(cfg.cache, f"{name}:{cfg.val_split}", cfg.val_split, self.enc_info["key"],
                                              need_images, cfg.image_size, cfg.root, cfg.workers)
        except DataError as e:
            raise TrainError(str(e)) from None
        self.feat_dim = int(self.enc_info["dim"])
        views, bank = self.train_data.views, self.train_data.bank
        if views is not None:
            check_recipe(cfg, views.recipe, f"{self.train_data.name} in {cfg.cache}")
        if views is not None and bank is not None and views.recipe.get("image_size") not in (None, bank.size):
            raise TrainError(f"--views augmented: the views of {self.train_data.name} in {cfg.cache} were rendered from "
                             f"the {views.recipe['image_size']} px cached images, but training reads {bank.size} px "
                             "ones: their noise fields would differ from the encoder's. Cache the images at "
                             f"{views.recipe['image_size']} px (featcache build --image-size) or rebuild the views")
        # --feature-norm statistics: the training rows only (a holdout is already excluded), both views
        self.feat_stats = feature_stats(self.train_data.feats) if cfg.feature_norm == "standardize" else None
        if method.needs_images and method.epoch_trained and len(self.train_data) < 2:
            raise TrainError(f"{self.train_data.name} has {len(self.train_data)} training image(s): the {cfg.backbone} "
                             "backbone's BatchNorm needs at least 2 per batch")
        self.online = None
        if cfg.online_encoder:
            check_online_encoder(cfg)
            self.online = OnlineEncoder(self.enc_info, self.device, trust_plugins=trust_plugins, source=(
                f"{cfg.cache} (attribute 'spec' of /datasets/{cfg.train.partition(':')[0]}/encoders/{self.enc_info['key']})"))

    @property
    def recipe(self):
        """The augmentation drawn per batch (--views clean), from the configuration as it is now."""
        return recipe_of(self.cfg)

    def check_drop(self, cfg: TrainConfig, where: str = "") -> None:
        check_drop(cfg, self.feat_dim, self.enc_info["key"], where)

    def batch(self, data: SplitData, pos: torch.Tensor, train: bool, gen: torch.Generator | None) -> Batch:
        """Rows ``pos`` of ``data``, augmented (train) or plain, with the features that match the image.

        Training: each image gets a parameter row (featcache.views) -- one of its stored augmented views chosen
        by ``gen`` (--views augmented: the view's features), or one drawn from ``gen`` (clean: the cached view
        matching the flip) -- applied to its cached image for the CNN, and with --online-encoder also to the
        encoder's input. Evaluation: the plain image and the original view (or, online, its encoding).
        """
        cfg, dev, n = self.cfg, self.device, len(pos)
        y = data.labels[pos].to(dev)
        if not train:
            return Batch(*eval_inputs(data, pos, cfg.image_size, dev, self.online), y)
        imgs = data.bank.get(data.rows[pos.numpy()]).to(dev, non_blocking=True) if data.bank is not None else None
        rows = torch.arange(n, device=dev)
        if data.views is not None:  # --views augmented
            v = torch.randint(data.views.k, (n,), generator=gen, device=dev)
            params = data.views.params[pos].to(dev)[rows, v]
            feats = data.views.feats[pos].to(dev)[rows, v]
            noise_std = float(data.views.recipe.get("noise_std", 0.0))
        else:
            params = draw_params(n, self.recipe, gen, device=dev)
            feats = data.feats[pos].to(dev)[rows, (params[:, 0] > 0.5).long()]
            noise_std = self.recipe.noise_std
        # images loaded for the online encoder only (a features-only method) do not reach the model
        x = augment_with(imgs, params, cfg.image_size, noise_std) if imgs is not None and cfg.method_spec.needs_images \
            else None
        if self.online is not None:
            feats = self.online.encode(imgs, params, noise_std)
        return Batch(x, feats, y)
