"""Skip-DFR ablation on the shared real categories, on cached backbone features.

The backbone is frozen, so its block maps of every train / validation / test image are
computed once per category (the pipeline's DataModule, split and transforms, seed 0) and
cached; each variant then trains only the AE and scores from the cache, which makes a cell
of the ablation table cost the AE's training instead of a whole run. The protocol follows
`python run.py model=skip_dfr`: standardisation from training features, Adam on random
batches of the training features, the checkpoint with the lowest validation loss (checked
once per epoch), combined-distance scales from the validation maps, maps upsampled to the
image and smoothed, pixel AUROC over the test masks as the loader gives them.

    python experiments/skip_dfr/ablate.py cache                       # once per machine
    python experiments/skip_dfr/ablate.py run NAME key=value ...      # one variant, 3 categories
    python experiments/skip_dfr/ablate.py table                       # every variant run so far

Results: outputs/skip_dfr_ablation/<NAME>.json (one row per category), and beside it
<NAME>.scores.pt, every test and validation image's map score (and global score) per category,
which experiments/skip_dfr/global_gate.py combines offline. `backbone=` caches and trains on
another conf/backbone; `amp=bf16` / `cl=true` train under bf16 autocast / channels_last.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchmetrics.functional.classification import binary_auroc

from ad_lightning.metrics.aupro import aupro
from ad_lightning.metrics.evaluator import pixel_auroc
from ad_lightning.models.skip_dfr import widths_for
from ad_lightning.nn.skip_ae import SkipAutoencoder
from ad_lightning.nn.smoothing import upsample_and_smooth

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "datasets"
OUT = ROOT / "outputs" / "skip_dfr_ablation"
CATEGORIES = {
    "tire": "mvtec3d_rgb",
    "juice_bottle": "mvtec_loco_partial",
    "magnetic_tile": "magnetic_tile",
}

DEFAULTS: dict[str, Any] = {
    "steps": 1000,  # Adam steps
    "batch": 8,
    "lr": 1e-3,
    "feature_size": 32,
    "resize": "bilinear",  # how larger block maps reach the grid: bilinear (the pipeline's) | area
    "pool": 0,  # k x k average pooling of each block's map before resizing (0 = off)
    "width_ratio": 0.5,
    "skips": "partial",
    "noise": 0.0,  # training-only Gaussian noise on the AE input, in standardised units
    "dropout": 0.0,  # training-only dropout of the AE input (Dinomaly's noisy bottleneck); target clean
    "blob": 0.0,  # > 0: training-only local corruption, one random rectangle per map (target clean)
    "blob_kind": "noise",  # noise: + blob x N(0, 1) | paste: features of another map of the batch
    "blob_max": 8,  # largest rectangle side, in grid positions (the smallest is 2)
    "hard_mining": 0.0,  # fraction of best-reconstructed positions whose loss is down-weighted x0.1
    "norm": "mean",  # combined-distance parts over their validation mean | quantile (q0.9..q0.995)
    "distance": "combined",
    "combine": "sum",  # combined's normalised parts: sum | max (the larger of the two per position)
    "sigma": 4.0,
    "global_weight": 0.0,  # weight of a Mahalanobis score of pooled features (0 = off)
    "global_source": "features",  # what that score pools: features | residual (model.global_source)
    "global_images": 0,  # residual: the training images its Gaussian is fitted on (0 = all)
    "seed": 0,
    "center": False,  # subtract each image's own per-channel mean from its standardised features
    "crop": 0,  # train on random crop x crop windows of the feature maps (0 = whole maps)
    "coarse_steps": 0,  # the first steps (of `steps`) train on the maps 2 x 2 average-pooled
    "coarse_batch": 0,  # the batch of those coarse steps (0 = batch)
    "backbone": "efficientnet_lite0",  # conf/backbone name (blocks 1-3), cached per backbone
    "sched": "none",  # none | cosine (learning rate annealed to 0 over the steps)
    "cl": False,  # AE weights, inputs and activations channels_last (true) or NCHW (the AE's own)
    "amp": "none",  # none | bf16: autocast of the training steps (CPU)
    "amp_score": "none",  # none | bf16: autocast of the scoring too (as trainer.precision=bf16-mixed)
    "k0": 4,  # kernel of the AE's outermost (stride-2) conv and transposed conv: 4 (ours) | 2
    "k_final": 0,  # kernel of the outermost transposed conv alone (0 = k0)
    "final_width": 1.0,  # channels of the last transposed conv, as a fraction of widths[0]
    "widths": "",  # explicit AE widths as "176-176-96" (overrides width_ratio)
    "fp16": False,  # train and validate on fp16-rounded features, as the pipeline's FeatureStore keeps them
    "blocks": 123,  # which cached blocks feed the AE, as digits: 123 = blocks 1-3, 23 = blocks 2-3
    "ema": 0.0,  # > 0: validate, choose and score an exponential moving average of the weights
    "cos_loss": 0.0,  # > 0: training and validation loss + this x mean (1 - cosine) over channels
}


# ---- caching --------------------------------------------------------------------------------
def cache(category: str, backbone: str = "efficientnet_lite0") -> Path:
    name = category if backbone == "efficientnet_lite0" else f"{category}.{backbone}"
    path = OUT / "cache" / f"{name}.pt"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            [
                "model=skip_dfr",
                f"backbone={backbone}",
                "data=folder",
                f"data.root={DATA / CATEGORIES[category]}",
                f"data.category={category}",
                "data.num_workers=0",
            ],
        )
    torch.manual_seed(0)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    backbone = instantiate(cfg.backbone).eval()
    out: dict[str, Any] = {}
    for split, loader in (
        ("train", dm.train_eval_dataloader()),
        ("val", dm.val_dataloader()),
        ("test", dm.test_dataloader()),
    ):
        blocks: list[list[torch.Tensor]] = []
        labels, masks = [], []
        start = time.perf_counter()
        for batch in loader:
            with torch.no_grad():
                x = batch["image"].contiguous(memory_format=torch.channels_last)
                maps = backbone.net(x)
            blocks.append([m.float().contiguous() for m in maps])
            labels.append(torch.as_tensor(batch["label"]))
            masks.extend(m.bool() for m in batch["mask"])
        out[split] = {
            "blocks": [torch.cat([b[i] for b in blocks]) for i in range(len(blocks[0]))],
            "labels": torch.cat(labels),
            "masks": masks if split == "test" else None,
            "seconds": time.perf_counter() - start,
            "image_hw": tuple(batch["image"].shape[-2:]),
        }
        print(category, split, [tuple(b.shape) for b in out[split]["blocks"]], flush=True)
    torch.save(out, path)
    return path


# ---- one variant ----------------------------------------------------------------------------
def features(
    blocks: list[torch.Tensor], size: int, pool: int, resize: str = "bilinear"
) -> torch.Tensor:
    if resize not in ("bilinear", "area"):
        raise ValueError(f"resize={resize!r}: use bilinear or area")
    maps = []
    for m in blocks:
        if pool > 1:
            m = F.avg_pool2d(m, pool, 1, pool // 2, count_include_pad=False)
        if resize == "area" and m.shape[-1] > size:
            m = F.adaptive_avg_pool2d(m, size)  # anti-aliased: a 4x reduction averages 4 x 4 cells
        elif m.shape[-1] != size:
            m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
        maps.append(m)
    return torch.cat(maps, 1)


def parts(rec: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """[2, B, h, w]: l2 and cosine residual."""
    l2 = (rec - feats).pow(2).sum(1).sqrt()
    cos = 1 - F.cosine_similarity(rec, feats, dim=1, eps=1e-6)
    return torch.stack([l2, cos])


def batched(
    ae: torch.nn.Module, feats: torch.Tensor, bf16: bool = False, n: int = 64
) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return torch.cat(
            [
                parts(ae(feats[i : i + n]).float(), feats[i : i + n])
                for i in range(0, len(feats), n)
            ],
            1,
        )


def random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random size x size window per map (the AE is fully convolutional)."""
    h, w = x.shape[-2:]
    ys = torch.randint(0, h - size + 1, (len(x),), generator=gen).tolist()
    xs = torch.randint(0, w - size + 1, (len(x),), generator=gen).tolist()
    return torch.stack(
        [m[:, y : y + size, x0 : x0 + size] for m, y, x0 in zip(x, ys, xs, strict=True)]
    )


