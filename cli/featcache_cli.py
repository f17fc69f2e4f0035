"""`featcache`: build, inspect and verify feature stores (argument parsing only)."""
from __future__ import annotations

import json

import click
from rich.table import Table

from cli.common import err_console, friendly_errors, wide_console
from cli.options import pick_renamed, renamed_option

_DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N."


def _errors():
    """The errors printed as one line: every error meant for a user derives from FerError."""
    from featcache.errors import FerError  # loads no torch/h5py (featcache/__init__ is lazy)

    return (FerError,)


def _run(fn, *a, **kw):
    return friendly_errors(*_errors())(fn)(*a, **kw)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cafe-fer")
def main():
    """Run a frozen image encoder once over a FER dataset and cache its features in HDF5.

    \b
    Examples:
      featcache build --dataset ferplus --root data/ferplus --cache features.h5
      featcache build --dataset muxspace --root data/muxspace --cache features.h5 --on-error skip
      featcache info features.h5
      featcache verify features.h5
    """


@main.command()
@click.option("--dataset", required=True, metavar="NAME_OR_MANIFEST",
              help="Built-in manifest name (see `featcache manifests`) or a path to your own manifest .toml.")
@click.option("--root", required=True, type=click.Path(file_okay=False), help="The dataset's top folder, as it ships.")
@click.option("--cache", "out", default="features.h5", show_default=True, metavar="FILE", type=click.Path(dir_okay=False),
              help="The feature store: created, or completed when it exists (maskfer's --cache).")
@renamed_option("--out", type=click.Path(dir_okay=False))
@click.option("--model", default="openai/clip-vit-base-patch32", show_default=True,
              help="Hub id or local dir of a transformers CLIP checkpoint, a registered encoder name "
                   "(efficientnet-lite0) or a plug-in 'module:factory'.")
@click.option("--name", default=None, help="Store the dataset under this name (default: the manifest's name).")
@click.option("--encoder-key", default=None, help="Store key of these features (default: from the model name).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--device", default="auto", show_default=True, help=_DEVICE_HELP)
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "fp16", "bf16"]),
              help="Encoder compute precision; auto = fp16 on GPU, fp32 on CPU. Stored features are float32.")
@click.option("--workers", default=None, type=click.IntRange(0),
              help="Parallel image decoders (processes, decode + preprocess); 0: decode in the main process "
                   "[default: cores-1, at most 8].")
@click.option("--image-size", default=None, type=click.IntRange(8),
              help="Also store each image resized to SxS uint8, so training needs neither the root nor JPEG decoding.")
@click.option("--preprocess", default="clip", show_default=True, type=click.Choice(["clip", "official"]),
              help="Encoder input: clip = the encoder's own processor (resize shortest side, centre crop, CLIP "
                   "mean/std); official = what the official CAFE code feeds CLIP: the image squashed to 224x224 "
                   "(the model's input size), ImageNet mean/std. Part of the encoder fingerprint: the two never mix "
                   "under one --encoder-key.")
@click.option("--aug-views", default=0, show_default=True, type=click.IntRange(0), metavar="K",
              help="Also store K augmented views per image (CAFE's training augmentation: flip, random erasing, "
                   "Gaussian noise; featcache/views.py), encoded from the cached images (--image-size S, or the "
                   "size the store caches) with the parameter rows stored beside them. Rerun with a larger K to add "
                   "views; stored ones are kept.")
@click.option("--aug-seed", default=0, show_default=True, type=click.IntRange(0),
              help="Seed of the augmented views: a view is a pure function of (seed, image id, view index). Must "
                   "match the views already stored.")
@click.option("--on-error", default="fail", show_default=True, type=click.Choice(["fail", "skip"]),
              help="Bad images and label rows: stop with a message, or record them in the store and go on.")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Override a manifest parameter, e.g. --param vote_rule=plurality (FERPlus).")
