"""Rebuild a paper's table from run folders: `python -m ad_lightning.report folders=[DIR,...] rows=K cols=K`.

Reads every results.json under the given folders (multirun sweeps, single runs, several at
once), puts `metric` in a grid of rows x columns taken from the runs' resolved configs,
averages repeated cells (e.g. seeds, shown as mean ± std), adds a mean row, prints Markdown,
writes CSV, and logs the table to W&B when the runs themselves logged there. Every file is
read through the results schema (`read_results`): older files are migrated, and a key the
schema does not know stops the report with its name instead of leaving NaN cells.

The command line is `key=value` like run.py's (`--help` lists the keys); folders may also be
given bare, before or among the keys.

Only repeats are averaged: runs of one cell whose resolved configs differ in more than the
seed and run-specific keys (`RUN_SPECIFIC`: run folders, loggers, run modes) are split into
columns named after the differing keys (`SkipDFR [trainer.max_steps=30]`). A cell that also
holds runs that did not finish says so (`0.900 (+1 failed)`), and those runs are listed with
their error under the table.

`benchmark=true` instead compares methods (config group `model`) across `data.category`: a
summary, one table per metric (image / pixel AUROC, pixel AUPRO when a run has it, fit seconds,
ms per image), the runs that did not finish with their error, and CSVs of all of it.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ad_lightning.deploy.cli import parse_args
from ad_lightning.results import SchemaError, read_results
from ad_lightning.run_config import one_device
from ad_lightning.run_folder import RESCORE_PREFIX

MISSING = "—"
FINISHED = "finished"
ROW, COL, STATUS = "_row", "_col", "status"

# benchmark=true: column name -> (heading, dotted key in results.json, number format)
BENCHMARK_METRICS: dict[str, tuple[str, str, str]] = {
    "image_auroc": ("image AUROC", "metrics.image_auroc", ".3f"),
    "pixel_auroc": ("pixel AUROC", "metrics.pixel_auroc", ".3f"),
    "pixel_aupro": ("pixel AUPRO", "metrics.pixel_aupro", ".3f"),
    "fit_s": ("fit s", "timings.fit_s", ".1f"),
    "ms_per_image": ("ms/image", "timings.inference_ms_per_image", ".2f"),
}
#: benchmark columns shown only when some run has them (runs written before pixel AUPRO)
BENCHMARK_OPTIONAL = ("pixel_aupro",)


def _natural_key(path: Path) -> list[Any]:
    """Multirun job folders sort 0, 1, 2, ..., 10 (not 0, 1, 10, 2), i.e. in sweep order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_results(folders: list[str]) -> list[dict[str, Any]]:
    """Every readable results.json under the folders, in sweep order, each tagged with its path.

    A re-score (test_only=RUN -> RUN/rescore-N) measures the same fit again, so the run counts
    once: as itself when it finished, else as its latest finished re-score when its fit ended
    (a test step that failed, scored again). A re-score of a fit that never ended scored a
    partly trained last.ckpt: the run stays unfinished. Name a rescore folder to report it."""
    runs: list[dict[str, Any]] = []
    rescores: dict[Path, list[dict[str, Any]]] = {}
    seen: set[Path] = set()
    for folder in folders:
        path = Path(folder)
        if not path.exists():
            raise SystemExit(f"report: {folder} does not exist")
        files = [path] if path.is_file() else sorted(path.rglob("results.json"), key=_natural_key)
        for file in files:
            if file.resolve() in seen:  # folders that overlap (a sweep and one of its jobs)
                print(f"report: {file} is under two of the folders given; counted once")
                continue
            seen.add(file.resolve())
            try:
                results = read_results(file)
            except json.JSONDecodeError as err:
                print(f"report: skipping unreadable {file}: {err}", file=sys.stderr)
                continue
            except SchemaError as err:
                raise SystemExit(f"report: {err}") from None
            data = results.to_json()
            data["_file"] = str(file)
            if results.rescore_of and file not in (path, path / "results.json"):
                rescores.setdefault(file.parent.parent, []).append(data)
            else:
                runs.append(data)
    for i, run in enumerate(runs):
        folder = Path(run["_file"]).parent
        finished = [r for r in rescores.pop(folder, []) if run_status(r) == FINISHED]
        if run_status(run) == FINISHED or not finished:
            if finished:
                print(f"report: {folder}'s re-scores are not counted twice")
            continue
        if not run.get("checkpoint"):  # the fit never reached its checkpoint choice
            print(
                f"report: {folder} did not finish ({run_status(run)}) and its fit did not end: "
                f"its re-score {Path(finished[-1]['_file']).parent} scored a partly trained "
                "model and is not counted"
            )
            continue
        runs[i] = finished[-1]
        print(
            f"report: {folder} did not finish ({run_status(run)}); its re-score "
            f"{Path(finished[-1]['_file']).parent} stands in for it"
        )
    for folder in rescores:  # their run's own results.json was unreadable (said above)
        print(f"report: the re-scores of {folder} are not counted without its results.json")
    return runs