def local_corruption(
    x: torch.Tensor, scale: float, kind: str, max_side: int, gen: torch.Generator
) -> torch.Tensor:
    """One random rectangle per map corrupted (DRAEM / RealNet-style synthetic anomaly, on
    features): the AE must repair it from its context, not pass it through."""
    out = x.clone()
    h, w = x.shape[-2:]
    donors = torch.roll(torch.arange(len(x)), 1).tolist()

    def corner(bh: int, bw: int) -> tuple[int, int]:
        """A random top-left corner for a bh x bw rectangle inside the map."""
        return (
            int(torch.randint(0, h - bh + 1, (1,), generator=gen)),
            int(torch.randint(0, w - bw + 1, (1,), generator=gen)),
        )

    for i, d in enumerate(donors):
        bh, bw = torch.randint(2, max_side + 1, (2,), generator=gen).tolist()
        y, x0 = corner(bh, bw)
        if kind == "noise":
            noise = torch.randn(x.shape[1], bh, bw, generator=gen)
            out[i, :, y : y + bh, x0 : x0 + bw] += scale * noise
        else:
            ys, xs = corner(bh, bw)
            out[i, :, y : y + bh, x0 : x0 + bw] = x[d, :, ys : ys + bh, xs : xs + bw]
    return out


def reshape_outer(ae: SkipAutoencoder, c: int, k: int, final_width: float, k_final: int) -> None:
    """Rebuild the AE's two full-resolution layers (about 3/4 of its FLOPs) cheaper, in place."""
    if k == k_final == 4 and final_width == 1.0:
        return
    w0 = ae.encoder[0][0].out_channels
    wf = max(8, round(w0 * final_width))
    ae.encoder[0] = torch.nn.Sequential(
        torch.nn.Conv2d(c, w0, k, 2, (k - 2) // 2, bias=False),
        torch.nn.BatchNorm2d(w0),
        torch.nn.LeakyReLU(0.2, inplace=True),
    )
    ae.final_up = torch.nn.Sequential(
        torch.nn.ConvTranspose2d(
            ae.final_up[0].in_channels, wf, k_final, 2, (k_final - 2) // 2, bias=False
        ),
        torch.nn.BatchNorm2d(wf),
        torch.nn.ReLU(inplace=True),
    )
    ae.head = torch.nn.Conv2d(wf, c, 1)


def loss_fn(rec: torch.Tensor, feats: torch.Tensor, hard: float, cos: float = 0.0) -> torch.Tensor:
    err = (rec - feats).pow(2)
    if cos > 0:
        return err.mean() + cos * (1 - F.cosine_similarity(rec, feats, dim=1, eps=1e-6)).mean()
    if hard <= 0:
        return err.mean()
    pos = err.mean(1)  # [B, h, w]
    cut = torch.quantile(pos.detach().flatten(), hard)
    weight = torch.where(pos.detach() >= cut, 1.0, 0.1)
    return (pos * weight).sum() / weight.sum()


def run_category(category: str, p: dict[str, Any]) -> dict[str, Any]:
    data = torch.load(cache(category, p["backbone"]), weights_only=False)
    torch.manual_seed(p["seed"])
    t0 = time.perf_counter()
    chosen = [int(b) - 1 for b in str(p["blocks"])]
    train, val, test = (
        features([data[s]["blocks"][b] for b in chosen], p["feature_size"], p["pool"], p["resize"])
        for s in ("train", "val", "test")
    )
    stats = train[:512].double().transpose(0, 1).flatten(1)
    if p["fp16"]:  # after the statistics, which the pipeline takes from fp32 backbone output
        train, val = train.half().float(), val.half().float()
    mean, std = stats.mean(1).float(), stats.std(1, unbiased=False).float()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    train, val, test = ((f - mean[:, None, None]) / std[:, None, None] for f in (train, val, test))
    if p["center"]:
        train, val, test = (f - f.mean((2, 3), keepdim=True) for f in (train, val, test))
    c = train.shape[1]
    widths = (
        [int(w) for w in str(p["widths"]).split("-")]
        if p["widths"]
        else widths_for(c, p["width_ratio"], 3)
    )
    ae = SkipAutoencoder(c, widths, p["skips"])
    reshape_outer(ae, c, p["k0"], p["final_width"], p["k_final"] or p["k0"])
    if p["cl"]:
        ae = ae.to(memory_format=torch.channels_last)
        train, val, test = (
            f.contiguous(memory_format=torch.channels_last) for f in (train, val, test)
        )
    train_amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=p["amp"] == "bf16")
    opt = torch.optim.Adam(ae.parameters(), lr=p["lr"])
    sched = (
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, p["steps"])
        if p["sched"] == "cosine"
        else None
    )
    best, best_state, step = math.inf, None, 0
    gen = torch.Generator().manual_seed(p["seed"])
    ema = (
        AveragedModel(ae, multi_avg_fn=get_ema_multi_avg_fn(p["ema"]), use_buffers=True)
        if p["ema"] > 0
        else None
    )
    judged = ema.module if ema is not None else ae
    while step < p["steps"]:
        ae.train()
        order = torch.randperm(len(train), generator=gen)
        coarse = step < p["coarse_steps"]
        size = (p["coarse_batch"] or p["batch"]) if coarse else p["batch"]
        for i in range(0, len(train), size):
            x = train[order[i : i + size]]
            if len(x) < 2:
                continue
            if coarse:  # progressive resizing: a quarter of the positions per map
                x = F.avg_pool2d(x, 2)
            if p["crop"]:
                x = random_crops(x, p["crop"], gen)
            noisy = x + p["noise"] * torch.randn_like(x) if p["noise"] > 0 else x
            if p["dropout"] > 0:
                noisy = F.dropout(noisy, p["dropout"])
            if p["blob"] > 0:
                noisy = local_corruption(noisy, p["blob"], p["blob_kind"], p["blob_max"], gen)
            with train_amp:
                rec = ae(noisy)
            loss = loss_fn(rec.float(), x, p["hard_mining"], p["cos_loss"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if ema is not None:
                ema.update_parameters(ae)
            step += 1
            if step >= p["steps"] or coarse and step >= p["coarse_steps"]:
                break
        judged.eval()
        with torch.no_grad():
            vloss = float(
                sum(
                    F.mse_loss(judged(val[i : i + 64]), val[i : i + 64], reduction="sum")
                    for i in range(0, len(val), 64)
                )
                / val.numel()
            )
            if p["cos_loss"] > 0:
                vloss += p["cos_loss"] * float(
                    sum(
                        (1 - F.cosine_similarity(judged(v), v, dim=1, eps=1e-6)).sum()
                        for v in val.split(64)
                    )
                    / (val.numel() / val.shape[1])
                )
        if vloss < best:
            best, best_state = vloss, {k: v.clone() for k, v in judged.state_dict().items()}
    score_bf16 = p["amp_score"] == "bf16"
    ae.load_state_dict(best_state)
    ae.eval()
    fit_s = time.perf_counter() - t0
    hw = data["test"]["image_hw"]

    def grid_of(feats: torch.Tensor) -> torch.Tensor:
        """The residual map at feature resolution (one AE pass)."""
        pr = batched(ae, feats, score_bf16)
        if p["distance"] != "combined":
            return pr[0 if p["distance"] == "l2" else 1]
        parts_ = (pr - ref_low[:, None, None, None]) / ref_scale[:, None, None, None]
        return parts_.amax(0) if p["combine"] == "max" else parts_.sum(0)

    def smoothed(grid: torch.Tensor, sigma: float = p["sigma"]) -> torch.Tensor:
        return torch.cat(
            [upsample_and_smooth(grid[i : i + 32], hw, sigma) for i in range(0, len(grid), 32)]
        )

    vparts = batched(ae, val, score_bf16)
    labels = data["test"]["labels"]
    masks = data["test"]["masks"]
    row: dict[str, Any] = {
        "category": category,
        "fit_s": round(fit_s, 1),
        "steps": step,
        "val_loss": best,
    }
    dumped: dict[str, Any] = {"labels": labels}
    if p["global_weight"] > 0:  # independent of the map's normalisation: once per category
        if p["global_source"] == "residual":
            g, gv = residual_global_scores(ae, train, val, test, p["global_images"])
        else:
            g, gv = global_scores(data, mean, std)
        dumped["global"] = {"test": g, "val": gv}
        # the no-signal control: the same scores dealt to the test images at random
        shuffled = g[torch.randperm(len(g), generator=torch.Generator().manual_seed(1))]
    for norm in ("mean", "quantile"):
        if norm == "mean":
            ref_low = torch.zeros(2)
            ref_scale = vparts.double().mean((1, 2, 3)).float()
        else:  # quantiles of the (upsampled, smoothed) normal validation part maps
            ups = torch.stack(
                [
                    torch.cat(
                        [
                            upsample_and_smooth(vparts[j, i : i + 32], hw, p["sigma"])
                            for i in range(0, vparts.shape[1], 32)
                        ]
                    )
                    for j in range(2)
                ]
            )
            flat = ups.flatten(1)
            sample = flat[
                :,
                torch.randperm(flat.shape[1], generator=torch.Generator().manual_seed(0))[
                    :2_000_000
                ],
            ]
            q = torch.quantile(sample, torch.tensor([0.9, 0.995]), dim=1)  # [2 quantiles, 2 parts]
            ref_low, ref_scale = q[0], (q[1] - q[0]).clamp_min(1e-8)
        t1 = time.perf_counter()
        test_grid = grid_of(test)
        test_maps = smoothed(test_grid)
        infer_ms = 1000 * (time.perf_counter() - t1) / len(test)
        val_maps = smoothed(grid_of(val))
        flat = test_maps.flatten(1)
        k1 = max(1, flat.shape[1] // 100)
        k01 = max(1, flat.shape[1] // 1000)
        scores = {
            "max": flat.amax(1),
            "mean": flat.mean(1),
            "top1pct": flat.topk(k1, 1).values.mean(1),
            "top01pct": flat.topk(k01, 1).values.mean(1),
            **{  # the max inside the map, a border of b image pixels left out
                f"max_in{b}": test_maps[:, b:-b, b:-b].flatten(1).amax(1) for b in (8, 16, 32)
            },
            **{  # the max of the map smoothed with another sigma
                f"max_sigma{g}": smoothed(test_grid, g).flatten(1).amax(1) for g in (0, 2, 8)
            },
        }
        vmax = val_maps.flatten(1).amax(1)
        dumped[norm] = {"test_max": scores["max"], "val_max": vmax}
        if p["global_weight"] > 0:
            zmap = (scores["max"] - vmax.mean()) / vmax.std()
            scores["max_global"] = zmap + p["global_weight"] * g
            scores["max_global_shuffled"] = zmap + p["global_weight"] * shuffled
            scores["global"] = g
        pre = "" if norm == p["norm"] else f"{norm}_"
        for name, s in scores.items():
            row[f"{pre}image_{name}"] = float(binary_auroc(unit(s), labels.long()))
        row[f"{pre}pixel_auroc"], aupro_ = pixel_figures(test_maps, masks, with_aupro=not pre)
        if not pre:
            row["pixel_aupro"] = aupro_
            row["ae_ms_per_image"] = round(infer_ms, 2)
    # the heat map's own distance (model.pixel_distance): l2, and l2 of the residual with each
    # channel over its std on the normal validation residuals (l2_whitened)
    channel_std = residuals(ae, val).transpose(0, 1).flatten(1).double().std(1, unbiased=False)
    test_res = residuals(ae, test)
    for name, std in (("l2", None), ("l2_whitened", channel_std.float().clamp_min(1e-6))):
        r = test_res if std is None else test_res / std[:, None, None]
        auroc_, aupro_ = pixel_figures(smoothed(r.pow(2).sum(1).sqrt()), masks)
        row[f"pixel_auroc_{name}"], row[f"pixel_aupro_{name}"] = auroc_, aupro_
    row["scores"] = dumped  # per-image scores, saved beside the json (not in it)
    return row


def residuals(ae: torch.nn.Module, feats: torch.Tensor, n: int = 64) -> torch.Tensor:
    """AE(f) - f for every map, [N, C, h, w]."""
    with torch.no_grad():
        return torch.cat([ae(feats[i : i + n]) - feats[i : i + n] for i in range(0, len(feats), n)])


def pixel_figures(
    maps: torch.Tensor, masks: list[torch.Tensor], with_aupro: bool = True
) -> tuple[float, float | None]:
    """Pixel AUROC (and AUPRO to FPR 0.3) of image-sized maps against the masks' own sizes."""
    full = [
        F.interpolate(maps[i][None, None], size=m.shape, mode="bilinear", align_corners=False)[0, 0]
        if m.shape != maps[i].shape
        else maps[i]
        for i, m in enumerate(masks)
    ]
    auroc_ = pixel_auroc(
        torch.cat([m.flatten() for m in full]), torch.cat([m.flatten() for m in masks])
    )
    return auroc_, aupro(full, masks, 0.3) if with_aupro else None


def global_scores(data: dict, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance of pooled block features, z-scored on the validation normals."""
    from sklearn.covariance import LedoitWolf

    def pooled(split: str) -> torch.Tensor:
        return torch.cat(
            [torch.cat([b.mean((2, 3)), b.amax((2, 3))], 1) for b in data[split]["blocks"]], 1
        )

    tr, va, te = pooled("train"), pooled("val"), pooled("test")
    mu, sd = tr.mean(0), tr.std(0).clamp_min(1e-6)
    lw = LedoitWolf().fit(((tr - mu) / sd).numpy())
    d = lambda x: torch.as_tensor(lw.mahalanobis(((x - mu) / sd).numpy())).float().sqrt()  # noqa: E731
    dv = d(va)
    return (d(te) - dv.mean()) / dv.std(), (dv - dv.mean()) / dv.std()


def residual_global_scores(
    ae: torch.nn.Module, train: torch.Tensor, val: torch.Tensor, test: torch.Tensor, limit: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's residual global branch (model.global_source=residual): the Gaussian of the
    training images' pooled residuals (`limit` of them evenly spaced, model.global_images;
    0 = all), the test and validation distances z-scored on the validation normals."""
    from ad_lightning.models.families.global_branch import (
        fit_global_gaussian,
        global_distance,
        residual_descriptor,
    )
    from ad_lightning.models.families.training_images import evenly_spaced

    def descriptors(feats: torch.Tensor) -> torch.Tensor:
        return residual_descriptor(residuals(ae, feats))

    gaussian = fit_global_gaussian(descriptors(train[evenly_spaced(len(train), limit or None)]))
    dv, dt = (global_distance(descriptors(f), *gaussian) for f in (val, test))
    return (dt - dv.mean()) / dv.std(), (dv - dv.mean()) / dv.std()


def unit(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return (v - v.min()) / (v.max() - v.min()) if v.max() > v.min() else torch.zeros_like(v)


# ---- entry ----------------------------------------------------------------------------------
def parse(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def main() -> None:
    torch.set_num_threads(2)
    cmd = sys.argv[1]
    if cmd == "cache":
        for category in CATEGORIES:
            cache(category)
        return
    if cmd == "run":
        name = sys.argv[2]
        p = DEFAULTS | {k: parse(v) for k, v in (a.split("=", 1) for a in sys.argv[3:])}
        cats = p.pop("categories", list(CATEGORIES))
        rows = []
        dumps = {}
        for category in cats:
            row = run_category(category, p)
            dumps[category] = row.pop("scores")
            print(json.dumps(row), flush=True)
            rows.append(row)
        OUT.mkdir(parents=True, exist_ok=True)
        torch.save(dumps, OUT / f"{name}.scores.pt")
        (OUT / f"{name}.json").write_text(json.dumps({"params": p, "rows": rows}, indent=1))
        return
    if cmd == "table":
        print(table(sys.argv[2:]))


def table(names: list[str]) -> str:
    """Markdown: per variant (and its tail-normalised twin) image / pixel AUROC / AUPRO per
    category, the mean image AUROC, fit seconds and AE + map ms per image."""
    files = [OUT / f"{n}.json" for n in names] or sorted(
        OUT.glob("*.json"), key=lambda f: f.stat().st_mtime
    )
    head = "| variant | norm | " + " | ".join(f"{c} img / pix / AUPRO" for c in CATEGORIES)
    head += " | mean img | fit s | AE+map ms/img |\n|" + "---|" * (len(CATEGORIES) + 5)
    lines = [head]
    for f in files:
        r = json.loads(f.read_text())
        rows = {x["category"]: x for x in r["rows"]}
        # (label, image-score prefix, pixel AUROC key, AUPRO key): the mean- and tail-scaled
        # combined maps, then the heat map's own distances where the run recorded them
        kinds = [("mean", "", "pixel_auroc", "pixel_aupro"), ("tail", "quantile_", "", "")]
        kinds += [
            (f"tail, map {d}", "quantile_", f"pixel_auroc_{d}", f"pixel_aupro_{d}")
            for d in ("l2", "l2_whitened")
            if f"pixel_auroc_{d}" in r["rows"][0]
        ]
        for norm, pre, pix, pro in kinds:
            pix = pix or f"{pre}pixel_auroc"
            cells, imgs = [], []
            for c in CATEGORIES:
                x = rows.get(c)
                if x is None:
                    cells.append("-")
                    continue
                imgs.append(x[f"{pre}image_max"])
                aupro_cell = f"{x[pro]:.3f}" if x.get(pro) is not None else "-"
                cells.append(f"{x[f'{pre}image_max']:.3f} / {x[pix]:.3f} / {aupro_cell}")
            mean = f"{sum(imgs) / len(imgs):.3f}" if len(imgs) == len(CATEGORIES) else "-"
            fit = " / ".join(f"{rows[c]['fit_s']:.0f}" if c in rows else "-" for c in CATEGORIES)
            ms = " / ".join(
                f"{rows[c]['ae_ms_per_image']:.1f}" if "ae_ms_per_image" in rows.get(c, {}) else "-"
                for c in CATEGORIES
            )
            lines.append(
                f"| {f.stem} | {norm} | " + " | ".join(cells) + f" | {mean} | {fit} | {ms} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
