"""`maskfer`: train the sigmoid-mask model on cached features, evaluate across datasets, predict."""
from __future__ import annotations

import json
from pathlib import Path

import click

from cli.common import err_console, friendly_errors
from cli.options import (SWEEP_DEFAULTS, config_options, given_options, pick_renamed,  # stdlib + click
                         renamed_option)


def _errors():
    """The errors printed as one line: every error meant for a user, featcache's too, derives from FerError."""
    from maskfer import FerError

    return (FerError,)


def _run(fn):
    return friendly_errors(*_errors())(fn)()


def _log(msg: str) -> None:
    err_console.print(msg, highlight=False, markup=False)


_DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N."

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


_CONFIG_HELP = ("A TOML file of training options (keys: the flags without '--', e.g. lambda = 0.5, or the field "
                "names), a run's config.json or a run directory: it sets any option; flags given here override it.")


def _check_config_paths(cf, values: dict, given: dict) -> None:
    """A store named only by the --config file must exist (a flag's is checked by click)."""
    from maskfer.config import ConfigError

    if "cache" in cf.values and "cache" not in given and not Path(values["cache"]).is_file():
        raise ConfigError(f"{cf.path}: key {cf.keys['cache']!r}: no such file {values['cache']} (give --cache FILE)",
                          field="cache")


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (resumed when it exists).")
@click.option("--config", "config_file", default=None, metavar="FILE", type=click.Path(exists=True), help=_CONFIG_HELP)
@config_options("train")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--trust-plugins", is_flag=True, help=_TRUST_HELP.format(where="the store (--online-encoder)"))
@click.pass_context
def train(ctx, out, config_file, quiet, trust_plugins, **options):
    """Train a run (paper defaults) and evaluate it on --test.

    A killed or interrupted run resumes from its last checkpoint when the same command is run again.
    Every option can also come from --config FILE (a TOML file, or a run's config.json to rerun or
    vary a run); flags given on the command line override the file.

    \b
    Examples:
      maskfer train --cache features.h5 --train ferplus --test ferplus,muxspace --out runs/cafe
      maskfer train --cache features.h5 --train ferplus --out runs/base --method baseline
      maskfer train --cache features.h5 --train rafdb --out runs/r18 --pretrained msceleb_resnet18.pth
      maskfer train --cache features.h5 --train ferplus --out runs/small --image-size 112 --epochs 5
      maskfer train --config runs/cafe/config.json --out runs/cafe-s1 --seed 1
      maskfer train --config small.toml --out runs/small --no-sigmoid
    """
    def go():
        from maskfer.config import REQUIRED, TrainConfig, option_name, read_config_file
        from maskfer.evaluate import cross_table, table_markdown
        from maskfer.train import train as run_train

        cf = read_config_file(config_file) if config_file else None
        given = given_options(ctx, options)
        values = {**(cf.values if cf else {}), **given}
        missing = [option_name(n) for n in REQUIRED if not values.get(n)]
        if missing:
            raise click.UsageError(f"Missing option {', '.join(missing)} (give it here or in --config FILE)")
        cfg = TrainConfig(**values)
        if cf:  # a bad value from the file: name the file and its key
            from maskfer.config import ConfigError

            _check_config_paths(cf, values, given)
            try:
                cfg.validate()
            except ConfigError as e:
                raise cf.blame(e, fields=set(cf.values) - set(given)) from None
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
@click.option("--table", "table_out", default=None, metavar="PREFIX", type=click.Path(dir_okay=False),
              help="Also write the cross-dataset table to PREFIX.md, PREFIX_*.csv and PREFIX.json.")
@renamed_option("--out", type=click.Path(dir_okay=False))
@click.option("--device", default="auto", show_default=True, help=_DEVICE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print all results as JSON.")
@click.option("--trust-plugins", is_flag=True, help=_TRUST_HELP.format(where="the store (runs trained with "
                                                                        "--online-encoder encode the test images)"))
@click.pass_context
def evaluate(ctx, runs, cache, test, table_out, old_out, device, as_json, trust_plugins):
    """Accuracy, mean class accuracy, per-class accuracy and confusion per test set, and the table.

    \b
    Examples:
      maskfer eval --run runs/cafe --test ferplus,muxspace
      maskfer eval --run runs/cafe --run runs/baseline --test ferplus:test,muxspace --table results/table
    """
    table_out, note = pick_renamed(ctx, "table_out", table_out, old_out, "--out", "--table")

    def go():
        from maskfer.evaluate import cross_table, evaluate_run, table_markdown, write_tables

        tests = [t for t in test.split(",") if t]
        results = [evaluate_run(Path(r), cache, tests, device=device, log=_log if not as_json else (lambda m: None),
                                trust_plugins=trust_plugins) for r in runs]
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
    if note:
        _log(note)


_DETECTORS = ("blazeface", "blazeface-short", "none")  # maskfer.faces.DETECTORS (not imported: no torch at start)


@main.command()
@click.option("--run", default=None, type=click.Path(file_okay=False, exists=True),
              help="A run directory of `maskfer train` (its last checkpoint).")
@click.option("--model", "model", default=None, metavar="DIR_OR_HUB_ID",
              help="A packaged model instead of --run: a `maskfer export` folder or a Hugging Face hub id.")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--detect", default="blazeface", show_default=True, type=click.Choice(_DETECTORS),
              help="Face detector: blazeface (MediaPipe full range: faces up to ~5 m), blazeface-short (faces "
                   "filling the frame), none (every image is one pre-cropped face).")
