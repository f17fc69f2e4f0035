"""`maskfer`: train the sigmoid-mask model on cached features, evaluate across datasets, predict."""
from __future__ import annotations

import json
from pathlib import Path

import click

from cli.common import err_console, friendly_errors
from maskfer.config import FEATURE_NORMS, METHODS  # stdlib-only module: cheap at CLI start


def _errors():
    from featcache import StoreError
    from featcache.devices import DeviceError
    from featcache.encoders import EncoderError
    from featcache.manifests import ManifestError
    from maskfer.backbones import BackboneLoadError
    from maskfer.config import ConfigError
    from maskfer.data import DataError
    from maskfer.evaluate import EvalError
    from maskfer.report import ReportError
    from maskfer.sweep import SweepError
    from maskfer.rundir import RunDirError
    from maskfer.train import TrainError

    return (StoreError, EncoderError, ManifestError, BackboneLoadError, ConfigError, DataError, EvalError,
            RunDirError, TrainError, ReportError, SweepError, DeviceError)


def _run(fn):
    return friendly_errors(*_errors())(fn)()


def _log(msg: str) -> None:
    err_console.print(msg, highlight=False, markup=False)


# Stores and run directories are shared: an encoder spec read from one is data unless the user says otherwise.
_TRUST_HELP = ("Allow importing a plug-in encoder ('module:factory' or entry point) named in {where}. "
               "Off by default: stores and runs may come from anyone, and that would run their code.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cafe-fer")
def main():
    """Train CAFE's sigmoid-mask model on cached frozen features; evaluate on unseen datasets.

    \b
    Examples:
      maskfer train --cache features.h5 --train ferplus --test ferplus,muxspace --out runs/cafe
      maskfer eval --run runs/cafe --run runs/baseline --test ferplus,muxspace
      maskfer predict --run runs/cafe photo.jpg faces/
      maskfer sweep --cache features.h5 --train ferplus --out sweeps/lb --grid lambda=0.5,1.5,5 --grid seed=0,1,2
      maskfer report runs/cafe --baseline runs/baseline
      maskfer demo
    """


@main.command()
@click.option("--cache", required=True, type=click.Path(dir_okay=False, exists=True), help="Feature store (featcache build).")
@click.option("--train", "train_spec", required=True, metavar="DATASET[:SPLIT]", help="Training set; split defaults to train.")
@click.option("--test", default="", metavar="DS1,DS2,...",
              help="Test sets (DATASET[:SPLIT], split defaults to test; a dataset without splits uses all rows).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (resumed when it exists).")
@click.option("--method", default="cafe", show_default=True, type=click.Choice(list(METHODS)),
              help="cafe: mask CNN on cached features; baseline: backbone+FC on images; linear-probe: logistic "
                   "regression on standardized features fit to convergence (L-BFGS, L2 chosen on the validation split or a "
                   "10% holdout; ignores the optimizer options); linear-head: FC on features trained by the epoch "
                   "loop with the run's optimizer and schedule (CAFE's classifier without the mask).")
@click.option("--backbone", default="resnet18", show_default=True, help="resnet18, resnet50 or mobilenet_v2.")
@click.option("--pretrained", default=None, metavar="FILE|imagenet|URL|hf://OWNER/REPO/FILE",
              help="Backbone initialisation: a torchvision-format state dict (.pth/.safetensors, e.g. the MS-Celeb-1M "
                   "ResNet-18 FER papers use), or, online, torchvision's ImageNet weights, a URL or a hub file.")
@click.option("--encoder", default=None, metavar="KEY", help="Encoder key in the store [default: the only one].")
@click.option("--epochs", default=60, show_default=True, type=int)
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--image-size", default=224, show_default=True, type=int, help="Input size of the mask CNN.")
@click.option("--lr", default=2e-4, show_default=True, type=float, help="Adam learning rate.")
@click.option("--weight-decay", default=1e-4, show_default=True, type=float)
@click.option("--gamma", default=0.9, show_default=True, type=float, help="ExponentialLR factor per epoch.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--lambda", "lam", default=1.5, show_default=True, type=float, help="Weight of the separation loss.")
@click.option("--beta", default=5.0, show_default=True, type=float, help="Weight of the diverse loss.")
@click.option("--drop", default=10, show_default=True, type=int, help="Channels dropped per class group.")
@click.option("--drop-mode", default="sample", show_default=True, type=click.Choice(["sample", "batch"]))
@click.option("--no-sigmoid", is_flag=True, help="Ablation: mask without sigmoid.")
@click.option("--no-separation", is_flag=True, help="Ablation: no channel-separation loss.")
@click.option("--no-diverse", is_flag=True, help="Ablation: no diverse loss.")
@click.option("--mask-map", default="auto", show_default=True, type=click.Choice(["auto", "linear"]),
              help="Backbone width D -> feature dim C: auto (identity, mean over windows, or linear when D<C) or linear.")
