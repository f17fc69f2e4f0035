"""What a report reads: which kind of directory it is given, a run's files, a sweep's summary.

A sweep's numbers come from maskfer.sweep: its summary.json once the sweep has finished, else
:func:`maskfer.sweep.summary_so_far` over the run directories finished so far.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from maskfer import rundir
from maskfer.report.errors import ReportError
from maskfer.sweep import SWEEP_FILE, summary_so_far

SUMMARY_FILE = "summary.json"


def detect_kind(path: Path) -> str:
    """The kind of directory: a run (config.json) or a sweep (sweep.json or summary.json)."""
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory: give a run directory (maskfer train --out) "
                          "or a sweep directory (maskfer sweep --out)")
    if (path / rundir.CONFIG).exists():
        return "run"
    if (path / SWEEP_FILE).exists() or (path / SUMMARY_FILE).exists():
        return "sweep"
    raise ReportError(f"{path} is neither a run directory (no {rundir.CONFIG}) nor a sweep directory "
                      f"(no {SWEEP_FILE} or {SUMMARY_FILE})")


def check_baseline(baseline: Path) -> None:
    """A --baseline run must be a run directory with a checkpoint."""
    if not (baseline / rundir.CONFIG).exists():
        raise ReportError(f"--baseline {baseline} is not a run directory (no {rundir.CONFIG}); "
                          "train one with `maskfer train --method baseline`")
    if not (baseline / rundir.LAST).exists():
        raise ReportError(f"--baseline {baseline} has no checkpoint yet (training has not finished an epoch)")


# ---------------------------------------------------------------------------- a run
@dataclass
class RunFiles:
    """A run directory's files as a report reads them (any of them may not be there yet)."""
    path: Path
    stored: dict            # config.json
    metrics: list[dict]     # metrics.jsonl, one row per finished epoch
    results: dict | None    # results.json, None when the run is not evaluated

    @property
    def config(self) -> dict:
        return self.stored.get("config", {})

    @property
    def epochs_planned(self) -> int:
        return int(self.config.get("epochs", 0) or 0)

    @property
    def fit_row(self) -> dict | None:
        """The metrics row of a method fitted once, not by epochs (its "solver": "lbfgs" for the linear probe,
        maskfer.probe; "zero-shot", maskfer.zero_shot): one row stands for every epoch."""
        return next((r for r in self.metrics if r.get("solver")), None)

    @property
    def probe(self) -> dict | None:
        """The metrics row of a linear probe fit by L-BFGS (maskfer.probe): one row stands for every epoch."""
        row = self.fit_row
        return row if row is not None and row.get("solver") == "lbfgs" else None

    @property
    def epochs_done(self) -> int:
        """Epochs finished, as the run's checkpoint (and results.json) count them."""
        row = self.fit_row
        if row is not None:
            return int(row.get("epoch", self.epochs_planned - 1)) + 1
        return len(self.metrics)


def read_run(run: Path) -> RunFiles:
    stored, _ = rundir.read_run_config(run)  # a damaged config.json is one line naming the field, not a traceback
    results = rundir.read_json(run / rundir.RESULTS) if (run / rundir.RESULTS).exists() else None
    return RunFiles(run, stored, rundir.read_metrics(run), results)


# ---------------------------------------------------------------------------- a sweep
def load_summary(sweep: Path) -> tuple[dict, bool]:
    """(summary, derived): summary.json, or (the sweep is still running) the same summary derived from the
    run directories finished so far."""
    if (sweep / SUMMARY_FILE).exists():
        return rundir.read_json(sweep / SUMMARY_FILE), False
    if not (sweep / SWEEP_FILE).exists():
        raise ReportError(f"{sweep}: neither {SUMMARY_FILE} nor {SWEEP_FILE}")
    return summary_so_far(sweep), True


def sweep_base(sweep: Path) -> dict:
    """The options every configuration of the sweep shares (sweep.json's "base"; {} without sweep.json)."""
    return rundir.read_json(sweep / SWEEP_FILE).get("base", {}) if (sweep / SWEEP_FILE).exists() else {}
