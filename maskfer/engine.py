"""The one epoch loop: K >= 1 epoch-trained models as one stacked model over one data stream.

A lone run is the K = 1 case (a one-model StackedModel is the plain model: same modules, same
kernels, bit for bit). Each model's configuration may differ in the per-model fields
(maskfer.config.PER_MODEL_FIELDS); data, schedule and method are shared. Each model has its own
run directory (maskfer.rundir.RunDir), written after every epoch.

Resume: runs whose checkpoints are at the same epoch are restacked (weights, Adam, scheduler)
and continue. When they disagree (a kill between the K checkpoint writes, or a configuration
added to an old group) the lagging runs catch up first, trained together until they reach the
next run's epoch, drawing their channel drops at their slots of the full group's draw: a catch-up
sees the data, augmentation and drop patterns of the uninterrupted group.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from featcache.progress import progress_bar
from maskfer.batches import TrainingData, batch_bounds, epoch_generators, epoch_order
from maskfer.config import TrainConfig
from maskfer.errors import TrainError
from maskfer.evaluate import metrics as eval_metrics
from maskfer.evaluate import predict_logits
from maskfer.losses import LossSpec, stacked_cafe_loss, stacked_ce
from maskfer.model import create_model
from maskfer.rundir import RunDir
from maskfer.stacking import StackedModel

LOSS_PARTS = ("loss", "ce", "sep", "div")  # logged per epoch as train_<part>
PROGRESS_EVERY = 10  # steps between progress-bar loss/acc refreshes (each one is a device sync)


def track_nonfinite(first_bad: torch.Tensor, bad_value: torch.Tensor, row: torch.Tensor, step: int):
    """Device-side record of the first step at which each entry of ``row`` (the step's loss terms) was
    NaN/inf: ``first_bad`` (-1 = never) and the value then. Elementwise ops only, so no host sync; the
    loop reads it where it syncs anyway (progress refreshes, the end of the epoch)."""
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


def diverged(msg: str, out: Path, epoch: int) -> TrainError:
    kept = f"{out} keeps the checkpoint of epoch {epoch}" if epoch else f"no checkpoint was written to {out}"
    return TrainError(f"{msg}: training stopped, {kept} (the weights of a non-finite step are not saved). Look for "
                      "features of extreme magnitude (`featcache verify`), or lower --lr")


class Engine:
    """Trains ``cfgs`` (one per run directory in ``runs``) on ``data`` to ``cfgs[0].epochs``."""

    def __init__(self, cfgs: list[TrainConfig], runs: list[RunDir], data: TrainingData, layout: str,
                 progress: bool = True, log=print):
        self.cfgs, self.runs, self.data, self.layout = cfgs, runs, data, layout
        self.progress, self.log, self.k = progress, log, len(cfgs)
        self.grouped = runs[0].group is not None  # a parallel group: metrics and logs say so

    def run(self) -> None:
        total = self.cfgs[0].epochs
        done = [r.prepare() for r in self.runs]
        while min(done) < total - 1:
            m = min(done)
            active = [i for i, e in enumerate(done) if e == m]
            stop = min([e for e in done if e > m], default=total - 1)
            if len(active) < self.k:
                self.log(f"catching up {len(active)} of {self.k} runs from epoch {m + 1} to {stop + 1}")
            self._segment(active, m + 1, stop)
            for i in active:
                done[i] = stop

    def _build(self, active: list[int], start: int):
        """The stacked model, Adam and scheduler of the ``active`` runs, restored from their checkpoints when
        ``start`` > 0. Each model is initialised from its own seed, as a lone run would be."""
        cfg0, models, opt_sds, sched_sd = self.cfgs[0], [], [], None
        for i in active:
            torch.manual_seed(self.cfgs[i].seed)
            model = create_model(self.cfgs[i], self.data.feat_dim, self.data.feat_stats)
            if start > 0:
                sd, opt_sd, meta = self.runs[i].resume()
                model.load_state_dict(sd)
                opt_sds.append(opt_sd)
                sched_sd = sched_sd or meta["scheduler"]
                if start < cfg0.epochs:
                    self.log(f"resuming {self.runs[i].path} after epoch {meta['epoch'] + 1}/{cfg0.epochs}")
            models.append(model)
        stacked = StackedModel(models, self.layout).to(self.data.device)
        opt = torch.optim.Adam(stacked.parameters(), lr=cfg0.lr, weight_decay=cfg0.weight_decay)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg0.gamma)
        if start > 0:
            opt.load_state_dict(stacked.stack_optimizer_states(opt_sds))
            sched.load_state_dict(sched_sd)
        return stacked, opt, sched

    def _segment(self, active: list[int], start: int, stop: int) -> None:
        """Epochs ``start``..``stop`` of the ``active`` runs."""
        cfg0, dev, data = self.cfgs[0], self.data.device, self.data
        stacked, opt, sched = self._build(active, start)
        ka = len(active)
        spec = LossSpec.from_configs(self.cfgs, active)
        cafe = cfg0.method_spec.loss == "cafe"
        use_sep = torch.tensor(spec.use_sep, device=dev)
        use_div = torch.tensor(spec.use_div, device=dev)
        n = len(data.train_data)
        bounds = batch_bounds(n, cfg0.batch_size)
        steps = len(bounds)
        for epoch in range(start, stop + 1):
            cpu_gen, dev_gen = epoch_generators(cfg0.seed, epoch, dev)
            order = epoch_order(data.train_data.labels, cfg0.balanced, cpu_gen)
            stacked.train()
            # Running sums stay on the device: reading them every step would sync the GPU each step.
            sums = torch.zeros(len(LOSS_PARTS), ka, dtype=torch.float64, device=dev)
            correct = torch.zeros(ka, dtype=torch.long, device=dev)
            first_bad = torch.full((len(LOSS_PARTS), ka), -1, dtype=torch.long, device=dev)
            bad_value = torch.zeros(len(LOSS_PARTS), ka, device=dev)
            seen, t0 = 0, time.perf_counter()
            desc = f"epoch {epoch + 1}/{cfg0.epochs}" + (f" x{ka}" if ka > 1 else "")
            with progress_bar(desc, total=n, enabled=self.progress) as advance:
                for s, (lo, hi) in enumerate(bounds):
                    pos = order[lo:hi]
                    b = data.batch(data.train_data, pos, True, dev_gen)
                    o = stacked(b.x, b.feats)
                    if cafe:
                        loss, parts = stacked_cafe_loss(o, b.y, spec, generator=dev_gen, training=True)
                    else:
                        loss = stacked_ce(o["logits"], b.y)
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
            self._end_epoch(stacked, opt, sched, active, epoch, sums, correct, seen, time.perf_counter() - t0)

    def _end_epoch(self, stacked, opt, sched, active, epoch, sums, correct, seen, dt) -> None:
        ka, data = len(active), self.data
        sums_l, correct_l = sums.cpu().tolist(), correct.cpu().tolist()
        val_acc = None
        if data.val_data is not None:  # all K models in one batched pass
            logits = predict_logits(stacked, data.val_data, self.cfgs[0].image_size, data.device,
                                    encoder=data.online)  # (N, K, L)
            labels = data.val_data.labels.numpy()
            val_acc = [eval_metrics(labels, logits[:, j].argmax(1).numpy())["accuracy"] for j in range(ka)]
        opt_sd = opt.state_dict()
        for j, i in enumerate(active):
            run = self.runs[i]
            row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_acc": correct_l[j] / seen,
                   "images_per_s": seen / dt,
                   **{f"train_{key}": sums_l[r][j] / seen for r, key in enumerate(LOSS_PARTS)
                      if sums_l[r][j] or key == "loss"}}
            if self.grouped:  # images_per_s: this run's share of the stream; the group's throughput beside it
                row.update(group_model_images_per_s=ka * seen / dt, parallel_k=ka)
            if val_acc is not None:
                row["val_acc"] = val_acc[j]
            run.save_epoch(row, stacked.model_state_dict(j), stacked.optimizer_state(opt_sd, j), sched.state_dict())
            head = f"[{i + 1}/{self.k}] {run.path}: " if self.grouped else ""
            self.log(f"{head}epoch {epoch + 1}/{self.cfgs[i].epochs}: loss {row['train_loss']:.4f} "
                     f"acc {row['train_acc']:.4f}" + (f" val_acc {row['val_acc']:.4f}" if "val_acc" in row else "")
                     + (f" ({row['images_per_s']:.1f} img/s shared by {ka} models, "
                        f"{row['group_model_images_per_s']:.1f} model-img/s)" if self.grouped
                        else f" ({row['images_per_s']:.1f} img/s)"))

    def _check_finite(self, first_bad, bad_value, active: list[int], epoch: int, steps: int) -> None:
        """Stop when any model's loss went NaN/inf, before any checkpoint of this epoch is written (every run
        directory keeps its previous epoch); the error names the diverged runs."""
        fb, bv = first_bad.cpu(), bad_value.cpu()
        if not self.grouped:
            m = nonfinite_message(fb[:, 0], bv[:, 0], epoch, self.cfgs[0].epochs, steps)
            if m:
                raise diverged(m, self.runs[0].path, epoch)
            return
        msgs = []
        for j, i in enumerate(active):
            m = nonfinite_message(fb[:, j], bv[:, j], epoch, self.cfgs[i].epochs, steps)
            if m:
                msgs.append(f"run {i + 1}/{self.k} ({self.runs[i].path}): {m}")
        if msgs:
            where = ", ".join(str(self.runs[i].path) for i in active)
            raise diverged("; ".join(msgs) + f" (trained in one parallel group with {where})",
                           self.runs[active[0]].path if len(active) == 1 else Path("each run directory"), epoch)
