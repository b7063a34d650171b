"""Entry point: `python run.py model=skip_dfr backbone=resnext101 data=mvtec data.root=...`."""

import hydra
from omegaconf import DictConfig

from ad_lightning.launcher_env import configure_job
from ad_lightning.stopped_jobs import record_stopped_jobs
from ad_lightning.train import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    cfg = configure_job(cfg)  # a parallel sweep's job: its thread share and device
    results = run(cfg)
    print(
        f"\n{results['model']} on {results['data']['category']}: "
        + "  ".join(f"{k}={v:.4f}" for k, v in results["metrics"].items())
    )
    return results["metrics"]["image_auroc"]


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a joblib sweep's jobs its launcher killed get their record
        record_stopped_jobs()
        raise