def find_unreported(folders: list[str]) -> list[Path]:
    """Hydra job folders without results.json: jobs that crashed before writing it (or still
    run). A run's `rescore-N` folders are not jobs of the sweep (as their results are not)."""
    missing = []
    for folder in map(Path, folders):
        if folder.is_dir():
            jobs = (d.parent for d in folder.rglob(".hydra") if d.is_dir())
            missing += [
                job
                for job in jobs
                if not (job / "results.json").exists() and not job.name.startswith(RESCORE_PREFIX)
            ]
    return sorted(missing, key=_natural_key)


def lookup(run: dict[str, Any], key: str, config_first: bool = False) -> Any:
    """A dotted key, looked up in the run's results first, then in its resolved config (the
    other way round with `config_first`: a row or column key names a setting, which the
    results may record as a fact of its own, e.g. `data.contamination`'s images moved).

    Shorthands: `backbone` is the backbone's name; `model` is the config group choice
    (`patchcore`, `ae_ssim`) when the run recorded it, since several choices share a class.
    """
    if key == "model" and (run.get("choices") or {}).get("model"):
        return run["choices"]["model"]
    config = run.get("config", {})
    if key == "backbone":  # a run that failed before its test has no method record
        key = "backbone.alias" if config_first else "method.backbone.name"
    for source in (config, run) if config_first else (run, config):
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


def setting(run: dict[str, Any], key: str) -> Any:
    """The run's value of a row or column key: one setting, not a group of them."""
    value = lookup(run, key, config_first=True)
    if isinstance(value, dict):
        raise SystemExit(
            f"report: {key} is a group of settings, not one: name one of its keys "
            f"({', '.join(f'{key}.{k}' for k in list(value)[:4])})"
        )
    return value


def metric_key(metric: str) -> str:
    """`image_auroc` is shorthand for `metrics.image_auroc`; dotted keys are taken as they are."""
    return metric if "." in metric else f"metrics.{metric}"


def metric_value(run: dict[str, Any], key: str) -> float:
    """The number at `key`, NaN when the run did not finish or has no such number."""
    if run_status(run) != FINISHED:
        return np.nan
    value = lookup(run, key)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if is_number else np.nan


def run_status(run: dict[str, Any]) -> str:
    """Every file read has a status (older files get theirs in `results.migrate`)."""
    return str(run[STATUS])


def label(value: Any) -> str:
    if isinstance(value, list):
        return "{" + ",".join(map(str, value)) + "}"
    return str(value)


#: config keys in which repeats of one setting differ: seeds, run folders, loggers, run modes
RUN_SPECIFIC = (
    "seed",
    "*.seed",
    "*_seed",
    "paths.*",
    "logger",
    "logger.*",
    "resume",
    "test_only",
    "skip_done",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.default_root_dir",
)