@click.option("--every", default=1, show_default=True, type=click.IntRange(1),
              help="Videos: classify every N-th frame.")
@click.option("--backend", default="torch", show_default=True, type=click.Choice(["torch", "onnx"]),
              help="With --model: onnx runs the folder's model.onnx (maskfer export --format onnx) with onnxruntime.")
@click.option("--format", "fmt", default=None, type=click.Choice(["text", "csv", "json"]),
              help="Output format. Default: from the --output suffix, else text lines; csv/json without "
                   "--output print to stdout.")
@click.option("--output", "out_file", default=None, metavar="FILE.csv|FILE.json", type=click.Path(dir_okay=False),
              help="Write results to a .json or .csv file instead of printing them.")
@renamed_option("--out", type=click.Path(dir_okay=False))
@click.option("--annotate", "annotate_dir", default=None, metavar="DIR", type=click.Path(file_okay=False),
              help="Also write each image with its faces' boxes, keypoints and expressions to DIR.")
@click.option("--device", default="auto", show_default=True, help=_DEVICE_HELP)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Faces per batch.")
@click.option("--trust-plugins", is_flag=True, help=_TRUST_HELP.format(where="the run's config.json"))
@click.pass_context
def predict(ctx, run, model, inputs, detect, every, backend, fmt, out_file, old_out, annotate_dir, device,
            batch_size, trust_plugins):
    """Expressions of the faces in images, folders and videos: one row per face (per sampled frame).

    Faces are detected, aligned by the eyes and classified; an image without a face gives a "no face" row.

    \b
    Examples:
      maskfer predict --run runs/cafe group_photo.jpg --annotate annotated/
      maskfer predict --model models/cafe photos/ --output predictions.csv
      maskfer predict --run runs/cafe clip.mp4 --every 5 --format json > clip.json
      maskfer predict --run runs/cafe --detect none aligned_faces/
      maskfer predict --model models/cafe --backend onnx photo.jpg
    """
    out_file, note = pick_renamed(ctx, "out_file", out_file, old_out, "--out", "--output")
    if (run is None) == (model is None):
        raise click.UsageError("give one of --run RUN_DIR or --model DIR_OR_HUB_ID")

    def go():
        from maskfer.predict import predict as run_predict
        from maskfer.prediction_table import format_rows

        res = run_predict(run, list(inputs), device=device, batch_size=batch_size, trust_plugins=trust_plugins,
                          model=model, detect=detect, every=every, backend=backend)
        form = fmt or ("json" if out_file and out_file.endswith(".json") else "csv" if out_file else "text")
        text = format_rows(res, form)
        if out_file:
            Path(out_file).write_text(text)
            click.echo(f"wrote {len(res)} rows to {out_file}")
        else:
            click.echo(text, nl=False)
        if annotate_dir:
            from maskfer.annotate import write_annotated

            _log(f"wrote {len(write_annotated(res, annotate_dir))} annotated image(s) to {annotate_dir}")
        failed = sum("error" in r for r in res)
        if failed == len(res):  # nothing predicted is a failure, whatever was written
            from maskfer.evaluate import EvalError

            raise EvalError(f"none of the {len(res)} input(s) could be predicted (the errors are listed "
                            f"{'in ' + out_file if out_file else 'above'})")
        if failed:  # partial success: exit 0, the failures are listed with the predictions
            _log(f"note: {failed} of {len(res)} input(s) could not be predicted (listed as errors)")
        faceless = sum(r.get("face", 0) is None and "error" not in r for r in res)
        if faceless:
            _log(f"note: no face found in {faceless} image(s)/frame(s)"
                 + ("" if detect == "none" else "; for pre-cropped faces use --detect none"))

    _run(go)
    if note:
        _log(note)


