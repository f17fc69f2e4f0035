"""Mean ± std over seeds of run directories named <group>-s<seed>, with training accuracy beside every result.

    python experiments/summarize_runs.py runs/issue8/effnet/*-s[0-9]

Prints one markdown row per group: final training accuracy, accuracy per test set (%), mean ± std
(population std over the seeds present), training images per second (epoch time = images / that), and
how many seeds were found.
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def main(paths: list[str]) -> None:
    groups: dict[str, list[Path]] = defaultdict(list)
    for p in map(Path, paths):
        if (p / "results.json").exists():
            groups[re.sub(r"-s\d+$", "", p.name)].append(p)
    tests: list[str] = []
    rows = []
    for name, runs in groups.items():
        acc, tr, speed = defaultdict(list), [], []
        for r in sorted(runs):
            res = json.loads((r / "results.json").read_text())
            for t, m in res["tests"].items():
                acc[t].append(100 * m["accuracy"])
                if t not in tests:
                    tests.append(t)
            metrics = [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines() if line.strip()]
            tr.append(100 * metrics[-1]["train_acc"])
            speed += [m["images_per_s"] for m in metrics if "images_per_s" in m]
        rows.append((name, tr, acc, speed, len(runs)))
    fmt = lambda v: f"{np.mean(v):.1f} ± {np.std(v):.1f}" if v else "–"  # noqa: E731
    print("| run | train acc | " + " | ".join(tests) + " | train img/s | seeds |")
    print("|---|---|" + "---|" * len(tests) + "---|---|")
    for name, tr, acc, speed, n in rows:
        ips = f"{np.mean(speed):.1f}" if speed else "–"
        print(f"| {name} | {fmt(tr)} | " + " | ".join(fmt(acc.get(t, [])) for t in tests) + f" | {ips} | {n} |")


if __name__ == "__main__":
    main(sys.argv[1:])
