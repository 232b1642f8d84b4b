"""Dataset selection from config: the one place that maps a dataset name to a loader."""

from __future__ import annotations

from fedrec.config import DataConfig
from fedrec.data import FederatedDataset, PurchaseLog
from fedrec.datasets import movielens, purchases, synthetic
from fedrec.datasets.protocol import SplitConfig, temporal_split


def load_log(cfg: DataConfig) -> PurchaseLog:
    if cfg.dataset == "synthetic":
        return synthetic.load()
    if cfg.dataset == "movielens-100k":
        return movielens.load(cfg.movielens_dir or None)
    return purchases.load(cfg.path, merchants=cfg.merchants or None)


def load_dataset(cfg: DataConfig) -> FederatedDataset:
    split = SplitConfig(cfg.test_fraction, cfg.val_fraction, cfg.min_positives)
    return temporal_split(load_log(cfg), split)
