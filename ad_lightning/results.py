"""The typed results of a run: what evaluation hands to train.py, and what results.json holds.

`TestResults` is the output of scoring the test split once (metrics, per-score statistics,
per-image records, kept maps, validation scores, thresholds, timing). The run-level schema
(`RunResults`, written to results.json with a schema version) is built on top of it.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch


@dataclass
class TestResults:
    """One scoring of the test split, gathered over every rank."""

    #: the name in the method's scores that `metrics.image_auroc` reports
    primary_score: str
    #: headline metrics: image_auroc, image_ap, f1_at_false_alarm_rate, pixel_auroc,
    #: pixel_aupro (FPR <= eval.aupro_fpr_limit), ...
    metrics: dict[str, float]
    #: metrics that peek at the test labels (defect-ratio F1), kept apart under leak_free
    test_label_metrics: dict[str, float]
    #: per score name: auroc, ap, at_defect_ratio, at_false_alarm_rate
    scores: dict[str, dict[str, Any]]
    #: one row per test image: path, label, defect_type, each score (and `<score>_normalized`)
    records: list[dict[str, Any]] = field(default_factory=list)
    #: small anomaly maps per image path (fp16), for heat maps
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    #: scores of the normal validation images, per score name
    val_scores: dict[str, list[float]] = field(default_factory=dict)
    #: image and pixel thresholds fitted on normal images (None without validation images)
    thresholds: dict[str, Any] | None = None
    inference_ms_per_image: float = 0.0
    n_images_timed: int = 0
    #: what the metrics leave out and why (results.json's warnings)
    warnings: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        """Dict-style reading (`results["metrics"]`), as the callers of the untyped dict did."""
        if key not in self.__dataclass_fields__:
            raise KeyError(
                f"TestResults has no field {key!r}; fields: {sorted(self.__dataclass_fields__)}"
            )
        return getattr(self, key)


# ---------------------------------------------------------------------------------------------
# results.json: the run-level schema
# ---------------------------------------------------------------------------------------------

#: the version written into every results.json; files without one are migrated (`migrate`)
SCHEMA_VERSION = 2


class SchemaError(ValueError):
    """results.json does not match the schema: names the key, the file and the version."""


class _Absent:
    """A key the run has not written (yet): left out of the JSON, falsy, distinct from null
    (a null `thresholds` or `best_score` is a value; a running run has no `metrics` at all)."""

    _instance: _Absent | None = None

    def __new__(cls) -> _Absent:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT: Any = _Absent()


def _nested(record: type[Record], required: bool = False) -> Any:
    """A field holding another record; `required` ones have no default."""
    if required:
        return field(metadata={"record": record})
    return field(default=ABSENT, metadata={"record": record})


class Record:
    """Base of the results.json records: JSON in and out with every key checked by name, and
    dict-style reading (`results["metrics"]`, `.get`) for callers that read the files' dicts."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is ABSENT:
                continue
            out[f.name] = value.to_json() if isinstance(value, Record) else value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "") -> Any:
        """The record of `data`; `where` is the dotted path of this record in the file."""
        if not isinstance(data, dict):
            raise SchemaError(
                f"key {where.rstrip('.')!r} holds {type(data).__name__}, not an object"
            )
        known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        for key in data:
            if key not in known:
                raise SchemaError(f"unknown key {where + key!r}")
        values: dict[str, Any] = {}
        for name, f in known.items():
            required = f.default is MISSING and f.default_factory is MISSING
            if name not in data:
                if required:
                    raise SchemaError(f"missing key {where + name!r}")
                continue
            record = f.metadata.get("record")
            value = data[name]
            values[name] = record.from_json(value, f"{where}{name}.") if record else value
        return cls(**values)

    def update(self, **values: Any) -> None:
        """Set several fields at once; an unknown name is refused, not added."""
        names = {f.name for f in fields(self)}  # type: ignore[arg-type]
        for key, value in values.items():
            if key not in names:
                raise SchemaError(f"unknown key {key!r} (schema {SCHEMA_VERSION})")
            setattr(self, key, value)

    def __getitem__(self, key: str) -> Any:
        value = getattr(self, key, ABSENT) if key in self._names() else ABSENT
        if value is ABSENT:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key) if key in self._names() else ABSENT
        return default if value is ABSENT else value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._names() and getattr(self, key) is not ABSENT

    @classmethod
    def _names(cls) -> set[str]:
        return {f.name for f in fields(cls)}  # type: ignore[arg-type]


@dataclass
class Contamination(Record):
    """Defective images moved into the training split on purpose (data.contamination)."""

    ratio: float
    n_moved: int
    file: str = ABSENT  # contamination.csv, when images were moved


@dataclass
class DataSummary(Record):
    """Counts and provenance of the data a run read (the datamodule's `summary()`)."""

    name: str
    root: str
    category: str
    image_size: Any  # int or [height, width]
    channels: int
    n_train: int
    n_val: int
    n_test: int
    n_threshold_split: int
    n_test_defective: int
    defect_ratio: float
    has_masks: bool
    mask_note: str
    contamination: Contamination = _nested(Contamination, required=True)
    skipped_files: list[dict[str, Any]]
    odd_images: list[dict[str, Any]]
    size_note: str
    notes: list[str]
    strict: bool | None
    bit_depth: int | None
    registered: str | bool  # "<method> to <reference image>" or False
    #: with registration: the images that could not be aligned (only resized), and why
    registration_failures: list[dict[str, str]] = ABSENT
    #: per split (train, val, test, contaminated, threshold), a SHA-256 of its files' paths
    #: (relative to the category) and sizes: a re-score or resume on other files is refused
    splits: dict[str, str] = ABSENT