@click.option("--max-pixels", default=50_000_000, show_default=True, type=click.IntRange(0),
              help="Do not decode images of more than this many pixels (width x height): such an image fails like "
                   "a broken one (skipped with --on-error skip). 0: no limit.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
def build(ctx, dataset, root, out, old_out, model, name, encoder_key, batch_size, device, precision, workers, image_size,
          preprocess, aug_views, aug_seed, on_error, params, max_pixels, quiet):
    """Encode every image of a dataset once (image + horizontal flip) into the store.

    Adds only what is missing: a new dataset, a new encoder, a new image size, more augmented
    views. A build that is interrupted (Ctrl-C, kill -9, power loss) resumes where it stopped
    when run again.

    \b
    Examples:
      featcache build --dataset ferplus --root ../shared/data/fer/ferplus --cache features.h5
      featcache build --dataset rafdb --root RAF-DB/basic --cache features.h5 --image-size 112
      featcache build --dataset my_manifest.toml --root my_data --model ./my-clip-checkpoint
      featcache build --dataset ferplus --root ferplus --model efficientnet-lite0 --cache effnet.h5
      featcache build --dataset ferplus --root ferplus --cache features.h5 --image-size 112 --aug-views 8
      featcache build --dataset ferplus --root ferplus --cache official.h5 --image-size 112 --preprocess official
      torchrun --nproc-per-node 8 -m featcache build --dataset affectnet --root AffectNet --cache affectnet.h5

    Under torchrun each rank encodes its share of the images on cuda:LOCAL_RANK (or the CPU) and rank 0
    writes the one store (docs/sweep.md, "Several GPUs and nodes: torchrun").
    """
    out, note = pick_renamed(ctx, "out", out, old_out, "--out", "--cache")

    def go():
        from featcache.build import build_store
        from featcache.manifests import parse_overrides

        r = build_store(out, dataset, root, model=model, name=name, encoder_key=encoder_key,
                        batch_size=batch_size, device=device, workers=workers, image_size=image_size,
                        on_error=on_error, params=parse_overrides(params), precision=precision,
                        progress=not quiet, max_pixels=max_pixels or None, preprocess=preprocess,
                        aug_views=aug_views, aug_seed=aug_seed,
                        log=lambda m: err_console.print(m, highlight=False, markup=False))
        if not r.primary:  # under torchrun rank 0 reports the whole build
            return
        if r.up_to_date:
            click.echo(f"{out}: dataset {r.dataset!r} with encoder {r.encoder_key!r} is already complete "
                       f"({r.rows} rows" + (f", {r.aug_views} augmented views" if r.aug_views else "")
                       + "); nothing to do.")
            if r.aug_note:
                click.echo(f"note: {r.aug_note}")
            return
        click.echo(f"{out}: dataset {r.dataset!r}: {r.rows} rows, encoder {r.encoder_key!r}"
                   + (f", images {r.image_size}px" if r.image_size else "")
                   + f"; encoded {r.encoded_now} now" + (f", {r.resumed_from} resumed" if r.resumed_from else "")
                   + f" in {r.seconds:.1f}s")
        if r.aug_added:
            click.echo(f"augmented views: {r.aug_views} per image ({r.aug_added} added: {r.aug_encoded_now} encoded now"
                       + (f", {r.aug_resumed_from} resumed" if r.aug_resumed_from else "") + ")")
        elif r.aug_note:
            click.echo(f"note: {r.aug_note}")
        if r.dropped:
            click.echo("dropped (outside the 7 classes or unlabelled): "
                       + ", ".join(f"{k} {v}" for k, v in sorted(r.dropped.items())))
        if r.skipped:
            click.echo(f"skipped {len(r.skipped)} item(s) (recorded in the store):")
            for sid, where, reason in r.skipped[:20]:
                click.echo(f"  {where}: {reason}")
            if len(r.skipped) > 20:
                click.echo(f"  ... {len(r.skipped) - 20} more (see `featcache info --json`)")

    _run(go)
    if note:
        err_console.print(note, highlight=False, markup=False)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(file, as_json):
    """Summarise a store: datasets, rows per split and class, encoders (dims, preprocessing mode,
    augmented views: K, seed, recipe), image sizes.

    \b
    Example:
      featcache info features.h5 --json
    """
    def go():
        from featcache.inspection import summarize
        from featcache.store import open_store

        with open_store(file) as s:
            summary = summarize(s)
            if as_json:
                for name in summary["datasets"]:
                    summary["datasets"][name]["skipped_items"] = [
                        {"id": a, "where": b, "reason": c} for a, b, c in s.dataset(name).skipped]
        if as_json:
            click.echo(json.dumps(summary, indent=2))
            return
        _print_summary(summary)

    _run(go)


def _print_summary(summary):
    from rich.markup import escape  # paths, names and keys are user strings: never markup

    con = wide_console()
    con.print(f"[bold]{escape(str(summary['path']))}[/] (store schema v{summary['schema_version']}, "
              f"written by featcache {summary['tool_version']})", highlight=False)
    from featcache.taxonomy import CLASSES

    for name, d in summary["datasets"].items():
        t = Table(title=escape(f"{name}: {d['rows']} rows (manifest {d['manifest']}, root {d['root']})"),
                  title_justify="left")
        t.add_column("split")
        for c in CLASSES:
            t.add_column(c, justify="right")
        t.add_column("total", justify="right")
        for s, counts in d["splits"].items():
            t.add_row(escape(s), *[str(counts[c]) for c in CLASSES], str(counts["total"]))
        con.print(t)
        for key, e in d["encoders"].items():
            con.print(f"  encoder [bold]{escape(key)}[/]: " + escape(f"{e['model']}  dim {e['dim']}  {e['dtype']}  views {e['views']}  "
                      f"computed in {e['precision']}  preprocess {e.get('preprocess', 'clip')}  "
                      f"fingerprint {e['fingerprint']}"), highlight=False)
            a = e.get("aug_views")
            if a:
                from featcache.views import recipe_text

                con.print("    " + escape(f"augmented views: {a['views']} per image, rendered from the {a['image_size']}px "
                                          f"cached images at {a['input_size']}px; {recipe_text(a, a['seed'])}"),
                          highlight=False)
        if not d["encoders"]:
            con.print("  no encoder features yet")
        con.print(f"  cached image sizes: {d['image_sizes'] or 'none'}")
        if d["dropped"]:
            con.print("  dropped: " + escape(", ".join(f"{k} {v}" for k, v in sorted(d["dropped"].items()))), highlight=False)
        if d["skipped"]:
            con.print(f"  skipped items: {d['skipped']} (`featcache info --json` lists them)")


@main.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--sample", default=8, show_default=True, type=click.IntRange(0),
              help="Images per dataset and encoder to re-encode and compare (0: skip).")
