"""Rebuild a paper's table from run folders: `python -m ad_lightning.report DIR... --rows K --cols K`.

Reads every results.json under the given folders (multirun sweeps, single runs, several at
once), puts `--metric` in a grid of rows x columns taken from the runs' resolved configs,
averages repeated cells (e.g. seeds, shown as mean ± std), adds a mean row, prints Markdown,
writes CSV, and logs the table to W&B when the runs themselves logged there.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

MISSING = "—"


def find_results(folders: list[str]) -> list[dict[str, Any]]:
    runs = []
    for folder in folders:
        path = Path(folder)
        files = [path] if path.is_file() else sorted(path.rglob("results.json"))
        if not path.exists():
            raise SystemExit(f"report: {folder} does not exist")
        for file in files:
            try:
                data = json.loads(file.read_text())
            except json.JSONDecodeError as err:
                print(f"report: skipping unreadable {file}: {err}", file=sys.stderr)
                continue
            data["_file"] = str(file)
            runs.append(data)
    return runs


def lookup(run: dict[str, Any], key: str) -> Any:
    """A dotted key, looked up in the run's results first, then in its resolved config."""
    if key == "backbone":
        key = "method.backbone.name"
    for source in (run, run.get("config", {})):
        node: Any = source
        for part in key.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            else:
                node = None
                break
        if node is not None:
            return node
    return None


def metric_value(run: dict[str, Any], metric: str) -> float | str | None:
    if run.get("status") not in (None, "finished"):
        return run.get("status")
    key = metric if "." in metric else f"metrics.{metric}"
    value = lookup(run, key)
    return float(value) if isinstance(value, (int, float)) else None


def label(value: Any) -> str:
    if isinstance(value, list):
        return "{" + ",".join(map(str, value)) + "}"
    return str(value)


def build_table(
    runs: list[dict[str, Any]], metric: str, rows: str, cols: str
) -> tuple[list[str], list[str], dict]:
    cells: dict[tuple[str, str], list] = defaultdict(list)
    row_order: list[str] = []
    col_order: list[str] = []
    for run in runs:
        r, c = label(lookup(run, rows)), label(lookup(run, cols))
        if r not in row_order:
            row_order.append(r)
        if c not in col_order:
            col_order.append(c)
        value = metric_value(run, metric)
        if value is not None:
            cells[(r, c)].append(value)
    return row_order, col_order, cells


def summarise(values: list) -> tuple[float | None, str]:
    numbers = [v for v in values if isinstance(v, float)]
    if not numbers:
        return None, (values[0] if values else MISSING)
    mean = statistics.fmean(numbers)
    if len(numbers) > 1:
        return mean, f"{mean:.3f} ± {statistics.stdev(numbers):.3f}"
    return mean, f"{mean:.3f}"


def render(row_order: list[str], col_order: list[str], cells: dict, rows: str) -> list[list[str]]:
    table = [[rows, *col_order]]
    col_values: dict[str, list[float]] = defaultdict(list)
    for r in row_order:
        line = [r]
        for c in col_order:
            mean, text = summarise(cells.get((r, c), []))
            line.append(text)
            if mean is not None:
                col_values[c].append(mean)
        table.append(line)
    if len(row_order) > 1:
        mean_line = ["mean"]
        for c in col_order:
            vals = col_values[c]
            text = f"{statistics.fmean(vals):.3f}" if vals else MISSING
            if vals and len(vals) < len(row_order):
                text += f" ({len(vals)}/{len(row_order)})"
            mean_line.append(text)
        table.append(mean_line)
    return table


def to_markdown(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)


def to_csv(table: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(table)
    return buf.getvalue()


def log_to_wandb(runs: list[dict[str, Any]], table: list[list[str]], title: str) -> bool:
    """Log the table as a W&B Table when the runs logged to W&B (offline without an API key)."""
    wandb_runs = [r for r in runs if isinstance(lookup(r, "logger.wandb"), dict)]
    if not wandb_runs:
        return False
    import os

    import wandb

    conf = lookup(wandb_runs[0], "logger.wandb") or {}
    out_dir = Path(wandb_runs[0]["_file"]).parent.parent
    run = wandb.init(
        project=conf.get("project", "ad_lightning"),
        job_type="report",
        name=title,
        dir=str(out_dir),
        mode="online" if os.environ.get("WANDB_API_KEY") else "offline",
        reinit=True,
    )
    run.log({"report": wandb.Table(columns=table[0], data=table[1:])})
    run.finish()
    return True


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m ad_lightning.report", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "folders", nargs="+", help="run or multirun folders (searched for results.json)"
    )
    parser.add_argument(
        "--metric",
        default="image_auroc",
        help="metrics.<name> shorthand or a dotted path in results.json, e.g. scores.image_l1.auroc",
    )
    parser.add_argument(
        "--rows", default="data.category", help="config key for rows (dotted), e.g. data.category"
    )
    parser.add_argument(
        "--cols",
        default="model",
        help="config key for columns, e.g. model, backbone, backbone.blocks, data.contamination",
    )
    parser.add_argument(
        "--csv",
        default=None,
        help="CSV output path (default: report_<metric>.csv in the first folder)",
    )
    parser.add_argument("--no-wandb", action="store_true", help="do not log the table to W&B")
    args = parser.parse_args(argv)
    runs = find_results(args.folders)
    if not runs:
        raise SystemExit(f"report: no results.json under {args.folders}")
    row_order, col_order, cells = build_table(runs, args.metric, args.rows, args.cols)
    table = render(row_order, col_order, cells, rows=args.rows)
    markdown = to_markdown(table)
    print(f"\n{args.metric} ({len(runs)} runs)\n\n{markdown}\n")
    first = Path(args.folders[0])
    csv_path = (
        Path(args.csv)
        if args.csv
        else (first if first.is_dir() else first.parent)
        / f"report_{args.metric.replace('.', '_')}.csv"
    )
    csv_path.write_text(to_csv(table))
    print(f"CSV: {csv_path}")
    if not args.no_wandb and log_to_wandb(
        runs, table, f"report {args.metric} {args.rows} x {args.cols}"
    ):
        print("table logged to W&B (job_type=report)")
    return markdown


if __name__ == "__main__":
    main()