@click.option("--feature-norm", default="none", show_default=True, type=click.Choice(list(FEATURE_NORMS)),
              help="standardize: cached features per channel with the training split's mean/std (kept in the run) "
                   "before the mask or linear head; none: raw features, as the paper.")
@click.option("--no-flip", is_flag=True, help="Disable horizontal flips.")
@click.option("--erasing", default=0.5, show_default=True, type=float, help="Random-erasing probability.")
@click.option("--noise-std", default=0.0, show_default=True, type=float, help="Gaussian pixel noise std (0 = off).")
@click.option("--balanced", is_flag=True, help="Class-balanced sampling.")
@click.option("--online-encoder", is_flag=True, help="Recompute features from every augmented batch (slow, for comparison).")
@click.option("--val-split", default=None, help="Validation split of the training dataset evaluated each epoch (model selection), or holdout:FRACTION to hold out a stratified part of its train split.")
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", default=0, show_default=True, type=int, help="Decode threads when images come from --root.")
@click.option("--root", default=None, type=click.Path(file_okay=False),
              help="Dataset root, when the store has no cached images (featcache build --image-size).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--trust-plugins", is_flag=True, help=_TRUST_HELP.format(where="the store (--online-encoder)"))
def train(cache, train_spec, test, out, method, backbone, pretrained, encoder, epochs, batch_size, image_size, lr,
          weight_decay, gamma, seed, lam, beta, drop, drop_mode, no_sigmoid, no_separation, no_diverse, mask_map,
          feature_norm, no_flip, erasing, noise_std, balanced, online_encoder, val_split, device, workers, root, quiet,
          trust_plugins):
    """Train a run (paper defaults) and evaluate it on --test.

    A killed or interrupted run resumes from its last checkpoint when the same command is run again.

    \b
    Examples:
      maskfer train --cache features.h5 --train ferplus --test ferplus,muxspace --out runs/cafe
      maskfer train --cache features.h5 --train ferplus --out runs/base --method baseline
      maskfer train --cache features.h5 --train rafdb --out runs/r18 --pretrained msceleb_resnet18.pth
      maskfer train --cache features.h5 --train ferplus --out runs/small --image-size 112 --epochs 5
    """
    def go():
        from maskfer.config import TrainConfig
        from maskfer.evaluate import table_markdown, cross_table
        from maskfer.train import train as run_train

        cfg = TrainConfig(
            cache=cache, train=train_spec, test=[t for t in test.split(",") if t], method=method, backbone=backbone,
            pretrained=pretrained, encoder=encoder, epochs=epochs, batch_size=batch_size, image_size=image_size,
            lr=lr, weight_decay=weight_decay, gamma=gamma, seed=seed, lam=lam, beta=beta, drop=drop,
            drop_mode=drop_mode, sigmoid=not no_sigmoid, separation=not no_separation, diverse=not no_diverse,
            mask_map=mask_map, feature_norm=feature_norm, flip=not no_flip, erasing=erasing, noise_std=noise_std, balanced=balanced,
            online_encoder=online_encoder, val_split=val_split, device=device, workers=workers, root=root)
        summary = run_train(cfg, out, progress=not quiet, log=_log, trust_plugins=trust_plugins)
        if "results" in summary:
            header, rows = cross_table([summary["results"]])
            click.echo(table_markdown(header, rows))

    _run(go)


@main.command(name="eval")
@click.option("--run", "runs", required=True, multiple=True, type=click.Path(file_okay=False, exists=True),
              help="Run directory; repeat for several runs (one table row each).")
@click.option("--cache", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Feature store [default: the one the run trained on].")
@click.option("--test", required=True, metavar="DS1,DS2,...", help="Test sets, DATASET[:SPLIT].")
@click.option("--out", "table_out", default=None, type=click.Path(dir_okay=False),
              help="Write the cross-dataset table to OUT.md, OUT_*.csv and OUT.json.")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print all results as JSON.")
def evaluate(runs, cache, test, table_out, device, as_json):
    """Accuracy, mean class accuracy, per-class accuracy and confusion per test set, and the table.

    \b
    Examples:
      maskfer eval --run runs/cafe --test ferplus,muxspace
      maskfer eval --run runs/cafe --run runs/baseline --test ferplus:test,muxspace --out results/table
    """
    def go():
        from maskfer.evaluate import cross_table, evaluate_run, table_markdown, write_tables

        tests = [t for t in test.split(",") if t]
        results = [evaluate_run(Path(r), cache, tests, device=device, log=_log if not as_json else (lambda m: None))
                   for r in runs]
        if as_json:
            click.echo(json.dumps(results, indent=2))
        else:
            for metric in ("accuracy", "mean_class_accuracy"):
                header, rows = cross_table(results, metric)
                click.echo(f"{metric.replace('_', ' ')} (%):\n" + table_markdown(header, rows))
        if table_out:  # also with --json; the notes then go to stderr so stdout stays pure JSON
            for kind, p in write_tables(results, Path(table_out)).items():
                click.echo(f"wrote {p}", err=as_json)

    _run(go)


@main.command()
@click.option("--run", required=True, type=click.Path(file_okay=False, exists=True))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "out_file", default=None, type=click.Path(dir_okay=False),
              help="Write results to a .json or .csv file instead of printing them.")