#: results.json `versions` keys that do not split cells
UNCOMPARED_VERSIONS = ("git_commit",)


def settings(run: dict[str, Any]) -> dict[str, str]:
    """The run's resolved config as dotted key -> value label, less the RUN_SPECIFIC keys,
    and the library versions it ran with."""
    flat: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif not any(fnmatchcase(prefix, pattern) for pattern in RUN_SPECIFIC):
            flat[prefix] = label(one_device(node) if prefix == "trainer.devices" else node)

    walk(run.get("config") or {}, "")
    # the libraries a run used (a timm or torchmetrics upgrade can change a figure); the code's
    # own commit is left out, or every commit would split a sweep rerun after it
    for package, version in (run.get("versions") or {}).items():
        if package not in UNCOMPARED_VERSIONS:
            flat[f"versions.{package}"] = str(version)
    return flat


def is_resolved(flat: dict[str, str]) -> bool:
    """A run that failed before its config was resolved (`${...}` left) cannot be compared."""
    return not any("${" in value for value in flat.values())


def differing(group: list[dict[str, str]]) -> list[str]:
    """Keys whose value (or presence) is not the same in every config of the group."""
    keys = list(dict.fromkeys(k for flat in group for k in flat))
    return [k for k in keys if len({flat.get(k, MISSING) for flat in group}) > 1]


def split_labels(
    frame: pd.DataFrame, flats: list[dict[str, str]], axis: str
) -> tuple[pd.Series, list[str]]:
    """`axis` labels extended by the config keys that differ between runs of one cell, so only
    repeats of one setting share a cell; the keys are chosen per label (column), the same for
    all its cells. Returns the new labels and every key used."""
    other = ROW if axis == COL else COL
    keys_of: dict[str, list[str]] = {}
    for (_, name), index in frame.groupby([other, axis], sort=False).groups.items():
        group = [flats[i] for i in index if is_resolved(flats[i])]
        keys_of.setdefault(name, [])
        keys_of[name] += [k for k in differing(group) if k not in keys_of[name]]
    labels = [
        f"{name} [" + ", ".join(f"{k}={flats[i].get(k, MISSING)}" for k in keys_of[name]) + "]"
        if keys_of[name]
        else name
        for i, name in enumerate(frame[axis])
    ]
    used = list(dict.fromkeys(k for keys in keys_of.values() for k in keys))
    return pd.Series(labels, index=frame.index), used


def runs_frame(
    runs: list[dict[str, Any]],
    rows: str,
    cols: str,
    metrics: dict[str, str],
    split: str = COL,
) -> pd.DataFrame:
    """One row per run: its row and column labels, each metric (name -> dotted key), status.

    Runs of one (row, column) whose settings differ get `split` (COL or ROW) labels naming the
    differing keys; `frame.attrs["split_keys"]` lists those keys.
    """
    records = [
        {
            ROW: label(setting(run, rows)),
            COL: label(setting(run, cols)),
            **{name: metric_value(run, key) for name, key in metrics.items()},
            STATUS: run_status(run),
            "error": str(run.get("error") or "")
            + (f" (resume: {run['resume_command']})" if run.get("resume_command") else ""),
            "run_dir": str(Path(run["_file"]).parent),
        }
        for run in runs
    ]
    frame = pd.DataFrame.from_records(
        records, columns=[ROW, COL, *metrics, STATUS, "error", "run_dir"]
    )
    frame[split], keys = split_labels(frame, [settings(run) for run in runs], split)
    frame.attrs["split_keys"] = keys
    return frame


def split_note(frame: pd.DataFrame) -> str:
    keys = frame.attrs.get("split_keys") or []
    if not keys:
        return ""
    return "Runs of one cell differ in more than the seed, so cells are split by: " + ", ".join(
        keys
    )


