"""Train K configurations at once on one device, sharing every decoded and augmented batch.

``maskfer sweep --parallel K`` groups configurations that differ only in :data:`PARALLEL_FIELDS`
and calls :func:`train_parallel` once per group. Many small models fill a GPU far better
than one; the data pipeline (store read, decode, augmentation, host->device copy) runs once
per batch instead of K times.

The K models train in the one epoch loop (maskfer.engine) as one stacked module
(maskfer.stacking: its docstring says how and why); a lone run is the same loop with K = 1.
The loss settings that may differ per model are vectorised over K in maskfer.losses.

Shared data (what "sharing each batch" means)
--------------------------------------------
A group runs ONE data stream: each epoch's sample order, augmentation and channel-drop scores
come from generators seeded by ``(cfgs[0].seed, epoch)`` exactly as a lone run seeds them
(the *data seed* of the group, recorded in every run's config.json under
``"parallel_group"``). ``seed`` per model only sets its initialisation (``torch.manual_seed``
then ``create_model``, exactly as a lone run). Hence K = 1 equals the sequential run, and with
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

Resume: each run directory is a normal one (maskfer.rundir.RunDir), so ``maskfer eval/predict``
read it and a plain ``maskfer train`` can resume it alone; see maskfer.engine for how a group
restacks and how lagging runs catch up.
"""
from __future__ import annotations

import json
from pathlib import Path

from maskfer import rundir
from maskfer.batches import TrainingData
from maskfer.config import PER_MODEL_FIELDS, ConfigError, TrainConfig
from maskfer.engine import Engine
from maskfer.methods import get_method, method_names
from maskfer.stacking import LAYOUTS, default_layout, unsupported_for_grouping
from maskfer.backbones import create_backbone
from maskfer.train import run_directory

PARALLEL_FIELDS = PER_MODEL_FIELDS  # may differ inside one parallel group (declared in maskfer.config)


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
    if not cfgs[0].method_spec.epoch_trained:
        epoch_trained = ", ".join(m for m in method_names() if get_method(m).epoch_trained)
        raise ConfigError(f"--parallel stacks epoch-trained methods ({epoch_trained}), not {cfgs[0].method!r}: "
                          "the linear probe is one L-BFGS solve per run (maskfer.probe); train it with --parallel 1")


def _layout(cfgs: list[TrainConfig], device, layout: str, log) -> str:
    chosen = default_layout(device) if layout == "auto" else layout
    if cfgs[0].method_spec.architecture == "linear" or chosen != "grouped":
        return chosen
    reason = unsupported_for_grouping(create_backbone(cfgs[0].backbone))
    if reason and layout == "auto":
        log(f"note: backbone {cfgs[0].backbone!r} cannot be fused ({reason}); its K copies run in a loop")
        return "loop"
    if reason:
        raise ConfigError(f"layout 'grouped' cannot fuse backbone {cfgs[0].backbone!r}: {reason}; "
                          "use layout 'loop' or 'auto'")
    return chosen


def train_parallel(cfgs: list[TrainConfig], outs: list[Path], progress: bool = True, log=print,
                   layout: str = "auto", trust_plugins: bool = False) -> list[dict]:
    """Train (or resume) K configurations as one fused model on one device; one run directory each.

    Preconditions: the configurations differ only in :data:`PARALLEL_FIELDS` (else ConfigError,
    a ValueError); one distinct ``out`` per configuration. The data stream is the one
    a lone run of ``cfgs[0]`` would get (see the module docstring). Returns, per configuration,
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
    data = TrainingData(cfgs[0], trust_plugins=trust_plugins)  # the data fields are shared by the whole group
    for i, cfg in enumerate(cfgs):
        data.check_drop(cfg, where=f" (configuration {i}, {outs[i]})")
    layout = _layout(cfgs, data.device, layout, log)
    notes = [{"index": i, "k": len(cfgs), "runs": [str(o) for o in outs], "data_seed": cfgs[0].seed,
              "per_model_fields": list(PARALLEL_FIELDS), "layout": layout} for i in range(len(cfgs))]
    runs = [run_directory(c, o, data, group=n, log=log) for c, o, n in zip(cfgs, outs, notes)]
    Engine(cfgs, runs, data, layout, progress, log).run()
    return [{"epochs": cfg.epochs, "last": (rundir.read_metrics(out) or [{}])[-1], "parallel_group": note}
            for cfg, out, note in zip(cfgs, outs, notes)]

