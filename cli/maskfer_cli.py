"""`maskfer`: train the sigmoid-mask model on cached features, evaluate across datasets, predict."""
from __future__ import annotations

import json
from pathlib import Path

import click

from cli.common import err_console, friendly_errors

_D = None


def _defaults():
    global _D
    if _D is None:
        from maskfer.config import TrainConfig

        _D = TrainConfig()
    return _D


def _errors():
    from featcache import StoreError
    from featcache.encoders import EncoderError
    from featcache.manifests import ManifestError
    from maskfer.backbones import BackboneLoadError
    from maskfer.config import ConfigError
    from maskfer.data import DataError
    from maskfer.evaluate import EvalError
    from maskfer.rundir import RunDirError
    from maskfer.train import TrainError

    return (StoreError, EncoderError, ManifestError, BackboneLoadError, ConfigError, DataError, EvalError,
            RunDirError, TrainError)


def _run(fn):
    return friendly_errors(*_errors())(fn)()


def _log(msg: str) -> None:
    err_console.print(msg, highlight=False, markup=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cafe-fer")
def main():
    """Train CAFE's sigmoid-mask model on cached frozen features; evaluate on unseen datasets.

    \b
    Examples:
      maskfer train --cache features.h5 --train ferplus --test ferplus,muxspace --out runs/cafe
      maskfer eval --run runs/cafe --run runs/baseline --test ferplus,muxspace
      maskfer predict --run runs/cafe photo.jpg faces/
    """


@main.command()
@click.option("--cache", required=True, type=click.Path(dir_okay=False, exists=True), help="Feature store (featcache build).")
@click.option("--train", "train_spec", required=True, metavar="DATASET[:SPLIT]", help="Training set; split defaults to train.")
@click.option("--test", default="", metavar="DS1,DS2,...",
              help="Test sets (DATASET[:SPLIT], split defaults to test; a dataset without splits uses all rows).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (resumed when it exists).")
@click.option("--method", default="cafe", show_default=True, type=click.Choice(["cafe", "baseline", "linear-probe"]),
              help="cafe: mask CNN on cached features; baseline: backbone+FC on images; linear-probe: FC on features.")
@click.option("--backbone", default="resnet18", show_default=True, help="resnet18, resnet50 or mobilenet_v2.")
@click.option("--pretrained", default=None, type=click.Path(dir_okay=False, exists=True),
              help="torchvision-format state dict (.pth/.safetensors) to initialise the backbone, e.g. MS-Celeb-1M ResNet-18.")
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
@click.option("--no-flip", is_flag=True, help="Disable horizontal flips.")
@click.option("--erasing", default=0.5, show_default=True, type=float, help="Random-erasing probability.")
@click.option("--noise-std", default=0.0, show_default=True, type=float, help="Gaussian pixel noise std (0 = off).")
@click.option("--balanced", is_flag=True, help="Class-balanced sampling.")
@click.option("--online-encoder", is_flag=True, help="Recompute features from every augmented batch (slow, for comparison).")
@click.option("--val-split", default=None, help="Split of the training dataset evaluated each epoch (model selection).")
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", default=0, show_default=True, type=int, help="Decode threads when images come from --root.")
@click.option("--root", default=None, type=click.Path(file_okay=False),
              help="Dataset root, when the store has no cached images (featcache build --image-size).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(cache, train_spec, test, out, method, backbone, pretrained, encoder, epochs, batch_size, image_size, lr,
          weight_decay, gamma, seed, lam, beta, drop, drop_mode, no_sigmoid, no_separation, no_diverse, mask_map,
          no_flip, erasing, noise_std, balanced, online_encoder, val_split, device, workers, root, quiet):
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
            mask_map=mask_map, flip=not no_flip, erasing=erasing, noise_std=noise_std, balanced=balanced,
            online_encoder=online_encoder, val_split=val_split, device=device, workers=workers, root=root)
        summary = run_train(cfg, out, progress=not quiet, log=_log)
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
@click.option("--batch-size", default=32, show_default=True, type=int)
def predict(run, inputs, out_file, device, batch_size):
    """Class probabilities for images or folders of images, with a trained run.

    \b
    Examples:
      maskfer predict --run runs/cafe face.jpg
      maskfer predict --run runs/cafe photos/ --out predictions.csv
    """
    def go():
        from featcache.taxonomy import CLASSES
        from maskfer.predict import predict as run_predict

        res = run_predict(run, list(inputs), device=device, batch_size=batch_size)
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