@dataclass
class Grid:
    """A rows x columns table: numeric cell means (for margins) and the text to show."""

    mean: pd.DataFrame
    text: pd.DataFrame


def pivot(frame: pd.DataFrame, value: str, spec: str = ".3f") -> Grid:
    """Cells of `value` by (row, column) in order of appearance; several runs -> mean ± std.

    A cell without a number shows the status of a run that did not finish (`diverged`,
    `failed`), else MISSING, so a hole in the table says why it is there; a cell with a number
    counts the runs beside it that did not finish (`0.900 (+1 failed)`).
    """
    rows, cols = list(pd.unique(frame[ROW])), list(pd.unique(frame[COL]))
    stats = frame.dropna(subset=[value]).pivot_table(
        index=ROW, columns=COL, values=value, aggfunc=["mean", "std", "count"]
    )

    def part(name: str) -> pd.DataFrame:
        return stats.get(name, pd.DataFrame()).reindex(index=rows, columns=cols)

    mean, std, count = part("mean"), part("std"), part("count").fillna(0)
    bad = frame[frame[STATUS] != FINISHED]
    unfinished = bad.groupby([ROW, COL])[STATUS].first()
    bad_counts = bad.groupby([ROW, COL, STATUS]).size()

    def beside(r: str, c: str) -> str:
        """` (+1 failed, +2 running)`: the runs of the cell that left no number."""
        if (r, c) not in unfinished.index:
            return ""
        counts = bad_counts.loc[(r, c)]
        return " (" + ", ".join(f"+{n} {status}" for status, n in counts.items()) + ")"

    def cell(r: str, c: str) -> str:
        n = count.at[r, c]
        if n > 1:
            return f"{mean.at[r, c]:{spec}} ± {std.at[r, c]:{spec}}" + beside(r, c)
        if n == 1:
            return f"{mean.at[r, c]:{spec}}" + beside(r, c)
        return unfinished.get((r, c), MISSING)

    text = pd.DataFrame([[cell(r, c) for c in cols] for r in rows], index=rows, columns=cols)
    return Grid(mean=mean, text=text)


def margin(mean: pd.DataFrame, axis: int, spec: str = ".3f") -> pd.Series:
    """Mean over rows (axis=0) or columns (axis=1) of the cell means, with (n/m) when some
    cells are missing: a mean over fewer cells is not comparable with a full one."""
    total = mean.shape[axis]
    values, counts = mean.mean(axis=axis), mean.notna().sum(axis=axis)

    def text(value: float, n: int) -> str:
        if n == 0:
            return MISSING
        return f"{value:{spec}}" + (f" ({n}/{total})" if n < total else "")

    return pd.Series([text(v, n) for v, n in zip(values, counts, strict=True)], index=values.index)


def with_mean_row(grid: Grid, spec: str = ".3f") -> pd.DataFrame:
    if len(grid.text) < 2:
        return grid.text
    return pd.concat([grid.text, margin(grid.mean, 0, spec).to_frame("mean").T])


def with_mean_column(grid: Grid, spec: str = ".3f") -> pd.DataFrame:
    if grid.text.shape[1] < 2:
        return grid.text
    return grid.text.assign(mean=margin(grid.mean, 1, spec))


def to_markdown(table: pd.DataFrame, corner: str) -> str:
    """Cells are already text: numparse off keeps `0.900` from becoming `0.9`."""
    return (
        table.rename_axis(index=corner, columns=None)
        .reset_index()
        .to_markdown(index=False, disable_numparse=True)
    )


def write_csv(table: pd.DataFrame, corner: str, path: Path) -> None:
    table.rename_axis(index=corner, columns=None).to_csv(path)


def wandb_group(runs: list[dict[str, Any]], folders: list[str]) -> str | None:
    """The W&B group the report joins: the one its runs logged under (recorded in their
    config), else, for one sweep folder, its name (the group train.py gives a multirun's jobs);
    None when the runs span several groups."""
    groups = {lookup(r, "logger.wandb.group") for r in runs if lookup(r, "logger.wandb")}
    if len(groups) == 1 and None not in groups:
        return str(groups.pop())
    if len(folders) == 1 and not groups - {None} and Path(folders[0]).is_dir():
        return Path(folders[0]).name
    return None


