"""Data: MVTec-layout folders -> samples -> one LightningDataModule."""

from ad_lightning.data.datamodule import AnomalyDataModule, AnomalyDataset
from ad_lightning.data.folder import DataLayoutError, Sample, scan_category
from ad_lightning.data.synthetic import SyntheticDataModule, make_synthetic_dataset

__all__ = [
    "AnomalyDataModule",
    "AnomalyDataset",
    "DataLayoutError",
    "Sample",
    "SyntheticDataModule",
    "make_synthetic_dataset",
    "scan_category",
]
