"""Can the global branch (PUAD) be made safe by a gate? Offline, on the per-image scores that
`ablate.py run g_s2000 steps=2000 global_weight=1.0` saves (outputs/skip_dfr_ablation/
g_s2000.scores.pt), with no retraining.

z_l is the map score (tail normalisation) and z_g the global distance, both z-scored on the
normal validation images. Each combination is scored three ways: with the real z_g, with z_g
negated (a branch that ranks the anomalies below the normals, as the issue's unseen category
did) and with z_g shuffled over the test images (a branch with no signal about the image):
a safe combination keeps the local AUROC in the last two.

    python experiments/skip_dfr/global_gate.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchmetrics.functional.classification import binary_auroc

SCORES = Path(__file__).resolve().parents[2] / "outputs/skip_dfr_ablation/g_s2000.scores.pt"


def combinations(
    zl: torch.Tensor, zg: torch.Tensor, zg_val: torch.Tensor
) -> dict[str, torch.Tensor]:
    gate = zg_val.max()  # the largest global distance of a normal validation image
    return {
        "local": zl,
        "sum": zl + zg,
        "sum w0.5": zl + 0.5 * zg,
        "gated at val max": zl + torch.relu(zg - gate),
        "gated at val q0.95": zl + torch.relu(zg - torch.quantile(zg_val, 0.95)),
        "positive part": zl + torch.relu(zg),
        "max": torch.maximum(zl, zg),
    }


def main() -> None:
    data = torch.load(SCORES, weights_only=False)
    print("| category | z_g | " + " | ".join(combinations(*[torch.zeros(2)] * 3)) + " |")
    print("|---" * 9 + "|")
    for category, x in data.items():
        labels = x["labels"].long()
        test, val = x["quantile"]["test_max"].double(), x["quantile"]["val_max"].double()
        zl = (test - val.mean()) / val.std()
        zg, zg_val = x["global"]["test"].double(), x["global"]["val"].double()
        shuffled = zg[torch.randperm(len(zg), generator=torch.Generator().manual_seed(0))]
        for how, g, g_val in (
            ("real", zg, zg_val),
            ("negated", -zg, -zg_val),
            ("shuffled", shuffled, zg_val),
        ):
            cells = [
                f"{float(binary_auroc(s, labels)):.3f}" for s in combinations(zl, g, g_val).values()
            ]
            print(f"| {category} | {how} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
