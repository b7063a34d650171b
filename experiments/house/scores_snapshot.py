"""Every method's scores on the synthetic set, to show a refactor changed no behaviour.

    .venv/bin/python experiments/house/scores_snapshot.py write OUT=outputs/snapshot/before.json
    .venv/bin/python experiments/house/scores_snapshot.py write OUT=outputs/snapshot/after.json
    .venv/bin/python experiments/house/scores_snapshot.py compare outputs/snapshot/before.json outputs/snapshot/after.json

`write` trains and tests each config of conf/model/ at the tiny settings of
tests/test_determinism.py (same seed, CPU) and stores every image's scores, the metrics and
the thresholds; `compare` exits 1 naming each method, image and score that differs. About
2 minutes on 2 cores.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ad_lightning.train import run  # noqa: E402
from tests.test_determinism import MODELS, TINY  # noqa: E402  (the settings the suite uses)
from tests.test_run import compose_cfg  # noqa: E402


def snapshot(model: str, folder: Path) -> dict[str, Any]:
    overrides = [
        f"model={model}",
        "data.category=object",
        "data.image_size=32",
        "backbone.feature_size=8",
        "eval.n_heatmaps=0",
        "trainer.max_epochs=2",
        *TINY.get(model, []),
    ]
    results = run(compose_cfg(folder, *overrides))
    with (Path(results["run_dir"]) / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {"metrics": results["metrics"], "thresholds": results["thresholds"], "scores": rows}


def write(out: Path) -> None:
    import torch

    torch.set_num_threads(1)  # reductions in another thread count round differently
    with tempfile.TemporaryDirectory() as tmp:
        found = {m: snapshot(m, Path(tmp) / m) for m in MODELS}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(found, indent=1, sort_keys=True))
    print(f"{len(found)} methods -> {out}")


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    problems = [f"{m}: only in {before}" for m in a.keys() - b.keys()]
    problems += [f"{m}: only in {after}" for m in b.keys() - a.keys()]
    for model in sorted(a.keys() & b.keys()):
        for part in ("metrics", "thresholds", "scores"):
            if a[model][part] != b[model][part]:
                problems.append(f"{model}: {part} differ")
    print("\n".join(problems) or f"identical: {len(a)} methods, every image score and metric")
    return 1 if problems else 0


if __name__ == "__main__":
    verb, *args = sys.argv[1:]
    if verb == "write":
        write(Path(dict(a.split("=", 1) for a in args).get("OUT", "outputs/snapshot/scores.json")))
    else:
        sys.exit(compare(Path(args[0]), Path(args[1])))
