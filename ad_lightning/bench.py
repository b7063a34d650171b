"""Speed and memory of every method on this machine: `python -m ad_lightning.bench` (`make bench`).

Per method, at one image size and backbone, on the current device (CUDA if present, else CPU):
training images per second, inference ms per image at batch 1 and at batch 32, the frozen
backbone's own forward time, peak memory, and the same inference through the ONNX export
on the CPU engines of ad_lightning/deploy/engines.py, side by side: onnxruntime, and OpenVINO
at f32 and at bf16, each with its largest |score - PyTorch score| (OpenVINO's bf16 is faster
on CPUs with bf16 instructions and moves scores by up to 1 %, so predict uses f32 unless
told otherwise). Figures are printed as a markdown table and written to
`out/bench.csv`; they are measurements of this machine, not test assertions.

How: each method runs in a child process of its own, one after another, so the process's
peak memory (resident, or the CUDA allocator's peak) is that method's alone: training, export
and timing together, Python and the libraries included. The child trains a short run with
`train.run` (gradient methods: a few whole epochs, validation and checkpointing as usual),
loads the run's model.pt, and times the scoring graph on random images of the model's size:
warm-up calls first (allocator, caches, lazy initialisation), then the median of `repeats`
timed calls. A method that fails is a row with its error; the others still run.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytorch_lightning as pl
import torch

from ad_lightning.deploy.cli import parse_args, setup_logging
from ad_lightning.deploy.engines import OPENVINO_PRECISIONS
from ad_lightning.models.registry import list_methods, method_info

log = logging.getLogger("ad_lightning.bench")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# anomalib's PatchCore (the peer in experiments/benchmark) scored 60 ms/image at 256 px,
# EfficientNet-Lite0, on the 2-core CPU machine those figures come from. Measured there only:
# x_peer_patchcore means something only on that machine, at image_size=256, on the CPU.
PEER_PATCHCORE_MS = 60.0
# the goal for methods on a frozen backbone: inference at most this multiple of the backbone's
# best own forward time
BACKBONE_GOAL = 1.3
LARGE_BATCH = 32


def is_preset(name: str) -> bool:
    """A paper's exact preset of a method that has its own config (skip_dfr_paper)."""
    return name.endswith(("_paper", "_original"))


def default_models() -> list[str]:
    """Every method in conf/model, without the papers' exact presets (*_paper, *_original)
    and the GANs, whose DCGAN stacks at 256 px train for more than 15 minutes each on 2 CPU
    cores (measured); `make bench` times them at 64 px in a second call (AnoGAN with 50 of
    its paper's 500 latent steps per test image)."""
    return [
        name for name in list_methods() if not is_preset(name) and method_info(name).family != "gan"
    ]


@dataclass
class BenchArgs:
    """Train each method briefly and time it (PyTorch, onnxruntime, OpenVINO); print a table
    and write out/bench.csv. Each method runs in its own process, one after another."""

    # conf/model names; default: every method but the *_paper / *_original presets
    models: list[str] = field(default_factory=default_models)
    image_size: int = 256  # input size of every method (data.image_size)
    backbone: str = "efficientnet_lite0"  # conf/backbone name (methods on a frozen backbone)
    data: str = "synthetic"  # conf/data name: synthetic (embedded), folder, mvtec, ...
    root: str | None = None  # data.root (folder datasets)
    category: str | None = None  # data.category; default texture on synthetic data
    train_steps: int = 20  # gradient methods: training batches at least, in whole epochs
    min_epochs: int = 3  # gradient methods: epochs at least (the median skips the slow first)
    repeats: int = 10  # timed calls per figure; the median is reported
    warmup: int = 2  # untimed calls before them
    # per figure: warm-up and timing stop once this many seconds are spent (one call at least)
    budget_s: float = 30.0
    # batch 32 is skipped when one call would take longer than this (estimated from batch 1)
    max_call_s: float = 60.0
    onnx: bool = True  # also export to ONNX and time it with onnxruntime (CPU)
    openvino: bool = True  # and with OpenVINO (CPU), at f32 and at bf16 (needs onnx=true)
    # extra Hydra overrides for every method's run, e.g. [model.latent_steps=50]
    overrides: list[str] = field(default_factory=list)
    timeout_s: float = 7200.0  # a method still running after this is stopped, recorded as failed
    # bench.csv, and per method <method>/ (run/, row.json, bench.log), replaced on each bench
    out: str = "outputs/bench"
    child: str | None = None  # internal: measure only this method, in this process (the parent's)