@click.option("--device", default="auto", show_default=True)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--trust-plugins", is_flag=True, help=_TRUST_HELP.format(where="the run's config.json"))
def predict(run, inputs, out_file, device, batch_size, trust_plugins):
    """Class probabilities for images or folders of images, with a trained run.

    \b
    Examples:
      maskfer predict --run runs/cafe face.jpg
      maskfer predict --run runs/cafe photos/ --out predictions.csv
    """
    def go():
        from featcache.taxonomy import CLASSES
        from maskfer.predict import predict as run_predict

        res = run_predict(run, list(inputs), device=device, batch_size=batch_size, trust_plugins=trust_plugins)
        if out_file and out_file.endswith(".json"):
            Path(out_file).write_text(json.dumps(res, indent=2))
        elif out_file:
            import csv

            with open(out_file, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["path", "prediction", *CLASSES, "error"])
                for r in res:
                    probs = r.get("probabilities", {})
                    w.writerow([r["path"], r.get("prediction", ""), *[f"{probs[c]:.6f}" if probs else "" for c in CLASSES],
                                r.get("error", "")])
        else:
            for r in res:
                if "error" in r:
                    click.echo(f"{r['path']}: ERROR {r['error']}")
                else:
                    top = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])[:3]
                    click.echo(f"{r['path']}: {r['prediction']}  (" + ", ".join(f"{c} {p:.3f}" for c, p in top) + ")")
        if out_file:
            click.echo(f"wrote {len(res)} predictions to {out_file}")
        failed = sum("error" in r for r in res)
        if failed == len(res):  # nothing predicted is a failure, whatever was written
            from maskfer.evaluate import EvalError

            raise EvalError(f"none of the {len(res)} image(s) could be predicted (the errors are listed "
                            f"{'in ' + out_file if out_file else 'above'})")
        if failed:  # partial success: exit 0, the failures are listed with the predictions
            _log(f"note: {failed} of {len(res)} image(s) could not be predicted (listed as errors)")

    _run(go)


@main.command()
@click.option("--cache", default=None, type=click.Path(dir_okay=False, exists=True), help="Feature store.")
@click.option("--train", "train_spec", default=None, metavar="DATASET[:SPLIT]", help="Training set.")
@click.option("--test", default=None, metavar="DS1,DS2,...", help="Test sets evaluated for every configuration.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Sweep directory (resumed when it exists).")
@click.option("--grid", "grids", multiple=True, metavar="AXIS=V1,V2,...",
              help="A grid axis: any training option (lambda, beta, drop, seed, lr, epochs, backbone, ...). Repeat.")