@dataclass
class Timings(Record):
    """Seconds of the fit and the test; a re-score keeps the fit's and adds `test_only`."""

    fit_s: float = ABSENT
    feature_pass_s: float = ABSENT
    epoch_s: dict[str, Any] = ABSENT  # EpochTimer.summary(): n, median, first, total
    resumed_from: str | None = ABSENT
    #: of fit_s, the seconds of fit behind the checkpoint resumed from (its own record)
    fit_s_before_resume: float = ABSENT
    test_only: bool = ABSENT
    test_s: float = ABSENT
    inference_ms_per_image: float = ABSENT
    n_images_timed: int = ABSENT
    device: str = ABSENT
    #: the machine share the fit ran on, without which its seconds cannot be compared: torch's
    #: CPU threads, and how many jobs of its sweep ran at once (joblib's n_jobs; 1 otherwise)
    torch_threads: int = ABSENT
    parallel_jobs: int = ABSENT


@dataclass
class CheckpointChoice(Record):
    """Which checkpoint was scored and why."""

    scored: str | None
    selection: str = ABSENT
    best_score: float | None = ABSENT
    epochs: int = ABSENT


@dataclass
class RunResults(Record):
    """What results.json holds. Written at the start (status running) and at every end:
    finished, failed, diverged or interrupted. Keys a run has not reached are absent."""

    status: str  # running | finished | failed | diverged | interrupted
    run_dir: str = ABSENT
    model: str = ABSENT  # the model class
    protocol: str = ABSENT
    choices: dict[str, str] = ABSENT  # config group choices (model=ae_ssim, ...)
    data: DataSummary = _nested(DataSummary)
    versions: dict[str, str] = ABSENT
    config: dict[str, Any] = ABSENT  # the resolved config (unresolved for a failed start)
    warnings: list[str] = ABSENT
    previous_status: str | None = ABSENT  # resume / test-only: the run folder's status before
    rescore_of: str = ABSENT  # test-only: the run folder scored again
    restart_command: str = ABSENT
    timings: Timings = _nested(Timings)
    checkpoint: CheckpointChoice = _nested(CheckpointChoice)
    method: dict[str, Any] = ABSENT  # model.describe()
    primary_score: str = ABSENT
    metrics: dict[str, float] = ABSENT
    test_label_metrics: dict[str, float] = ABSENT
    scores: dict[str, dict[str, Any]] = ABSENT
    val_scores: dict[str, list[float]] = ABSENT
    thresholds: dict[str, Any] | None = ABSENT
    model_file: str = ABSENT
    error: str = ABSENT
    last_checkpoint: str = ABSENT  # diverged: the checkpoint before the divergence
    interrupted_at: dict[str, Any] = ABSENT  # stage, epoch, global_step, by, mid_epoch, checkpoint
    resume_command: str | None = ABSENT
    note: str = ABSENT

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **super().to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "") -> RunResults:
        """Read a results.json dict of any version (older ones through `migrate`)."""
        version = data.get("schema_version")
        try:
            if version is None:
                data = migrate(data)
            elif version != SCHEMA_VERSION:
                raise SchemaError(
                    f"schema_version {version} is not one this version reads "
                    f"({SCHEMA_VERSION}); upgrade ad_lightning"
                )
            body = {k: v for k, v in data.items() if k != "schema_version"}
            return super().from_json(body, where)
        except SchemaError as err:
            raise SchemaError(f"results.json: {err} (schema {SCHEMA_VERSION})") from None


#: data summary keys added after the first version, with what an older run implied
_LATER_DATA_KEYS: dict[str, Any] = {
    "n_threshold_split": 0,  # no threshold split existed
    "skipped_files": [],
    "odd_images": [],
    "size_note": "",
    "notes": [],
    "strict": None,  # not recorded
    "bit_depth": None,  # not recorded
    "registered": False,
}


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """An older results.json (no schema_version) as the current schema has it, in one place:

    - no `status`: only finished runs wrote results.json then;
    - the defect-ratio F1 (it peeks at the test labels) sat in `metrics` before it got
      `test_label_metrics` of its own;
    - the data summary lacked the keys added since (`_LATER_DATA_KEYS`).
    """
    if data.get("schema_version") is not None:
        return data
    new = dict(data)
    new["schema_version"] = SCHEMA_VERSION
    new.setdefault("status", "finished")
    metrics = new.get("metrics")
    if isinstance(metrics, dict) and "test_label_metrics" not in new:
        moved = {k: metrics[k] for k in ("f1_at_defect_ratio",) if k in metrics}
        if moved:
            new["test_label_metrics"] = moved
    if isinstance(new.get("data"), dict):
        new["data"] = {**_LATER_DATA_KEYS, **new["data"]}
    return new


def read_results(path: Path | str) -> RunResults:
    """The results.json at `path` (a file or its run folder), migrated and checked; a
    SchemaError names the file and the key."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        return RunResults.from_json(json.loads(path.read_text()))
    except SchemaError as err:
        raise SchemaError(str(err).replace("results.json:", f"{path}:", 1)) from None
