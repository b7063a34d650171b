"""Rerun the learning tests (pytest -m learning) under several seeds and tabulate each figure.

    .venv/bin/python experiments/learning_margins/measure.py SEEDS=0,1,2,3,4 OUT=outputs/margins
    (MARK="learning and not realdata" leaves out the real-data fits; PYTHON= another venv's)

Each seed is one pytest process (AD_LIGHTNING_TEST_SEED sets model init, validation split and
batch order; tests record their figures through the `figure` fixture). Writes OUT/figures.jsonl,
OUT/pytest-seed<k>.log and OUT/table.md (min / median / max per test and figure), and prints
the table. Run it alone on an idle machine: about 10 minutes a seed on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd


def measure(seeds: list[int], out: Path, python: str, mark: str = "learning") -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    figures = out / "figures.jsonl"
    figures.unlink(missing_ok=True)
    for seed in seeds:
        env = os.environ | {
            "AD_LIGHTNING_TEST_SEED": str(seed),
            "AD_LIGHTNING_FIGURES": str(figures.resolve()),
        }
        cmd = [
            python,
            "-m",
            "pytest",
            "-q",
            "-m",
            mark,
            "-p",
            "no:cacheprovider",
            "--durations=30",
        ]
        log = out / f"pytest-seed{seed}.log"
        with log.open("w") as f:
            rc = subprocess.call(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        print(f"seed {seed}: pytest exit {rc} ({log.read_text().strip().splitlines()[-1]})")
    rows = [json.loads(line) for line in figures.read_text().splitlines()]
    return table(pd.DataFrame(rows))


def table(rows: pd.DataFrame) -> pd.DataFrame:
    """min / median / max of each (test, figure) over the seeds it was recorded under."""
    rows["test"] = rows["test"].str.replace("tests/", "", regex=False)
    stats = rows.groupby(["test", "figure"], sort=False)["value"].agg(
        seeds="count", min="min", median="median", max="max"
    )
    return stats.round(3).reset_index()


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    seeds = [int(s) for s in args.get("SEEDS", "0,1,2,3,4").split(",")]
    out = Path(args.get("OUT", "outputs/margins"))
    stats = measure(seeds, out, args.get("PYTHON", sys.executable), args.get("MARK", "learning"))
    text = stats.to_markdown(index=False)
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
