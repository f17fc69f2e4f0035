"""maskfer.report: the run and sweep reports (figures, index.html, its numbers) on tiny trained fixtures.

The fixtures (one store, a CAFE run, a baseline run, a 2 x 2 lambda x beta sweep) are built once per
session by :func:`report_fixtures`; tests/test_report_browser.py reuses them.
"""
from __future__ import annotations

import json
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

import maskfer_fixtures as mf
from featcache.taxonomy import CLASSES

from maskfer import rundir
from maskfer.report import ReportError, heatmap_cells, load_summary, pct, pct_pm, write_report

EXTRA = "the report tests need the optional extra: pip install 'cafe-fer[report]'"


_CACHE: dict = {}
SWEEP_GRID = {"lam": [0.5, 1.5], "beta": [1.0, 5.0]}


def report_fixtures(base: Path, clip_dir: Path) -> dict[str, Path]:
    """Store: repA (train 4 / val 2 / test 2 per class) and repB (test 2 per class, no neutral: an unseen
    domain missing a class), 16-d tiny-CLIP features, 32 px cached images. Runs trained on repA:
    ``cafe`` (2 epochs, val split, tested on repA:test and repB), ``baseline`` (1 epoch), and a 2 x 2
    lambda x beta sweep (1 epoch each, val split, tested on repB). Built once; callers must not modify them."""
    key = str(clip_dir)
    if key in _CACHE:
        return _CACHE[key]
    from featcache.build import build_store
    from maskfer.config import TrainConfig
    from maskfer.sweep import run_sweep
    from maskfer.train import train

    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    a = mf.make_colour_dataset(base / "repA", {"train": 4, "val": 2, "test": 2}, domain=0, seed=11)
    b = mf.make_colour_dataset(base / "repB", {"test": 2}, domain=1, seed=12, skip_classes={"test": ("neutral",)})
    store = base / "features.h5"
    for name, root, splits in (("repA", a, ("train", "val", "test")), ("repB", b, ("test",))):
        build_store(store, "folders", root, model=str(clip_dir), name=name, image_size=32, progress=False, workers=0,
                    params={"split_dirs": {s: s for s in splits}}, log=mf.quiet)
    kw = dict(cache=str(store), train="repA", batch_size=16, image_size=32, drop=1, device="cpu",
              backbone="mobilenet_v2")
    train(TrainConfig(**kw, epochs=2, val_split="val", test=["repA:test", "repB"]), base / "cafe", progress=False,
          log=mf.quiet)
    train(TrainConfig(**kw, epochs=1, method="baseline"), base / "baseline", progress=False, log=mf.quiet)
    run_sweep(TrainConfig(**kw, epochs=1, val_split="val", test=["repB"]), SWEEP_GRID, base / "sweep",
              progress=False, log=mf.quiet)
    _CACHE[key] = {"store": store, "cafe": base / "cafe", "baseline": base / "baseline", "sweep": base / "sweep"}
    return _CACHE[key]


@pytest.fixture
def fx(tmp_path_factory, tiny_clip_dir) -> dict[str, Path]:
    pytest.importorskip("matplotlib", reason=EXTRA)
    pytest.importorskip("sklearn", reason=EXTRA)
    return report_fixtures(tmp_path_factory.getbasetemp() / "report_fx", tiny_clip_dir)