def log_to_wandb(
    runs: list[dict[str, Any]], tables: dict[str, pd.DataFrame], title: str, folders: list[str]
) -> bool:
    """Log the tables as W&B Tables when the runs logged to W&B (offline without an API key),
    in the runs' group, so the sweep's dashboard shows its own table (job_type `report`)."""
    wandb_runs = [r for r in runs if isinstance(lookup(r, "logger.wandb"), dict)]
    if not wandb_runs:
        return False
    import wandb

    conf = lookup(wandb_runs[0], "logger.wandb") or {}
    out_dir = Path(wandb_runs[0]["_file"]).parent.parent
    run = wandb.init(
        project=conf.get("project", "ad_lightning"),
        group=wandb_group(wandb_runs, folders),
        job_type="report",
        name=title,
        dir=str(out_dir),
        mode="online" if os.environ.get("WANDB_API_KEY") else "offline",
        config={"folders": folders, "n_runs": len(runs)},
        reinit="finish_previous",
    )
    run.log(
        {
            key: wandb.Table(columns=list(map(str, t.columns)), data=t.values.tolist())
            for key, t in tables.items()
        }
    )
    run.finish()
    return True


def failed_runs(frame: pd.DataFrame, unreported: list[Path]) -> str:
    """Markdown list of the runs that did not finish: where they are and the error they left."""
    bad = frame[frame[STATUS] != FINISHED]
    if bad.empty and not unreported:
        return ""
    lines = [
        f"Runs that did not finish ({len(bad) + len(unreported)} of {len(frame) + len(unreported)}):"
    ]
    for run in bad.to_dict("records"):
        error = run["error"].strip().splitlines()[0][:300] if run["error"].strip() else "no message"
        lines.append(f"- `{run['run_dir']}` ({run[ROW]}, {run[COL]}): {run[STATUS]}: {error}")
    lines += [
        f"- `{job}`: no results.json (crashed before writing it, or still running)"
        for job in unreported
    ]
    return "\n".join(lines)


def benchmark(
    runs: list[dict[str, Any]], folders: list[str], csv_dir: Path
) -> tuple[str, dict[str, pd.DataFrame]]:
    """Methods (model config choice) x categories: a summary of per-method means over the
    categories, then one table per metric, then the runs that failed. Writes benchmark_*.csv."""
    shown = {
        name: entry
        for name, entry in BENCHMARK_METRICS.items()
        if name not in BENCHMARK_OPTIONAL or any(lookup(r, entry[1]) is not None for r in runs)
    }
    frame = runs_frame(
        runs,
        "model",
        "data.category",
        {name: key for name, (_, key, _) in shown.items()},
        split=ROW,  # a method run with other settings is another method row
    )
    methods = list(pd.unique(frame[ROW]))
    done = frame[STATUS].eq(FINISHED).groupby(frame[ROW]).agg(["sum", "size"]).reindex(methods)
    summary = pd.DataFrame(
        {"runs": [f"{d}/{n}" for d, n in zip(done["sum"], done["size"], strict=True)]},
        index=methods,
    )
    tables: dict[str, pd.DataFrame] = {}
    for name, (heading, _, spec) in shown.items():
        grid = pivot(frame, name, spec)
        tables[name] = with_mean_column(grid, spec)
        summary.insert(len(summary.columns) - 1, heading, margin(grid.mean, 1, spec))
    sections = [
        f"benchmark ({len(runs)} runs): mean over categories, (n/m) = categories with a result\n\n"
        + to_markdown(summary, "method")
    ]
    sections += [
        f"{shown[name][0]}\n\n" + to_markdown(table, "method") for name, table in tables.items()
    ]
    sections += [
        text for text in (split_note(frame), failed_runs(frame, find_unreported(folders))) if text
    ]
    csv_dir.mkdir(parents=True, exist_ok=True)
    write_csv(summary, "method", csv_dir / "benchmark_summary.csv")
    for name, table in tables.items():
        write_csv(table, "method", csv_dir / f"benchmark_{name}.csv")
    frame.rename(columns={ROW: "method", COL: "category"}).to_csv(
        csv_dir / "benchmark_runs.csv", index=False
    )
    return "\n\n".join(sections), {
        "benchmark_summary": summary.reset_index(names="method"),
        **{f"benchmark_{name}": t.reset_index(names="method") for name, t in tables.items()},
    }