# ---- the measured facts of this machine ----------------------------------------------------


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()}"


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux VmHWM, the high-water mark of this
    program's own address space: ru_maxrss would report the parent's peak when that is higher,
    as Linux carries it across fork + exec (measured). Elsewhere ru_maxrss (macOS: bytes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def time_per_image(call: Callable[[], Any], batch: int, args: BenchArgs, cuda: bool) -> float:
    """Median ms per image over timed calls of `call` (a batch of `batch` images), after
    warm-up calls; both stop early once `args.budget_s` is spent (one call at least)."""

    def once() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    spent = 0.0
    for _ in range(max(args.warmup, 1)):
        spent += once()
        if spent > args.budget_s:
            break
    times: list[float] = []
    while len(times) < max(args.repeats, 1) and (not times or sum(times) < args.budget_s):
        times.append(once())
    return 1000.0 * statistics.median(times) / batch


def grad_context(needs_grad: bool) -> AbstractContextManager[Any]:
    """inference_mode for one-pass scoring; no_grad for methods whose score turns autograd on
    itself (AnoGAN's latent search in `score_batch`, which inference_mode tensors would refuse)."""
    return torch.no_grad() if needs_grad else torch.inference_mode()


def measure_batches(
    name: str,
    run_batch: Callable[[torch.Tensor], Any],
    shape: tuple[int, int, int],
    args: BenchArgs,
    row: dict[str, Any],
    device: torch.device,
    needs_grad: bool = False,
) -> None:
    """row[name_ms_b1] and row[name_ms_b32] for `run_batch` on random [0, 1] images."""
    generator = torch.Generator().manual_seed(0)
    cuda = device.type == "cuda"
    with grad_context(needs_grad):
        single = torch.rand(1, *shape, generator=generator).to(device)
        row[f"{name}_ms_b1"] = time_per_image(lambda: run_batch(single), 1, args, cuda)
        estimate = row[f"{name}_ms_b1"] * LARGE_BATCH / 1000.0
        if estimate > args.max_call_s:
            row.setdefault("notes", []).append(
                f"{name} batch {LARGE_BATCH} skipped (~{estimate:.0f} s per call)"
            )
            return
        large = torch.rand(LARGE_BATCH, *shape, generator=generator).to(device)
        row[f"{name}_ms_b{LARGE_BATCH}"] = time_per_image(
            lambda: run_batch(large), LARGE_BATCH, args, cuda
        )


def best_ms(row: dict[str, Any], *names: str) -> float:
    """The fastest per-image time among the figures `names` (NaN if none was measured)."""
    values = [
        row[f"{n}_ms_b{b}"]
        for n in names
        for b in (1, LARGE_BATCH)
        if isinstance(row.get(f"{n}_ms_b{b}"), float)
    ]
    return min(values) if values else math.nan


# ---- one method, in a child process --------------------------------------------------------


class StepBudget(pl.Callback):
    """Stop a gradient fit at the end of the first epoch by which `batches` training batches
    and `min_epochs` epochs are done: whole epochs only, so each epoch's validation and
    checkpoint happen as usual and every epoch time covers the same images."""

    def __init__(self, batches: int, min_epochs: int) -> None:
        self.batches = batches
        self.min_epochs = min_epochs
        self.seen = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self.seen += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.seen >= self.batches and trainer.current_epoch + 1 >= self.min_epochs:
            trainer.should_stop = True


def compose_run_config(method: str, args: BenchArgs, run_dir: Path, cuda: bool) -> Any:
    """The Hydra config of a short run of `method`, as run.py would build it."""
    import hydra.utils
    from hydra import compose, initialize_config_dir

    category = args.category or ("texture" if args.data == "synthetic" else None)
    overrides = [
        f"model={method}",
        f"backbone={args.backbone}",
        f"data={args.data}",
        f"data.image_size={args.image_size}",
        f"trainer={'gpu' if cuda else 'cpu'}",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        f"paths.output_dir={run_dir}",
    ]
    if args.root:
        overrides.append(f"data.root={args.root}")
    if category:
        overrides.append(f"data.category={category}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
        if hydra.utils.get_class(cfg.model._target_).trains_by_gradient:
            # a fixed budget instead of the method's own epochs or steps; the cap on epochs
            # only guards against an endless fit (every epoch has one batch at least)
            budget = max(args.train_steps, args.min_epochs)
            overrides += [
                "trainer.max_steps=-1",
                f"trainer.max_epochs={budget}",
                f"+callbacks.bench_budget={{_target_:ad_lightning.bench.StepBudget,"
                f"batches:{args.train_steps},min_epochs:{args.min_epochs}}}",
            ]
        # statistics methods fit in one pass whatever the trainer says
        return compose("config", overrides=[*overrides, *args.overrides])


def train_figures(results: dict[str, Any], row: dict[str, Any]) -> None:
    """Training throughput from results.json: images of one epoch / median epoch seconds.
    Methods on stored features (Skip-DFR, DFR) read the backbone's features from a store
    filled once per fit: that one-off pass is feature_pass_s, not part of the epochs.
    Statistics methods have one epoch, the collection pass; what they build from it
    afterwards (PatchCore's coreset, PaDiM's inverses) is in fit_s only."""
    timings = results.get("timings", {})
    epochs = timings.get("epoch_s", {})
    n_train = results.get("data", {}).get("n_train")
    row.update(
        n_train=n_train,
        epochs=epochs.get("n"),
        fit_s=timings.get("fit_s"),
        feature_pass_s=timings.get("feature_pass_s"),
    )
    if n_train and epochs.get("median"):
        row["train_img_s"] = n_train / epochs["median"]


def measure_method(method: str, args: BenchArgs, folder: Path) -> dict[str, Any]:
    """Train `method` briefly into folder/run, then time it; the row for the table."""
    from ad_lightning.backbones.features import FeatureExtractor
    from ad_lightning.deploy.bundle import load_bundle
    from ad_lightning.deploy.engines import onnx_engine, onnx_outputs
    from ad_lightning.deploy.export import NotExportable, export_onnx, trace_to_onnx
    from ad_lightning.train import run

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    row: dict[str, Any] = {
        "method": method,
        "device": device_name(),
        "threads": torch.get_num_threads(),
        "image_size": args.image_size,
        "backbone": args.backbone,
    }
    errors: list[str] = []
    try:
        run_dir = folder / "run"
        results = run(compose_run_config(method, args, run_dir, cuda))
        train_figures(results, row)

        bundle = load_bundle(run_dir, device)
        model, pre = bundle.model, bundle.preprocess
        shape = (pre.channels, *pre.image_size)
        graph = bundle.graph().to(device)  # its normalisation buffers start on the CPU
        measure_batches("torch", graph, shape, args, row, device, model.score_needs_grad)

        backbone = getattr(model, "backbone", None)
        if isinstance(backbone, FeatureExtractor):  # the frozen backbone alone, same protocol
            measure_batches("backbone", backbone, (3, *pre.image_size), args, row, device)

        if args.onnx and model.export_blocker:
            row.setdefault("notes", []).append(f"no ONNX: {model.export_blocker}")
        elif args.onnx:
            try:  # export moves the model to the CPU: after the PyTorch figures
                parity = export_onnx(bundle, run_dir / "model.onnx")
                row["onnx_max_abs_diff"] = parity["max_abs_diff_score"]
                engine = onnx_engine(run_dir / "model.onnx")
                measure_batches("onnx", lambda x: engine(x, []), shape, args, row, cpu())
                if args.openvino:
                    try:
                        measure_openvino(bundle, run_dir / "model.onnx", args, row)
                    except Exception as err:  # noqa: BLE001 - the other figures stand
                        log.exception("OpenVINO of %s failed", method)
                        errors.append(one_line(f"openvino: {type(err).__name__}: {err}"))
                if isinstance(backbone, FeatureExtractor):
                    example = torch.rand(2, 3, *pre.image_size)
                    trace_to_onnx(backbone.cpu(), example, run_dir / "backbone.onnx", ["features"])
                    backbone_graph = onnx_outputs(run_dir / "backbone.onnx")  # no scores
                    measure_batches(
                        "backbone_onnx",
                        backbone_graph,
                        (3, *pre.image_size),
                        args,
                        row,
                        cpu(),
                    )
            except NotExportable as err:
                row.setdefault("notes", []).append(f"no ONNX: {err}")
            except Exception as err:  # noqa: BLE001 - the PyTorch figures stand
                log.exception("ONNX of %s failed", method)
                errors.append(one_line(f"onnx: {type(err).__name__}: {err}"))

        method_best = best_ms(row, "torch", "onnx")
        if isinstance(backbone, FeatureExtractor):
            row["x_backbone"] = method_best / best_ms(row, "backbone", "backbone_onnx")
        row["x_peer_patchcore"] = method_best / PEER_PATCHCORE_MS
    except Exception as err:  # noqa: BLE001 - recorded as the method's row
        log.error("%s failed:\n%s", method, traceback.format_exc())
        errors.insert(0, one_line(f"{type(err).__name__}: {err}"))
    row["peak_rss_mb"] = peak_rss_mb()
    row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else row["peak_rss_mb"]
    row["notes"] = "; ".join(row.get("notes", []))
    row["error"] = "; ".join(errors)
    return row


def openvino_name(precision: str) -> str:
    """The figures' prefix: `openvino` at f32 (predict's default), `openvino_bf16`."""
    return "openvino" if precision == "f32" else f"openvino_{precision}"


def measure_openvino(bundle: Any, graph: Path, args: BenchArgs, row: dict[str, Any]) -> None:
    """The exported graph on OpenVINO at each precision: its largest |score - PyTorch score|
    on the export's check images (4 random images, seed 1), then its timings."""
    from ad_lightning.deploy.engines import openvino_engine
    from ad_lightning.deploy.export import parity

    pre = bundle.preprocess
    images = torch.rand(
        4, pre.channels, *pre.image_size, generator=torch.Generator().manual_seed(1)
    )
    shape = (pre.channels, *pre.image_size)
    for precision in OPENVINO_PRECISIONS:
        name = openvino_name(precision)
        engine = openvino_engine(graph, precision)
        row[f"{name}_max_abs_diff"] = parity(bundle, engine, images)["max_abs_diff_score"]
        measure_batches(name, lambda x, run=engine: run(x, []), shape, args, row, cpu())


def cpu() -> torch.device:
    return torch.device("cpu")


def one_line(text: str) -> str:
    """An error message on one line, for the CSV and the table."""
    return " ".join(text.split())


# ---- the parent: one child per method, one after another -------------------------------------

COLUMNS = [
    "method",
    "device",
    "threads",
    "image_size",
    "backbone",
    "n_train",
    "epochs",
    "train_img_s",
    "fit_s",
    "feature_pass_s",
    "torch_ms_b1",
    "torch_ms_b32",
    "onnx_ms_b1",
    "onnx_ms_b32",
    "openvino_ms_b1",
    "openvino_ms_b32",
    "openvino_bf16_ms_b1",
    "openvino_bf16_ms_b32",
    "backbone_ms_b1",
    "backbone_ms_b32",
    "backbone_onnx_ms_b1",
    "backbone_onnx_ms_b32",
    "x_backbone",
    "x_peer_patchcore",
    "peak_mem_mb",
    "peak_rss_mb",
    "onnx_max_abs_diff",
    "openvino_max_abs_diff",
    "openvino_bf16_max_abs_diff",
    "notes",
    "error",
]
# the printed table: device, threads and backbone are printed once above it
SHOWN = [
    c
    for c in COLUMNS
    if c not in ("device", "threads", "backbone", "n_train", "epochs", "peak_rss_mb")
]


def run_child(method: str, args: BenchArgs, argv: list[str], folder: Path) -> dict[str, Any]:
    """Measure `method` in a fresh Python process; its output goes to folder/bench.log."""
    if folder.is_dir():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    logfile = folder / "bench.log"
    command = [sys.executable, "-m", "ad_lightning.bench", *argv, f"child={method}"]
    try:
        with logfile.open("w") as f:
            done = subprocess.run(
                command, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout_s, check=False
            )
        error = "" if done.returncode == 0 else f"child exited with status {done.returncode}"
    except subprocess.TimeoutExpired:
        error = f"stopped after timeout_s={args.timeout_s:.0f} s"
    row_file = folder / "row.json"
    if row_file.exists():
        return json.loads(row_file.read_text())
    tail = logfile.read_text(errors="replace").strip().splitlines()[-3:]
    return {"method": method, "error": one_line(f"{error}: {' | '.join(tail)} (log: {logfile})")}


def table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in frame:
            frame[column] = math.nan if column not in ("notes", "error") else ""
    return frame[COLUMNS]


def print_table(frame: pd.DataFrame, csv_path: Path) -> None:
    shown = frame[SHOWN].copy()
    for column in ("notes", "error"):
        shown[column] = shown[column].fillna("").astype(str).str.slice(0, 90)
    shown["peak_mem_mb"] = shown["peak_mem_mb"].round().astype("Int64")  # not 1.17e+03
    print(f"\ndevice: {device_name()}; torch threads: {torch.get_num_threads()}")
    shown = shown.astype(object).where(shown.notna(), None)  # not measured: "-", not nan
    print(shown.to_markdown(index=False, floatfmt=".3g", missingval="-"))
    print(
        f"\nx_backbone: method's best ms/image (PyTorch or ONNX, batch 1 or {LARGE_BATCH}) over "
        f"the backbone's best own forward; goal <= {BACKBONE_GOAL}. x_peer_patchcore: the same "
        f"over anomalib PatchCore's {PEER_PATCHCORE_MS:.0f} ms/image (256 px, the 2-core CPU "
        "machine only); goal < 1."
    )
    feature_based = frame[frame["x_backbone"].notna()]
    misses = [
        f"{r.method} (x{r.x_backbone:.2f} backbone, x{r.x_peer_patchcore:.2f} peer)"
        for r in feature_based.itertuples()
        if r.x_backbone > BACKBONE_GOAL or r.x_peer_patchcore >= 1.0
    ]
    if len(feature_based):
        print("feature-based methods off the goal: " + (", ".join(misses) or "none"))
    print(f"written: {csv_path}")


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(BenchArgs, argv, "ad_lightning.bench")
    out = Path(args.out).expanduser()
    if args.child:  # one method, in this process
        (out / args.child).mkdir(parents=True, exist_ok=True)
        row = measure_method(args.child, args, out / args.child)
        (out / args.child / "row.json").write_text(json.dumps(row, indent=2, default=str))
        return
    unknown = sorted(set(args.models) - set(list_methods()))
    if unknown:
        raise SystemExit(f"ad_lightning.bench: no conf/model for {unknown}")
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "bench.csv"
    rows = []
    for i, method in enumerate(args.models, 1):
        log.info("[%d/%d] %s (log: %s)", i, len(args.models), method, out / method / "bench.log")
        start = time.perf_counter()
        rows.append(run_child(method, args, argv, out / method))
        log.info(
            "[%d/%d] %s: %.0f s%s",
            i,
            len(args.models),
            method,
            time.perf_counter() - start,
            f"; error: {rows[-1]['error']}" if rows[-1].get("error") else "",
        )
        table(rows).to_csv(csv_path, index=False)  # after every method: partial results stay
    print_table(table(rows), csv_path)
    failed = [row["method"] for row in rows if row.get("error")]
    if failed:  # the table stands; the command must not pass for them
        raise SystemExit(f"ad_lightning.bench: {len(failed)} methods failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