# ---------------------------------------------------------------- reading the page back
class _Page(HTMLParser):
    """img sources and every <table id=...> as a list of rows of cell texts."""

    def __init__(self, text: str):
        super().__init__()
        self.imgs: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        elif tag == "table" and a.get("id"):
            self._table = a["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def read_page(index: Path) -> tuple[str, _Page]:
    text = index.read_text()
    return text, _Page(text)


def check_pngs(out: Path, expected: list[str], page: _Page) -> None:
    from PIL import Image

    for name in expected:
        p = out / name
        assert p.is_file(), f"missing figure {name}"
        with Image.open(p) as im:
            assert im.format == "PNG"
            assert im.width >= 300 and im.height >= 200, (name, im.size)
            im.verify()
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert set(page.imgs) >= set(expected)
    assert on_disk <= set(page.imgs), f"figures not on the page: {on_disk - set(page.imgs)}"
    assert all((out / src).is_file() for src in page.imgs)


def kv(table: list[list[str]]) -> dict[str, str]:
    """A key/value table (several pairs per row) as a dict."""
    return {k: v for row in table for k, v in zip(row[0::2], row[1::2])}


def body(table: list[list[str]]) -> list[list[str]]:
    return table[1:]  # drop the header row


# ---------------------------------------------------------------- run reports
def test_run_report_figures_tables_and_raw_feature_tsne(fx, tmp_path):
    out = tmp_path / "rep"
    index = write_report(fx["cafe"], out=out, log=mf.quiet)
    assert index == out / "index.html"
    text, page = read_page(index)
    check_pngs(out, ["curves.png", "confusion_repA_test.png", "per_class_repA_test.png", "confusion_repB_test.png",
                     "per_class_repB_test.png", "tsne_repB_test.png"], page)

    results = rundir.read_json(fx["cafe"] / "results.json")
    overview = body(page.tables["tests-overview"])
    assert [r[0] for r in overview] == list(results["tests"]) == ["repA:test", "repB:test"]
    for row in overview:
        m = results["tests"][row[0]]
        assert row[1:4] == [str(m["n"]), pct(m["accuracy"]), pct(m["mean_class_accuracy"])]
        assert row[4] == (", ".join(m["absent_classes"]) or "–")
        per = body(page.tables[f"per-class-{row[0].replace(':', '_')}"])
        assert [r[0] for r in per] == list(CLASSES)
        for i, (cls, sup, correct, acc) in enumerate(per):
            assert sup == str(m["support"][cls])
            if m["per_class_accuracy"][cls] is None:
                assert acc == "absent" and correct == "–"
            else:
                assert acc == pct(m["per_class_accuracy"][cls]) and correct == str(m["confusion"][i][i])
    assert results["tests"]["repB:test"]["absent_classes"] == ["neutral"]

    metrics = rundir.read_metrics(fx["cafe"])
    mt = page.tables["metrics-table"]
    assert mt[0][:2] == ["epoch", "loss"] and "val acc %" in mt[0]
    vi = mt[0].index("val acc %")
    assert [(r[0], r[1], r[vi]) for r in body(mt)] == [
        (str(m["epoch"] + 1), f"{m['train_loss']:.4f}", pct(m["val_acc"])) for m in metrics]
    cfg = kv(page.tables["config-table"])
    assert cfg["status"] == "finished: 2 of 2 epochs" and cfg["evaluated"].startswith("yes")
    assert cfg["λ (separation)"] == "1.5" and cfg["backbone"] == "mobilenet_v2"
    # the t-SNE picked the unseen dataset and, without --baseline, compares with the raw features
    assert "raw cached CLIP features F" in text and "not trained on" in text
    counts = body(page.tables["tsne-counts-repB_test"])
    assert dict(counts)["neutral"] == "0" and sum(int(n) for _, n in counts) == 12


def test_tsne_against_a_baseline_run_and_subsampling(fx, tmp_path):
    out = tmp_path / "rep"
    write_report(fx["cafe"], out=out, baseline=fx["baseline"], test="repB", max_points=8, log=mf.quiet)
    text, page = read_page(out / "index.html")
    check_pngs(out, ["tsne_repB_test.png"], page)
    assert "baseline run" in text and "global-average-pooled" in text and "raw cached CLIP" not in text
    assert "subsample of 8 of its 12" in text
    assert sum(int(n) for _, n in body(page.tables["tsne-counts-repB_test"])) == 8
    sil = body(page.tables["tsne-silhouette-repB_test"])
    assert sil[0][0].startswith("this run (cafe): masked") and sil[1][0].startswith("baseline run baseline (baseline)")


def test_embed_gives_each_method_its_representation(fx):
    import torch

    from maskfer.data import load_split
    from maskfer.evaluate import load_run
    from maskfer.report import embed

    dev = torch.device("cpu")
    for run, dim in ((fx["cafe"], 16), (fx["baseline"], None)):
        model, cfg, stored = load_run(run, dev)
        data, _ = load_split(str(fx["store"]), "repB", "test", stored["encoder"]["key"], True, cfg.image_size)
        x = embed(model, cfg, data, dev, batch_size=5)
        assert x.shape == (12, dim or model.backbone.feature_dim)
        if cfg.method == "cafe":  # masked = sigmoid(M) * F: never larger than F in magnitude
            assert (abs(x) <= abs(data.feats[:, 0].numpy()) + 1e-6).all()


def test_unevaluated_and_still_training_runs(fx, tmp_path):
    run = tmp_path / "partial"
    shutil.copytree(fx["cafe"], run, ignore=shutil.ignore_patterns("results.json", "report"))
    rundir.atomic_write_text(run / "metrics.jsonl", (fx["cafe"] / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    index = write_report(run, tsne=False, log=mf.quiet)
    assert index == run / "report" / "index.html"
    text, page = read_page(index)
    check_pngs(run / "report", ["curves.png"], page)
    assert not list((run / "report").glob("confusion_*"))
    cfg = kv(page.tables["config-table"])
    assert cfg["status"] == "training: 1 of 2 epochs finished (curves so far)" and cfg["evaluated"] == "not evaluated"
    assert "Not evaluated: this run has no results.json" in text and len(body(page.tables["metrics-table"])) == 1

    # only config.json: nothing trained, nothing to plot; still a page
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(fx["cafe"] / "config.json", bare / "config.json")
    text, page = read_page(write_report(bare, log=mf.quiet))
    assert page.imgs == [] and "No epoch has finished yet" in text and "no checkpoint yet" in text


# ---------------------------------------------------------------- sweep reports
def test_sweep_report_heatmaps_summary_and_selected_run(fx):
    sweep = fx["sweep"]
    summary = rundir.read_json(sweep / "summary.json")
    out = sweep / "report"
    index = write_report(sweep, log=mf.quiet)
    assert index == out / "index.html" and (out / "selected" / "index.html").is_file()
    text, page = read_page(index)
    check_pngs(out, ["heatmap_val.png", "heatmap_test_repB_test.png", "selected/curves.png",
                     "selected/confusion_repB_test.png", "selected/per_class_repB_test.png",
                     "selected/tsne_repB_test.png"], page)

    rows = summary["rows"]
    sel = next(r for r in rows if r["selected"])
    # the summary table: one row per configuration, numbers as in summary.json
    st = page.tables["summary-table"]
    assert st[0] == ["", "λ (lambda)", "β (beta)", "seeds", "val % (select)", "repB:test %"]
    assert len(body(st)) == len(rows) == 4
    for r, cells in zip(rows, body(st)):
        assert cells == ["★ selected" if r["selected"] else "", f"{r['config']['lam']:g}", f"{r['config']['beta']:g}",
                         "1", pct_pm(r["val_mean"], r["val_std"]),
                         pct_pm(r["tests"]["repB:test"]["mean"], r["tests"]["repB:test"]["std"])]
    # the heat-map tables: rows lambda, columns beta; no other axes, so each cell is its configuration
    for tid, get in (("heatmap-val", lambda r: r["val_mean"]),
                     ("heatmap-test_repB_test", lambda r: r["tests"]["repB:test"]["mean"])):
        hm = page.tables[tid]
        assert hm[0] == ["", "β = 1", "β = 5"]
        for i, lam in enumerate(SWEEP_GRID["lam"]):
            for j, beta in enumerate(SWEEP_GRID["beta"]):
                r = next(r for r in rows if r["config"] == {"lam": lam, "beta": beta})
                want = f"{100 * get(r):.2f}" + (" ★" if r is sel else "")
                assert hm[1 + i][1 + j] == want
    assert "Each cell is one configuration" in text
    # the selected configuration's run, embedded and as its own page
    assert f"runs/{Path(sel['runs'][0]).name}" in text
    _, sub = read_page(out / "selected" / "index.html")
    assert sorted(sub.imgs) == sorted(s.removeprefix("selected/") for s in page.imgs if s.startswith("selected/"))


def test_sweep_still_running_derives_the_summary_from_the_runs(fx, tmp_path):
    sweep = tmp_path / "running"
    sweep.mkdir()
    shutil.copyfile(fx["sweep"] / "sweep.json", sweep / "sweep.json")
    (sweep / "runs").symlink_to(fx["sweep"] / "runs", target_is_directory=True)
    derived, was_derived = load_summary(sweep)
    final = rundir.read_json(fx["sweep"] / "summary.json")
    assert was_derived and json.loads(json.dumps(derived)) == {k: final[k] for k in derived}
    text, page = read_page(write_report(sweep, out=tmp_path / "rep", tsne=False, log=mf.quiet))
    assert "summary.json is not written yet" in text and len(body(page.tables["summary-table"])) == 4


def test_sweep_without_lambda_beta_axes_says_so(fx, tmp_path):
    sweep = tmp_path / "drop_sweep"
    sweep.mkdir()
    (sweep / "runs").symlink_to(fx["sweep"] / "runs", target_is_directory=True)
    run = rundir.read_json(fx["sweep"] / "summary.json")["rows"][0]["runs"][0]
    rundir.write_json(sweep / "summary.json", {
        "axes": ["drop"], "grid": {"drop": [1]}, "selection": "highest mean validation accuracy over seeds",
        "rows": [{"config": {"drop": 1}, "runs": [run], "n_seeds": 1, "val_mean": 0.5, "val_std": 0.0,
                  "tests": {}, "selected": True}]})
    text, page = read_page(write_report(sweep, tsne=False, log=mf.quiet))
    assert "does not vary lam or beta" in text and not list((sweep / "report").glob("heatmap_*"))
    assert body(page.tables["summary-table"]) == [["★ selected", "1", "1", "50.00 ± 0.00"]]
    assert "selected/curves.png" in page.imgs


def test_heatmap_marginalises_other_axes_by_best_validation():
    def row(lam, beta, drop, val, test):
        return {"config": {"lam": lam, "beta": beta, "drop": drop}, "runs": [], "n_seeds": 2, "val_mean": val,
                "val_std": 0.01, "tests": {"t": {"mean": test, "std": 0.0, "n": 2}}, "selected": False}

    rows = [row(0.5, 1.0, 0, 0.60, 0.9), row(0.5, 1.0, 5, 0.70, 0.1),   # best val: drop 5, despite its test
            row(1.5, 1.0, 0, 0.80, 0.5), row(1.5, 1.0, 5, None, 0.99),  # unfinished row never wins
            row(0.5, 5.0, 0, None, None)]                                # a cell with nothing yet
    summary = {"axes": ["lam", "beta", "drop"], "grid": {"lam": [0.5, 1.5], "beta": [1.0, 5.0], "drop": [0, 5]},
               "rows": rows}
    cells = heatmap_cells(summary, {})
    assert cells["lams"] == [0.5, 1.5] and cells["betas"] == [1.0, 5.0] and cells["others"] == ["drop"]
    assert cells["best"][(0, 0)] is rows[1] and cells["best"][(1, 0)] is rows[2]
    assert cells["best"][(0, 1)]["val_mean"] is None and (1, 1) not in cells["best"]
    # a sweep over lam only: beta is the base value, one column
    one = heatmap_cells({"axes": ["lam"], "grid": {"lam": [1, 2]}, "rows": [
        {"config": {"lam": 1}, "val_mean": 0.1}, {"config": {"lam": 2}, "val_mean": 0.2}]}, {"beta": 5.0})
    assert one["betas"] == [5.0] and one["best"][(1, 0)]["val_mean"] == 0.2
    assert heatmap_cells({"axes": ["drop"], "grid": {"drop": [0]}, "rows": []}, {}) is None


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("module", ["matplotlib", "sklearn"])
def test_missing_plotting_library_is_a_clear_error(tmp_path, monkeypatch, module):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")  # the libraries are checked before the run is read
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(ReportError, match=r"pip install 'cafe-fer\[report\]'"):
        write_report(run, out=tmp_path / "rep", log=mf.quiet)
    assert not (tmp_path / "rep").exists()  # failed before writing anything


def test_bad_paths(fx, tmp_path):
    with pytest.raises(ReportError, match="neither a run directory"):
        write_report(tmp_path, log=mf.quiet)
    with pytest.raises(ReportError, match="not a directory"):
        write_report(tmp_path / "nope", log=mf.quiet)
    with pytest.raises(ReportError, match="--baseline .* is not a run directory"):
        write_report(fx["cafe"], out=tmp_path / "r", baseline=tmp_path, log=mf.quiet)