def default_csv_dir(folders: list[str]) -> Path:
    first = Path(folders[0])
    return first if first.is_dir() else first.parent


@dataclass
class ReportArgs:
    """folders: run or multirun folders, searched for results.json (also given bare).
    metric: metrics.<name> shorthand or a dotted path in results.json, e.g.
    scores.image_l1.auroc, test_label_metrics.f1_at_defect_ratio.
    rows / cols: keys (dotted) of the rows and columns, e.g. data.category; model (the config
    choice), backbone, backbone.blocks, data.contamination.
    csv: CSV path (default: report_<metric>.csv in the first folder); with benchmark=true the
    folder for benchmark_*.csv.
    benchmark: methods x data.category: image / pixel AUROC (and AUPRO), fit s, ms/image,
    failed runs (metric, rows and cols are not used).
    wandb: log the table to W&B when the runs logged there.
    """

    folders: list[str] = field(default_factory=list)
    metric: str = "image_auroc"
    rows: str = "data.category"
    cols: str = "model"
    csv: str | None = None
    benchmark: bool = False
    wandb: bool = True


def parse(argv: list[str] | None) -> ReportArgs:
    """`key=value` as run.py takes them; bare arguments (not flags) are folders."""
    argv = sys.argv[1:] if argv is None else list(argv)
    bare = [a for a in argv if "=" not in a and not a.startswith("-")]
    keys = [a for a in argv if a not in bare]
    args = parse_args(ReportArgs, keys, "ad_lightning.report")
    args.folders = [*bare, *args.folders]
    if not args.folders:
        raise SystemExit("report: no folders; give folders=[DIR,...] or the folders themselves")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse(argv)
    runs = find_results(args.folders)
    if not runs:
        raise SystemExit(f"report: no results.json under {args.folders}")
    if args.benchmark:
        csv_dir = Path(args.csv) if args.csv else default_csv_dir(args.folders)
        markdown, tables = benchmark(runs, args.folders, csv_dir)
        print(f"\n{markdown}\n\nCSV: {csv_dir}/benchmark_*.csv")
        title = "benchmark"
    else:
        frame = runs_frame(runs, args.rows, args.cols, {args.metric: metric_key(args.metric)})
        table = with_mean_row(pivot(frame, args.metric))
        notes = (split_note(frame), failed_runs(frame, find_unreported(args.folders)))
        markdown = "\n\n".join([to_markdown(table, args.rows), *filter(None, notes)])
        print(f"\n{args.metric} ({len(runs)} runs)\n\n{markdown}\n")
        csv_path = (
            Path(args.csv)
            if args.csv
            else default_csv_dir(args.folders) / f"report_{args.metric.replace('.', '_')}.csv"
        )
        write_csv(table, args.rows, csv_path)
        print(f"CSV: {csv_path}")
        tables = {"report": table.rename_axis(index=args.rows, columns=None).reset_index()}
        title = f"report {args.metric} {args.rows} x {args.cols}"
    if args.wandb and log_to_wandb(runs, tables, title, args.folders):
        print("table logged to W&B (job_type=report)")
    return markdown


if __name__ == "__main__":
    main()