@click.option("--root", default=None, help="Dataset root if it moved since the build (one dataset stores only).")
@click.option("--device", default="auto", show_default=True, help="Device of the re-encode check: " + _DEVICE_HELP)
@click.option("--trust-plugins", is_flag=True,
              help="Let the re-encode check import a plug-in encoder ('module:factory' or entry point) named in the "
                   "store. Off by default: a store may come from anyone, and that would run its code.")
def verify(file, sample, root, device, trust_plugins):
    """Check a store: ids unique, labels valid, no NaN/inf, shapes, every row against its checksum
    (augmented views included), augmented-view parameters against their seed, and a re-encoded sample matches.

    Exits 1 when a check fails. A check that cannot run (root or model unavailable) is shown as
    'not checked' and does not fail.

    \b
    Example:
      featcache verify features.h5 --sample 16
    """
    def go():
        from rich.markup import escape

        from featcache.inspection import verify as run_verify
        from featcache.store import open_store

        dev = device
        if sample and device == "auto":  # the re-encode check takes a concrete torch device
            from featcache.devices import resolve_device

            dev = str(resolve_device(device))
        with open_store(file) as s:
            rows = run_verify(s, sample=sample, root=root, device=dev, trust_plugins=trust_plugins)
        failed = 0
        for check, ok, detail in rows:
            mark = {True: "[green]ok[/]", False: "[red]FAIL[/]", None: "[yellow]not checked[/]"}[ok]
            wide_console().print(f"{mark}  " + escape(f"{check}: {detail}"), highlight=False)
            failed += ok is False
        if failed:
            err_console.print(f"[red]{failed} check(s) failed[/]")
            raise SystemExit(1)

    _run(go)


@main.command()
def manifests():
    """List the built-in dataset manifests."""
    def go():
        from featcache.manifests import builtin_manifests, load_manifest

        for n in builtin_manifests():
            m = load_manifest(n)
            click.echo(f"{n:16s} {m.kind:14s} {m.description}")

    _run(go)


if __name__ == "__main__":
    main()