@main.command(name="export")
@click.argument("run", type=click.Path(file_okay=False, exists=True))
@click.argument("out", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--format", "fmt", default="hf", show_default=True, type=click.Choice(["hf", "onnx"]),
              help="hf: config.json + model.safetensors + README.md model card (Predictor.from_pretrained); "
                   "onnx: also DIR/model.onnx, one graph from aligned face pixels to probabilities.")
@click.option("--push-to-hub", default=None, metavar="OWNER/NAME", help="Upload the folder to this hub repository.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repository private.")
@click.option("--trust-plugins", is_flag=True, help=_TRUST_HELP.format(where="the run's config.json"))
def export(run, out, fmt, push_to_hub, private, trust_plugins):
    """Package a run as a self-contained model folder (Hugging Face layout).

    \b
    Examples:
      maskfer export runs/cafe models/cafe-ferplus
      maskfer export runs/cafe models/cafe-ferplus --format onnx
      maskfer export runs/cafe models/cafe-ferplus --push-to-hub me/cafe-ferplus
      python -c "from maskfer import Predictor; print(Predictor.from_pretrained('models/cafe-ferplus').predict('a.jpg'))"
    """
    def go():
        from maskfer.export import export_model, push_folder

        folder = export_model(run, out, log=_log)
        if fmt == "onnx":
            from maskfer.onnx_export import export_onnx

            export_onnx(run, folder / "model.onnx", trust_plugins=trust_plugins)
            _log(f"wrote {folder / 'model.onnx'}")
        if push_to_hub:
            push_folder(folder, push_to_hub, private=private, log=_log)

    _run(go)


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Sweep directory (resumed when it exists).")
@click.option("--grid", "grids", multiple=True, metavar="AXIS=V1,V2,...",
              help="A grid axis: any training option, spelled like its flag without '--' (lambda, beta, drop, seed, "
                   "lr, epochs, backbone, sigmoid=true,false, ...). Repeat.")
@click.option("--sweep-file", default=None, type=click.Path(dir_okay=False, exists=True),
              help="A TOML file with [base] options and [grid] axes (lists); --grid and --set add to it.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="A fixed training option for every configuration, e.g. --set epochs=10 --set image-size=112 "
                   "(the same as --epochs 10 --image-size 112).")
@click.option("--config", "config_file", default=None, metavar="FILE", type=click.Path(exists=True),
              help="Base options from a TOML file of training options, a run's config.json or a run directory "
                   "(sweep around a run); the sweep file, --set and flags override it.")
@click.option("--parallel", default=1, show_default=True, type=click.IntRange(1),
              help="Train K configurations at once on one device, sharing each batch.")
@click.option("--dry-run", is_flag=True, help="Check the grid and list the configurations; train nothing.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--trust-plugins", is_flag=True, help=_TRUST_HELP.format(where="the store (online_encoder)"))
@config_options("sweep")
@click.pass_context
def sweep(ctx, out, grids, sweep_file, sets, config_file, parallel, dry_run, quiet, trust_plugins, **options):
    """Train a grid of configurations over one feature store (the encoder never runs).

    Everything is checked before training starts. Finished configurations are skipped, so a
    killed sweep continues where it stopped. The summary (summary.md/.csv/.json) gives every
    configuration x test set as mean +- std over seeds and marks the one selected on the
    validation split of the training dataset (never on the test sets).

    The training options are maskfer train's, with the same flags. Each is taken, highest
    first, from its flag, --set, the sweep file's [base], --config, else its default (a flag
    not given overrides nothing); a grid axis overrides all of them.

    \b
    Examples:
      maskfer sweep --cache features.h5 --train ferplus --test ferplus,muxspace --out sweeps/lb \\
          --grid lambda=0.5,1.5,5 --grid beta=1,5,10 --grid seed=0,1,2 --epochs 10
      maskfer sweep --sweep-file sweep.toml --out sweeps/from_file --parallel 8
      maskfer sweep --config runs/cafe/config.json --out sweeps/around_cafe --grid seed=0,1,2 --no-sigmoid
      torchrun --nproc-per-node 8 -m maskfer sweep --sweep-file sweep.toml --out sweeps/8gpu --parallel 4
    """
    def go():
        from maskfer.config import TrainConfig, read_config_file
        from maskfer.sweep import (SweepError, axis_label, coerce, field_name, load_sweep_file, parse_grid,
                                   plan_sweep, run_sweep)

        base = {}
        if config_file:  # null values of a run's config.json are defaults: they do not clear the sweep's own
            base.update({k: v for k, v in read_config_file(config_file).values.items() if v is not None})
        file_base, grid = load_sweep_file(sweep_file) if sweep_file else ({}, {})
        base.update(file_base)
        for pair in sets:
            k, eq, v = pair.partition("=")
            if not eq:
                raise SweepError(f"--set {pair!r}: expected KEY=VALUE")
            name = field_name(k, "--set option", axes_only=False)
            base[name] = coerce(name, v, f"--set {k}")
        extra = parse_grid(list(grids))
        clash = sorted(set(extra) & set(grid))
        if clash:
            raise SweepError(f"axis {', '.join(map(axis_label, clash))} given both in {sweep_file} and with --grid")
        grid.update(extra)
        base.update(given_options(ctx, options))
        for name, value in SWEEP_DEFAULTS.items():
            base.setdefault(name, value)
        for req in ("cache", "train"):
            if not base.get(req):
                raise SweepError(f"--{req} is required (or set it with --config, --set or in the sweep file's [base])")
        cfg = TrainConfig.from_dict(base)
        if dry_run:
            points = plan_sweep(cfg, grid, Path(out), write=False)
            for rid, _, _ in points:
                click.echo(rid)
            click.echo(f"{len(points)} configurations; nothing trained (--dry-run)")
            return
        run_sweep(cfg, grid, out, parallel=parallel, progress=not quiet, log=_log, trust_plugins=trust_plugins)
        from featcache.distributed import detect

        if detect().primary:  # under torchrun rank 0 prints the summary once
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
@click.option("--device", default="auto", show_default=True,
              help="Device for the t-SNE features: " + _DEVICE_HELP)
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
@click.option("--encoder", default="efficientnet-lite0", show_default=True, metavar="SPEC|tiny-random-clip",
              help="Frozen encoder: the real ImageNet EfficientNet-Lite0 (weights ship in the 'efficientnet' extra, "
                   "offline), any featcache build --model spec, or tiny-random-clip (a random stand-in for tests: "
                   "its numbers mean nothing).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the generated faces and of training.")