@click.option("--sweep-file", default=None, type=click.Path(dir_okay=False, exists=True),
              help="A TOML file with [base] options and [grid] axes (lists); --grid and --set add to it.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="A fixed training option for every configuration, e.g. --set epochs=10 --set image-size=112.")
@click.option("--val-split", default=None, help="Validation split of the training dataset used for model selection "
                                                "[default: val].")
@click.option("--parallel", default=1, show_default=True, type=click.IntRange(1),
              help="Train K configurations at once on one device, sharing each batch.")
@click.option("--device", default=None, help="Training device [default: auto].")
@click.option("--dry-run", is_flag=True, help="Check the grid and list the configurations; train nothing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--trust-plugins", is_flag=True, help=_TRUST_HELP.format(where="the store (online_encoder)"))
def sweep(cache, train_spec, test, out, grids, sweep_file, sets, val_split, parallel, device, dry_run, quiet,
          trust_plugins):
    """Train a grid of configurations over one feature store (the encoder never runs).

    Everything is checked before training starts. Finished configurations are skipped, so a
    killed sweep continues where it stopped. The summary (summary.md/.csv/.json) gives every
    configuration x test set as mean +- std over seeds and marks the one selected on the
    validation split of the training dataset (never on the test sets).

    \b
    Examples:
      maskfer sweep --cache features.h5 --train ferplus --test ferplus,muxspace --out sweeps/lb \\
          --grid lambda=0.5,1.5,5 --grid beta=1,5,10 --grid seed=0,1,2 --set epochs=10
      maskfer sweep --sweep-file sweep.toml --out sweeps/from_file --parallel 8
    """
    def go():
        from maskfer.config import TrainConfig
        from maskfer.sweep import (SweepError, axis_label, coerce, field_name, load_sweep_file, parse_grid,
                                   plan_sweep, run_sweep)

        base, grid = load_sweep_file(sweep_file) if sweep_file else ({}, {})
        for pair in sets:
            k, eq, v = pair.partition("=")
            if not eq:
                raise SweepError(f"--set {pair!r}: expected KEY=VALUE")
            name = field_name(k, "--set option") if k.strip() not in ("cache", "train") else k.strip()
            base[name] = coerce(name, v, f"--set {k}")
        extra = parse_grid(list(grids))
        clash = sorted(set(extra) & set(grid))
        if clash:
            raise SweepError(f"axis {', '.join(map(axis_label, clash))} given both in {sweep_file} and with --grid")
        grid.update(extra)
        for key, val in (("cache", cache), ("train", train_spec), ("device", device), ("val_split", val_split)):
            if val is not None:
                base[key] = val
        if test is not None:
            base["test"] = [t for t in test.split(",") if t]
        base.setdefault("val_split", "val")
        for req in ("cache", "train"):
            if not base.get(req):
                raise SweepError(f"--{req} is required (or set it in the sweep file's [base])")
        cfg = TrainConfig.from_dict(base)
        if dry_run:
            points = plan_sweep(cfg, grid, Path(out), write=False)
            for rid, _, _ in points:
                click.echo(rid)
            click.echo(f"{len(points)} configurations; nothing trained (--dry-run)")
            return
        run_sweep(cfg, grid, out, parallel=parallel, progress=not quiet, log=_log, trust_plugins=trust_plugins)
        click.echo((Path(out) / "summary.md").read_text())

    _run(go)


@main.command()
@click.argument("path", metavar="RUN_OR_SWEEP_DIR", type=click.Path(file_okay=False, exists=True))
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Output folder for index.html and the figures [default: RUN_OR_SWEEP_DIR/report].")
@click.option("--baseline", default=None, metavar="RUN", type=click.Path(file_okay=False, exists=True),
              help="A --method baseline run: its backbone features are the t-SNE's second panel "
                   "[default: the raw cached features F].")
@click.option("--test", default=None, metavar="DS[:SPLIT]",
              help="Test set of the t-SNE [default: the first test set outside the training dataset].")
@click.option("--max-points", default=2000, show_default=True, type=int, help="t-SNE subsample (fixed seed).")
@click.option("--cache", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Feature store for the t-SNE [default: the run's own].")
@click.option("--no-tsne", is_flag=True, help="Skip the t-SNE (faster; scikit-learn not needed).")
@click.option("--device", default="cpu", show_default=True, help="Device for the t-SNE features.")
def report(path, out, baseline, test, max_points, cache, no_tsne, device):
    """Figures and one HTML page (index.html) for a run or a sweep directory.

    \b
    A run: config, training curves, confusion matrix and per-class accuracy per test set,
    t-SNE of the masked features vs a baseline's (or the raw features) on an unseen test set.
    A sweep: lambda x beta heat-maps (validation and test accuracy), the summary table, and
    the selected run's report. Needs the extra: pip install 'cafe-fer[report]'.

    \b
    Examples:
      maskfer report runs/cafe --baseline runs/baseline
      maskfer report sweeps/lam_beta --out reports/lam_beta
    """
    def go():
        from maskfer.report import write_report

        index = write_report(path, out=out, baseline=baseline, test=test, max_points=max_points, device=device,
                             cache=cache, tsne=not no_tsne, log=_log)
        click.echo(f"wrote {index}")

    _run(go)


@main.command()
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False))
@click.option("--model", default="openai/clip-vit-base-patch32", show_default=True,
              help="Encoder; when it cannot be loaded (offline) a tiny random CLIP is used and the output says so.")
@click.option("--epochs", default=5, show_default=True, type=int)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out, model, epochs, quiet):
    """Run the whole pipeline on a generated demo dataset: build -> train -> cross-domain eval.

    Two generated domains of cartoon faces (demo-a, demo-b); trains on demo-a, tests on both.
    Works offline. This is a DEMO, not a benchmark.

    \b
    Example:
      maskfer demo --out demo_out
    """
    def go():
        from maskfer.demo import run_demo
        from maskfer.evaluate import cross_table, table_markdown, write_tables

        results = run_demo(Path(out), model=model, epochs=epochs, progress=not quiet, log=_log)
        header, rows = cross_table(results)
        click.echo("\nDEMO result (generated data; accuracy %, train demo-a, test demo-a and unseen demo-b):")
        click.echo(table_markdown(header, rows))
        paths = write_tables(results, Path(out) / "table")
        click.echo(f"tables written to {paths['markdown']}")

    _run(go)


if __name__ == "__main__":
    main()
