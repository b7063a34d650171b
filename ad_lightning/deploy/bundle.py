"""Self-contained model files: everything needed to score an image, and nothing else.

A run writes `RUN_DIR/model.pt` after testing, from the checkpoint it scored. The file
holds the method's resolved config (backbone name, blocks, sizes), the whole state dict
(backbone weights included, so no weight package or download is needed on the line), the
input preprocessing (size, channels, normalisation, the fixed range of high-bit images
(`data.bit_depth`), the registration reference image), what the training images were
(their majority size, mode and bit depth, which predict compares inputs with), the
thresholds learned from normal images, and the facts of the run. It holds only tensors and
plain Python values, so it loads with `torch.load(weights_only=True)`: no pickled code.
Loading needs no dataset and no Hydra config (only `hydra.utils.instantiate` on the
stored config, after deploy/trusted.py has checked that it builds only our own methods
and backbones: a model file from elsewhere cannot call anything else).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch

from ad_lightning.data.io import ImageInfo, inspect_image
from ad_lightning.data.registration import register_to_reference
from ad_lightning.data.transforms import build_transform, normalization
from ad_lightning.deploy.scoring import ScoringGraph
from ad_lightning.deploy.training_images import TrainingImages
from ad_lightning.deploy.trusted import trusted_model_config
from ad_lightning.models.base import AnomalyModule
from ad_lightning.nn.digest import state_digest
from ad_lightning.safe_load import load_weights_only

FORMAT = "ad_lightning.model/1"
FILE_NAME = "model.pt"


@dataclass
class Preprocess:
    """How an image file becomes the model's input, as in the run's test loader."""

    image_size: tuple[int, int]
    channels: int
    normalize: str
    register_method: str | None = None
    reference: torch.Tensor | None = None  # H x W x C uint8, when images were registered
    # data.bit_depth: 12-bit camera images must be scaled by 4095 on the line as in training;
    # None (also for model files from before the key) is the file type's own range
    bit_depth: int | None = None
    # the training images as stored (size, mode, bit depth), not how inputs are converted:
    # predict names inputs unlike them; None for model files from before the key. Left out of
    # digest(): it changes no score
    training_images: TrainingImages | None = None

    @classmethod
    def from_datamodule(cls, datamodule: Any) -> Preprocess:
        size = datamodule.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        reference = getattr(datamodule, "reference", None)
        # the images the model learned from, as the datamodule's audit read them at setup
        infos = getattr(datamodule, "image_infos", {})
        trained = [
            infos[s.path]
            for s in [
                *getattr(datamodule, "train_samples", []),
                *getattr(datamodule, "val_samples", []),
            ]
            if s.path in infos
        ]
        return cls(
            (int(h), int(w)),
            int(datamodule.channels),
            str(datamodule.normalize),
            datamodule.register_method if reference is not None else None,
            None if reference is None else torch.from_numpy(np.ascontiguousarray(reference)),
            getattr(datamodule, "bit_depth", None),
            TrainingImages.of(trained),
        )

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        return normalization(self.normalize, self.channels)

    def align(self, image: np.ndarray) -> tuple[np.ndarray, str]:
        """A decoded H x W x C uint8 image in the frame the model saw in training: registered
        to the reference image when the run registered its images, else unchanged; and why it
        could not be registered ("" when it was, or needs none), as training only resizes it."""
        if self.reference is None:
            return image, ""
        return register_to_reference(image, self.reference.numpy(), self.register_method)

    def to_input(self, aligned: np.ndarray) -> torch.Tensor:
        """An aligned image -> [C, H, W] float in [0, 1] at the model's size."""
        return build_transform(self.image_size, self.channels, "none")(image=aligned)["image"]

    def read(self, path: str | Path) -> tuple[np.ndarray, ImageInfo, str]:
        """An image file -> (aligned H x W x C uint8, what the file is: size, mode, bit depth,
        why registration failed or ""), decoded as training decoded it; raises ImageReadError
        naming the file."""
        image, info = inspect_image(Path(path), self.channels, self.bit_depth)
        aligned, failure = self.align(image)
        return aligned, info, failure

    def load(self, path: str | Path) -> torch.Tensor:
        """An image file -> model input; raises ImageReadError naming the file."""
        return self.to_input(self.read(path)[0])


@dataclass
class Bundle:
    """A loaded model file."""

    model: AnomalyModule
    preprocess: Preprocess
    thresholds: dict[str, Any] | None
    info: dict[str, Any]
    path: Path

    def graph(self) -> ScoringGraph:
        return ScoringGraph(self.model, self.preprocess).eval()

    def digest(self) -> str:
        """What the exported graph's scores are computed from: the weights and buffers and
        the preprocessing. The graph records it, so that a graph left beside a model file
        rewritten since is refused. The post-processor's thresholds are left out: a graph
        that decides at other ones is refused by its verdicts (`check_graph_verdicts`), and
        its scores stand at a threshold given on the command line."""
        pre = self.preprocess
        state = {
            k: v for k, v in self.model.state_dict().items() if not k.startswith("post_processor.")
        }
        if pre.reference is not None:
            state["preprocess.reference"] = pre.reference
        facts = [list(pre.image_size), pre.channels, pre.normalize, pre.register_method]
        return state_digest(state, json.dumps([*facts, pre.bit_depth]))

    def image_threshold(self) -> float | None:
        return None if not self.thresholds else self.thresholds["image"]["value"]

    def pixel_threshold(self) -> float | None:
        pixel = (self.thresholds or {}).get("pixel")
        return None if not pixel else pixel["value"]


