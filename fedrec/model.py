"""The two-tower model. Item tower: id embedding + MLP over hashed content tokens; the user
tower is a plain per-merchant embedding table that never leaves its merchant. Score = u . v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedrec.features import ItemFeatures


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 64
    feature_dim: int = 64
    hidden: int = 128
    hash_buckets: int = 16384
    use_item_id: bool = True
    use_content: bool = True
    init_std: float = 0.05
    # A per-merchant item bias (that shop's own popularity), trained and kept at home like the
    # user table: score = u . v + b_m. Pays off when shops differ (non-IID), see README.
    merchant_item_bias: bool = False


class ItemTower(nn.Module):
    """Maps item indices to embeddings; the only part of the model that is ever shared."""

    def __init__(self, n_items: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(n_items, cfg.dim)
        # Row `hash_buckets` is the padding row: excluded from the mean and never trained.
        self.feat_emb = nn.EmbeddingBag(
            cfg.hash_buckets + 1, cfg.feature_dim, mode="mean", padding_idx=cfg.hash_buckets
        )
        self.mlp = nn.Sequential(nn.Linear(cfg.feature_dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.dim))
        nn.init.normal_(self.item_emb.weight, std=cfg.init_std)
        nn.init.normal_(self.feat_emb.weight, std=cfg.init_std)
        with torch.no_grad():
            self.feat_emb.weight[cfg.hash_buckets].zero_()

    def forward(self, features: ItemFeatures, idx: torch.Tensor | None = None) -> torch.Tensor:
        tokens = features.tokens if idx is None else features.tokens[idx]
        out = 0.0
        if self.cfg.use_content:
            out = self.mlp(self.feat_emb(tokens))
        if self.cfg.use_item_id:
            ids = torch.arange(features.n_items) if idx is None else idx
            out = out + self.item_emb(ids)
        return out


def new_item_tower(n_items: int, cfg: ModelConfig, seed: int) -> ItemTower:
    torch.manual_seed(seed)
    return ItemTower(n_items, cfg)


def item_tower_shapes(n_items: int, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every shared tensor: the whitelist for federated messages."""
    return {k: tuple(v.shape) for k, v in ItemTower(n_items, cfg).state_dict().items()}


def init_user_embeddings(n_users: int, cfg: ModelConfig, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(n_users, cfg.dim, generator=generator) * cfg.init_std


def init_item_bias(n_items: int, cfg: ModelConfig) -> torch.Tensor | None:
    return torch.zeros(n_items) if cfg.merchant_item_bias else None


def scoring_vectors(
    users: torch.Tensor, items: torch.Tensor, item_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors whose dot product is the model's score: [u, 1] . [v, b] = u . v + b.

    The same augmentation lets a plain inner-product index (FAISS) rank with the bias.
    """
    if item_bias is None:
        return users, items
    ones = torch.ones(users.shape[0], 1, dtype=users.dtype)
    return torch.cat([users, ones], 1), torch.cat([items, item_bias.to(items.dtype)[:, None]], 1)


@torch.no_grad()
def item_embeddings(state: dict[str, torch.Tensor], features: ItemFeatures, cfg: ModelConfig) -> torch.Tensor:
    tower = ItemTower(features.n_items, cfg)
    tower.load_state_dict(state)
    tower.eval()
    return tower(features)