@click.option("--epochs", default=12, show_default=True, type=click.IntRange(1),
              help="Epochs of the baseline and CAFE.")
@click.option("--image-size", default=40, show_default=True, type=click.IntRange(8), help="The CNNs' input size.")
@click.option("--train-per-class", default=30, show_default=True, type=click.IntRange(2),
              help="Training images per class (seen domain).")
@click.option("--test-per-class", default=15, show_default=True, type=click.IntRange(1),
              help="Test images per class and domain.")
@click.option("--device", default="auto", show_default=True, help=_DEVICE_HELP)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(out, encoder, seed, epochs, image_size, train_per_class, test_per_class, device, quiet):
    """The whole pipeline on generated faces: featcache build -> maskfer train -> eval, in minutes, offline.

    Cartoon faces of the seven expressions in two renderings (domains): the same eye, brow and mouth
    geometry per class, drawn with other colours, outline and line width, shading, background, size
    and blur. A linear probe, the end-to-end baseline and CAFE are trained on the seen domain and
    tested on both; the table and one sentence reading it are printed. Then the CAFE run is exported
    (maskfer export) and loaded as a packaged model to find, align and classify the faces of a generated
    group photo (a real public-domain portrait pasted three times), written annotated. This is a DEMO on
    generated data, not a benchmark. A rerun of the same command reuses what is done; another --seed or
    size needs another --out. The defaults take a few minutes on 2 CPU cores.

    \b
    Examples:
      maskfer demo --out demo_out
      maskfer demo --out demo_seed1 --seed 1
      maskfer demo --out /tmp/d --encoder tiny-random-clip --epochs 1 --train-per-class 3 --test-per-class 2
    """
    def go():
        from maskfer.demo import demo_reading, demo_table, run_demo, write_demo_tables

        run = run_demo(Path(out), encoder=encoder, seed=seed, epochs=epochs, image_size=image_size,
                       per_class=(train_per_class, test_per_class), device=device, progress=not quiet, log=_log)
        click.echo(f"\nDEMO result on GENERATED cartoon faces (encoder {encoder}, seed {seed}; trained on the seen "
                   "domain; test accuracy %):")
        click.echo(demo_table(run))
        click.echo(demo_reading(run))
        paths = write_demo_tables(run)
        click.echo(f"tables written to {paths['markdown']}; runs in {run.out / 'runs'} "
                   f"({run.seconds['total']:.0f} s)")
        from maskfer.demo_photo import photo_step

        click.echo("")
        shot = photo_step(run.runs["cafe"], run.out, device=device, log=click.echo)
        if shot:
            click.echo(f"your own photos: maskfer predict --model {shot['model']} PHOTO.jpg --annotate annotated/")

    _run(go)


if __name__ == "__main__":
    main()