def _mark_backbones_bundled(node: Any) -> Any:
    """The stored config with every FeatureExtractor told its weights come from the file."""
    if isinstance(node, dict):
        out = {k: _mark_backbones_bundled(v) for k, v in node.items()}
        if str(out.get("_target_", "")).endswith("FeatureExtractor"):
            out["bundled"] = True
        return out
    if isinstance(node, list):
        return [_mark_backbones_bundled(v) for v in node]
    return node


def plain(value: Any) -> Any:
    """Plain Python values only (version objects become strings), for weights-only loading."""
    return json.loads(json.dumps(value, default=str))


def save_bundle(
    path: Path,
    model: AnomalyModule,
    model_config: dict[str, Any],
    preprocess: Preprocess,
    thresholds: dict[str, Any] | None,
    info: dict[str, Any],
) -> Path:
    """Write the model file atomically (a killed write never leaves a half file)."""
    payload = {
        "format": FORMAT,
        "model_config": plain(model_config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "preprocess": asdict(preprocess),
        "thresholds": plain(thresholds),
        "primary_score": model.primary_score,
        "info": plain(info),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def _run_status(folder: Path) -> dict[str, Any]:
    """results.json of a run folder, or {} when there is none or it cannot be read."""
    try:
        results = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def missing_model_advice(folder: Path) -> str:
    """What a run folder without a model file needs, from what the folder holds: its last
    checkpoint can be tested (test_only writes a model file into RUN/rescore-N); without one the run must be
    run again."""
    results = _run_status(folder)
    status = results.get("status")
    ended = f" (results.json: status {status}: {results.get('error', 'no error recorded')})"
    ended = ended if status in ("failed", "diverged") else ""
    if (folder / "checkpoints" / "last.ckpt").exists():
        return (
            f"{folder} holds no {FILE_NAME}: runs write it after testing{ended}. Test its last "
            f"checkpoint, which writes one: `python run.py test_only={folder}` (the run's own "
            f"config is used; the model file lands in {folder}/rescore-N/), then pass that folder."
        )
    if status in ("failed", "diverged"):
        return (
            f"{folder} holds no {FILE_NAME}: its run failed before training produced a "
            f"checkpoint{ended}, so there is no model to score with. Fix the cause and run it "
            "again (python run.py with that run's overrides)."
        )
    return (
        f"{folder} holds no {FILE_NAME} and no checkpoints/last.ckpt"
        f"{f' (results.json: status {status})' if status else ''}: a run writes its model "
        "file after testing; this run has not produced one. Wait for it to finish, or run it "
        "again."
    )


def bundle_path(model: str | Path) -> Path:
    """A run folder or a model file -> the model file; a clear error when there is none."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / FILE_NAME
        if not path.exists():
            raise FileNotFoundError(missing_model_advice(path.parent))
    elif not path.exists():
        raise FileNotFoundError(f"model={model}: no such run folder or model file")
    return path


def restore_thresholds(model: AnomalyModule, thresholds: dict[str, Any] | None) -> None:
    """Give the loaded model's post-processor the file's thresholds dict. A file written before
    the post-processor existed has no threshold buffers in its state dict, only the dict: its
    buffers are set from the dict, so that its graph decides (and exports verdicts) too. A newer
    file's buffers are the ones it was tested with and stay as loaded."""
    post = model.post_processor
    if post.is_set("image_threshold") or post.is_set("pixel_threshold"):
        post.thresholds = thresholds
    else:
        post.set_thresholds(thresholds)


def load_bundle(model: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the method from a model file (or a run folder holding one) in eval mode."""
    path = bundle_path(model)
    try:
        payload = load_weights_only(path)
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"cannot read the model file {path} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no message'}): it is empty, truncated "
            "or not a model file; copy RUN_DIR/model.pt again"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not an ad_lightning model file (format {FORMAT}); Lightning checkpoints (checkpoints/*.ckpt) are not model files: pass the run folder"
        )
    config = trusted_model_config(payload.get("model_config"), path)  # before anything is built
    built = hydra.utils.instantiate(_mark_backbones_bundled(config))
    built.load_state_dict(payload["state_dict"], strict=True)
    lacking = built.unfitted_for_scoring()
    if lacking:
        raise ValueError(
            f"{path}: the model lacks {lacking}, which only a run's test fits; its scores "
            "would be wrong. Score the run again (python run.py test_only=RUN_DIR) to write a "
            "fitted model file."
        )
    restore_thresholds(built, payload["thresholds"])
    pre = payload["preprocess"]
    preprocess = Preprocess(
        tuple(pre["image_size"]),
        pre["channels"],
        pre["normalize"],
        pre["register_method"],
        pre["reference"],
        pre.get("bit_depth"),
        TrainingImages.from_record(pre.get("training_images")),
    )
    return Bundle(built.to(device).eval(), preprocess, payload["thresholds"], payload["info"], path)
