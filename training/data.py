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


def left_out_line(protocol: dict) -> str | None:
    """One console line on the customers (and whole merchants) the protocol left out; None if none.

    A merchant whose every customer is below `min_positives` would otherwise vanish from the run
    without a word: no update, no export of its own."""
    below = protocol.get("customers_below_min_positives", 0)
    if not below:
        return None
    line = f"left out: {below} customer(s) with fewer than {protocol['min_positives']} purchases"
    if merchants := protocol.get("merchants_left_out"):
        line += f"; merchant(s) with no customer left, so no part in the run: {', '.join(merchants)}"
    return line
