"""Dataset selection from config: the one place that maps a dataset name to a loader."""

from __future__ import annotations

from fedrec.config import DataConfig, data_columns
from fedrec.data import FederatedDataset, PurchaseLog
from fedrec.datasets import movielens, purchases, synthetic
from fedrec.datasets.partition import PartitionConfig, partition
from fedrec.datasets.protocol import SplitConfig, temporal_split


def load_log(cfg: DataConfig) -> PurchaseLog:
    if cfg.dataset == "synthetic":
        return synthetic.load()
    if cfg.dataset == "movielens-100k":
        return movielens.load(cfg.movielens_dir or None)
    return purchases.load(
        cfg.path, merchants=cfg.merchants or None, catalogue=cfg.catalogue_path or None, columns=data_columns(cfg)
    )


def load_dataset(cfg: DataConfig, seed: int = 0) -> FederatedDataset:
    split = SplitConfig(cfg.test_fraction, cfg.val_fraction, cfg.min_positives)
    parts = PartitionConfig(cfg.partition, cfg.partition_merchants, cfg.partition_alpha, seed)
    return temporal_split(partition(load_log(cfg), parts), split)
