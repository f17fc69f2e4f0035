"""`maskfer train`: fit one run (resumably), then evaluate it on the test sets.

How a run is fitted is its method's declaration (maskfer.methods): epoch-trained methods go
through the one epoch loop (maskfer.engine, as a group of one); the linear probe is one
convex solve (maskfer.probe); CLIP zero-shot trains nothing (maskfer.zero_shot). Groups of
runs trained at once: maskfer.parallel.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from maskfer import rundir
from maskfer.batches import TrainingData, batch_bounds, epoch_order  # noqa: F401 - part of this module's API
from maskfer.config import TrainConfig
from maskfer.data import DataError, check_test_sets, holdout_split
from maskfer.engine import Engine
from maskfer.errors import TrainError
from maskfer.evaluate import evaluate_run, predict_logits
from maskfer.model import NUM_CLASSES, create_model
from maskfer.probe import fit_probe
from maskfer.stacking import default_layout
from maskfer.zero_shot import class_texts, load_prompts

__all__ = ["Trainer", "TrainError", "train", "batch_bounds", "epoch_order", "PROBE_HOLDOUT"]

PROBE_HOLDOUT = 0.1  # share of the training split the probe picks its L2 strength on, without a val split


def run_directory(cfg: TrainConfig, out: Path, data: TrainingData, group: dict | None = None, log=print) -> rundir.RunDir:
    bank, views = data.train_data.bank, data.train_data.views
    return rundir.RunDir(out, cfg, feat_dim=data.feat_dim, encoder=data.enc_info, group=group, log=log,
                         source_image_size=bank.size if bank is not None else None,
                         views=None if views is None else {"k": views.k, "seed": views.recipe.get("seed")})


class Trainer:
    """One run: its data (maskfer.batches.TrainingData) and its run directory; ``run()`` fits it."""

    def __init__(self, cfg: TrainConfig, out: Path, progress: bool = True, log=print, trust_plugins: bool = False):
        self.cfg, self.out, self.progress, self.log = cfg.validate(), Path(out), progress, log
        self.data = TrainingData(self.cfg, trust_plugins=trust_plugins)
        self.data.check_drop(self.cfg)
        self.device, self.enc_info, self.feat_dim = self.data.device, self.data.enc_info, self.data.feat_dim
        self.run_dir = run_directory(self.cfg, self.out, self.data, log=log)

    def run(self) -> dict:
        cfg, out = self.cfg, self.out
        if cfg.method_spec.fit == "lbfgs":
            return self._fit_probe()
        if cfg.method_spec.fit == "zero-shot":
            return self._fit_zero_shot()
        engine = Engine([cfg], [self.run_dir], self.data, default_layout(self.device), self.progress, self.log)
        engine.run()
        return {"epochs": cfg.epochs, "last": rundir.read_metrics(out)[-1]}

    def _fit_probe(self) -> dict:
        """The converged linear probe (maskfer.probe): one L-BFGS solve per L2 strength, no epochs.

        Its checkpoint counts as the run's last epoch, so resume, sweeps and evaluation treat a
        fitted probe as a finished run.
        """
        cfg, out, data = self.cfg, self.out, self.data
        if self.run_dir.prepare() >= 0:
            # resume() first: it restores metrics.jsonl from the checkpoint (a kill between the two writes)
            _, _, meta = self.run_dir.resume()
            if not any(r.get("solver") == "lbfgs" for r in meta.get("metrics") or rundir.read_metrics(out)):
                # method 'linear-probe' named the epoch-trained FC before the converged probe existed
                raise TrainError(f"run directory {out} holds an epoch-trained linear head (what --method linear-probe "
                                 "trained before it became the converged L-BFGS probe; now --method linear-head), "
                                 "not a fitted probe. Use a new --out, or delete that directory to fit the probe")
            self.log(f"resuming {out}: the probe is already fitted")
            return {"epochs": cfg.epochs, "last": rundir.read_metrics(out)[-1]}
        model = create_model(cfg, self.feat_dim, data.feat_stats).to(self.device)
        train, select, refit = data.train_data, data.val_data, None
        if select is None:  # no validation data given: choose the L2 strength on a holdout, refit on all
            train, select = holdout_split(data.train_data, PROBE_HOLDOUT)
            refit = data.train_data
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
        self.run_dir.save_epoch(row, model.state_dict(), None, {})
        self.log(f"linear probe: L2 {fit.lam:.3g} chosen on {select.name} (val acc {fit.val_acc:.4f}), "
                 f"train acc {fit.train_acc:.4f}, {fit.iterations} L-BFGS iterations"
                 + ("" if fit.converged else " (NOT converged)"))
        return {"epochs": cfg.epochs, "last": row}

    def _fit_zero_shot(self) -> dict:
        """CLIP zero-shot (maskfer.zero_shot): the class prompts' text embeddings become the classifier, nothing is
        trained. Like the probe's, its checkpoint counts as the run's last epoch; its metrics row says how it was
        made (solver "zero-shot", the prompts and their file's sha256, the logit scale) and its accuracy on the
        training (and validation) rows, which it never fitted."""
        cfg, out, data = self.cfg, self.out, self.data
        if self.run_dir.prepare() >= 0:
            _, _, meta = self.run_dir.resume()  # first: it restores metrics.jsonl from the checkpoint
            if not any(r.get("solver") == "zero-shot" for r in meta.get("metrics") or rundir.read_metrics(out)):
                raise TrainError(f"run directory {out} holds another method's checkpoint, not a zero-shot classifier; "
                                 "use a new --out")
            self.log(f"resuming {out}: the zero-shot classifier is already made")
            return {"epochs": cfg.epochs, "last": rundir.read_metrics(out)[-1]}
        t0 = time.perf_counter()
        prompts = load_prompts(cfg.prompts)
        texts = class_texts(data.enc_info, prompts, self.device)
        model = create_model(cfg, self.feat_dim).to(self.device)
        with torch.no_grad():
            model.fc.weight.copy_(texts.weight.to(self.device))
            model.fc.bias.zero_()

        def accuracy(split):
            return float((predict_logits(model, split, cfg.image_size, self.device).argmax(1) == split.labels)
                         .double().mean())

        row = {"epoch": cfg.epochs - 1, "solver": "zero-shot", "train_acc": accuracy(data.train_data),
               "logit_scale": texts.logit_scale, "text_tower": texts.source, "prompts_file": prompts.path,
               "prompts_sha256": prompts.sha256, "prompts": [list(p) for p in prompts.by_class],
               "seconds": time.perf_counter() - t0}
        if data.val_data is not None:  # as the epoch loop's rows: val_acc only where there is validation data
            row["val_acc"] = accuracy(data.val_data)
        self.run_dir.save_epoch(row, model.state_dict(), None, {})
        val = f", {data.val_data.name} {row['val_acc']:.4f}" if data.val_data is not None else ""
        self.log(f"zero-shot: {len(prompts.templates)} prompt template(s) per class from {prompts.path}, text tower of "
                 f"{texts.source}, logit scale {texts.logit_scale:.4g}; accuracy on {data.train_data.name} "
                 f"{row['train_acc']:.4f}{val} (nothing trained)")
        return {"epochs": cfg.epochs, "last": row}


def paper_differences(cfg: TrainConfig) -> list[str]:
    """Where this configuration cannot follow the paper's code by default (said once, loudly, by train/sweep)."""
    if cfg.method_spec.needs_images and not cfg.pretrained:
        return [f"WARNING: the {cfg.backbone} backbone starts from scratch. The paper's code starts from MS-Celeb-1M "
                "ResNet-18 weights, which cannot be distributed; its Table 5 shows about 4 points less for CAFE and "
                "20 for the baseline without them. Pass --pretrained FILE if you have them (docs/training.md)."]
    return []


def train(cfg: TrainConfig, out: str | Path, progress: bool = True, log=print, evaluate_tests: bool = True,
          trust_plugins: bool = False) -> dict:
    """Train (or resume) a run and, when ``cfg.test`` is set, evaluate it on those test sets.

    ``trust_plugins``: let --online-encoder import a plug-in encoder spec named in the store."""
    trainer = Trainer(cfg, Path(out), progress, log, trust_plugins=trust_plugins)
    if evaluate_tests and cfg.test:  # a wrong --test fails now, not after the training it would follow
        info = trainer.enc_info
        try:
            check_test_sets(cfg.cache, cfg.test, info["key"], info.get("fingerprint"), trainer.feat_dim,
                            cfg.reads_images, cfg.root, trained=f"this run (training set {cfg.train})")
        except DataError as e:
            raise TrainError(str(e)) from None
    summary = trainer.run()
    if evaluate_tests and cfg.test:
        summary["results"] = evaluate_run(Path(out), cfg.cache, cfg.test, device=trainer.device, log=log,
                                        trust_plugins=trust_plugins)
    for line in paper_differences(cfg):  # beside the results they qualify (a failed command stays one error line)
        log(line)
    return summary
