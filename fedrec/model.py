"""The two-tower model. Item tower: id embedding + MLP over hashed content tokens; the user
tower is a plain per-merchant embedding table that never leaves its merchant. Score = u . v.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedrec.content_match import BASIS, WEIGHT, with_content
from fedrec.copurchase import ITEMS as COPURCHASE
from fedrec.copurchase import with_block
from fedrec.features import ItemFeatures, tfidf_rows

# The state name of the per-product id table: what ALS's item step solves, DP noises row by row and
# rowwise aggregation averages over the merchants that sold each product.
ID_TABLE = "item_emb.weight"


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
    # Item-id rows. A catalogue of up to 2 R products gets one row per product. A larger one gets
    # compositional ids (quotient-remainder, Shi et al. 2020): product i is row i mod R of one
    # table plus row (i // R + i * SPREAD) mod R of another, a pair unique for i < R^2, so the
    # shared tower (and every upload) holds at most 2 R id rows whatever the catalogue size
    # (README, "Scale"). 0: one row per product always.
    id_rows: int = 16_384
    # A product nobody has bought, in a model without a content tower, gets the mean of the trained
    # vectors of its this-many most content-similar products (TF-IDF cosine, weighted by it); 0:
    # every trained product. Chosen on the validation slice's new products (`make validate-cold-start`,
    # README "Cold start"): 100 scored best, ahead of all by more than the spread.
    new_item_neighbours: int = 100
    # The content match's weight w (score += w p_c . z_i, `fedrec/content_match.py`), chosen among
    # these on the validation slice after training (0 alone: off); the basis keeps the leading
    # `content_match_dim` singular directions of the catalogue's TF-IDF tokens.
    content_match_weights: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    content_match_dim: int = 64
    # The co-purchase term's weight w (score += w s (x_c B)_i, EASE's B from the merchants' summed
    # Gram, `fedrec/copurchase.py`) and EASE's lam, chosen among these on the validation slice
    # after training: the least concentrated within one standard error of the best validation
    # recall (`fedrec/federated/one_se.py`); () or (0,) is off. In-process, non-private, up to
    # 16,000 products.
    copurchase_weights: tuple[float, ...] = ()
    copurchase_lambdas: tuple[float, ...] = (10.0, 50.0, 200.0, 1000.0)
    # Each merchant's served popularity weight w (score = u . v + w b, `fedrec/served_weight.py`):
    # among these, the best recall@20 on its own validation slice whose top-1 share is at most
    # max_top1_share ([]: w = 1, the trained score). 0.2 was the largest budget whose validation
    # top-1 share on the synthetic shop stayed below the tuned ALS's (README, "Served popularity weight").
    served_popularity_weights: tuple[float, ...] = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    max_top1_share: float = 0.2


# The second table's row is the quotient shifted by remainder x SPREAD: products that share a
# remainder still get distinct quotient rows, and every quotient row is used (the plain quotient
# i // R would use only catalogue / R of them).
SPREAD = 40503


def id_table_rows(n_items: int, cfg: ModelConfig) -> int:
    """R of the compositional id tables for a catalogue of `n_items`, or 0 for one row per product."""
    return cfg.id_rows if cfg.id_rows and n_items > 2 * cfg.id_rows else 0


class ItemTower(nn.Module):
    """Maps item indices to embeddings; the only part of the model that is ever shared."""

    def __init__(self, n_items: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Only the parts in use exist: an unused table would still be uploaded every round.
        self.id_rows = id_table_rows(n_items, cfg)
        if cfg.use_item_id:
            self.item_emb = nn.Embedding(self.id_rows or n_items, cfg.dim)
            if self.id_rows:
                self.item_emb_q = nn.Embedding(self.id_rows, cfg.dim)  # the quotient table
        if cfg.use_content:
            # Row `hash_buckets` is the padding row: excluded from the mean and never trained.
            self.feat_emb = nn.EmbeddingBag(
                cfg.hash_buckets + 1, cfg.feature_dim, mode="mean", padding_idx=cfg.hash_buckets
            )
            self.mlp = nn.Sequential(nn.Linear(cfg.feature_dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.dim))
        if cfg.use_item_id:
            # Two summed rows get half the variance each, so an id vector has the same prior either way.
            id_std = cfg.init_std / np.sqrt(2.0) if self.id_rows else cfg.init_std
            nn.init.normal_(self.item_emb.weight, std=id_std)
            if self.id_rows:
                nn.init.normal_(self.item_emb_q.weight, std=id_std)
        if cfg.use_content:
            nn.init.normal_(self.feat_emb.weight, std=cfg.init_std)
            with torch.no_grad():
                self.feat_emb.weight[cfg.hash_buckets].zero_()

    def forward(self, features: ItemFeatures, idx: torch.Tensor | None = None) -> torch.Tensor:
        tokens = features.tokens if idx is None else features.tokens[idx]
        out = 0.0
        if self.cfg.use_content:
            out = self.mlp(self.feat_emb(tokens))
        if self.cfg.use_item_id:
            ids = torch.arange(features.n_items, device=features.tokens.device) if idx is None else idx
            out = out + self.id_vectors(ids)
        return out

    def id_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        weights = {ID_TABLE: self.item_emb.weight}
        if self.id_rows:
            weights["item_emb_q.weight"] = self.item_emb_q.weight
        return id_vectors(weights, ids, self.id_rows)


def id_vectors(weights: dict[str, torch.Tensor], ids: torch.Tensor, id_rows: int) -> torch.Tensor:
    """The id part of item vectors `ids`: a row per product, or the sum of its two compositional rows."""
    if not id_rows:
        return F.embedding(ids, weights[ID_TABLE])
    return F.embedding(ids % id_rows, weights[ID_TABLE]) + F.embedding(
        (ids // id_rows + ids * SPREAD) % id_rows, weights["item_emb_q.weight"]
    )


def tower_from_state(n_items: int, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> ItemTower:
    """An ItemTower holding a copy of `state`, made from a meta-device template (built once per
    shape) whose tensors are replaced by copies of `state`. No random initialisation is drawn only to
    be overwritten, and the meta construction itself (slow: its init ops are Python decompositions)
    is not repeated: every local update builds a tower. The strict load checks every name and shape."""
    tower = copy.deepcopy(_meta_tower(n_items, cfg))
    tower.load_state_dict({k: v.detach().clone() for k, v in state.items()}, assign=True)
    return tower


@functools.lru_cache(maxsize=8)
def _meta_tower(n_items: int, cfg: ModelConfig) -> ItemTower:
    with torch.device("meta"):
        return ItemTower(n_items, cfg)


def new_item_tower(n_items: int, cfg: ModelConfig, seed: int) -> ItemTower:
    torch.manual_seed(seed)
    return ItemTower(n_items, cfg)


def initial_item_state(n_items: int, cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """The tower every run of `seed` starts from (the training run and its refit alike), detached."""
    return {k: v.detach().clone() for k, v in new_item_tower(n_items, cfg, seed).state_dict().items()}


def item_tower_shapes(n_items: int, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every shared tensor: the whitelist for federated messages."""
    return {k: tuple(v.shape) for k, v in ItemTower(n_items, cfg).state_dict().items()}


def init_user_embeddings(n_users: int, cfg: ModelConfig, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(n_users, cfg.dim, generator=generator) * cfg.init_std


def init_item_bias(n_items: int, cfg: ModelConfig, user_groups: np.ndarray | None = None) -> torch.Tensor | None:
    """A merchant's item bias; for the pooled client (`user_groups`), one row per original merchant."""
    if not cfg.merchant_item_bias:
        return None
    return torch.zeros(n_items) if user_groups is None else torch.zeros(int(user_groups.max()) + 1, n_items)


def scoring_vectors(
    users: torch.Tensor,
    items: torch.Tensor,
    item_bias: torch.Tensor | None = None,
    user_groups: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors whose dot product is the model's score: [u, 1] . [v, b] = u . v + b.

    The same augmentation lets a plain inner-product index (FAISS) rank with the bias. A grouped
    bias (rows per merchant, the pooled client) becomes [u, onehot(group)] . [v, b_1 .. b_M].
    """
    if item_bias is None:
        return users, items
    if item_bias.dim() == 2:
        onehot = torch.nn.functional.one_hot(torch.from_numpy(user_groups), item_bias.shape[0]).to(users.dtype)
        return torch.cat([users, onehot], 1), torch.cat([items, item_bias.to(items.dtype).T], 1)
    ones = torch.ones(users.shape[0], 1, dtype=users.dtype)
    return torch.cat([users, ones], 1), torch.cat([items, item_bias.to(items.dtype)[:, None]], 1)


def tower_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The item tower's own tensors: a released state without the content match's basis and the
    co-purchase block."""
    return {k: v for k, v in state.items() if k not in (BASIS, WEIGHT, COPURCHASE)}


def _with_blocks(vectors: torch.Tensor, features: ItemFeatures, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The tower's vectors, then the content match's block and the co-purchase block where the state has them."""
    if BASIS in state:
        vectors = with_content(vectors, features, state[BASIS])
    return vectors if COPURCHASE not in state else with_block(vectors, state[COPURCHASE])


@torch.no_grad()
def item_embeddings(state: dict[str, torch.Tensor], features: ItemFeatures, cfg: ModelConfig) -> torch.Tensor:
    """Every product's vector: the tower's, then the content match's and the co-purchase blocks
    when the state has them."""
    tower = tower_from_state(features.n_items, cfg, tower_state(state))
    tower.eval()
    return _with_blocks(tower(features), features, state)


def content_neighbour_vectors(trained: torch.Tensor, features: ItemFeatures, neighbours: int = 0) -> torch.Tensor:
    """Vectors for the products after the first len(trained) rows of `features`, for a model
    without a content tower: the mean of the trained vectors weighted by TF-IDF content similarity,
    over the `neighbours` most similar trained products (ties at the last one kept; 0: all)."""
    x = tfidf_rows(features.tokens, features.n_buckets)
    n = trained.shape[0]
    weights = (x[n:] @ x[:n].T).toarray()
    if 0 < neighbours < n:
        kth = np.partition(weights, n - neighbours, axis=1)[:, n - neighbours : n - neighbours + 1]
        weights[weights < kth] = 0.0
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
    return torch.from_numpy(weights.astype(np.float32)) @ trained


@torch.no_grad()
def catalogue_embeddings(
    state: dict[str, torch.Tensor], features: ItemFeatures, cfg: ModelConfig, n_trained: int | None = None
) -> torch.Tensor:
    """Vectors for a whole catalogue whose first `n_trained` rows are the trained items and whose
    other rows are products no one has bought. The trained rows are the tower's output. A new
    product gets the content path alone (its id row was never trained, or with compositional ids
    is shared with trained products, and the id prior's mean is zero); a model without a content
    tower gives it `content_neighbour_vectors`. The content match's block, where the state has one,
    comes from every product's own tokens; the co-purchase block is zero for a new product.
    `n_trained` may be left out when the tower has one
    id row per product (it is then the table's length)."""
    if n_trained is None:
        if "item_emb_q.weight" in state or ID_TABLE not in state:
            raise ValueError("catalogue_embeddings: without one id row per product, n_trained must be given")
        n_trained = state[ID_TABLE].shape[0]
    vectors = _catalogue_tower_vectors(tower_state(state), features, cfg, n_trained)
    return _with_blocks(vectors, features, state)


def _catalogue_tower_vectors(
    state: dict[str, torch.Tensor], features: ItemFeatures, cfg: ModelConfig, n_trained: int
) -> torch.Tensor:
    trained_features = ItemFeatures(features.tokens[:n_trained], features.n_buckets)
    trained = item_embeddings(state, trained_features, cfg)
    if features.n_items == n_trained:
        return trained
    if not cfg.use_content:
        return torch.cat([trained, content_neighbour_vectors(trained, features, cfg.new_item_neighbours)])
    new = ItemFeatures(features.tokens[n_trained:], features.n_buckets)
    content_only = ModelConfig(**{**vars(cfg), "use_item_id": False})
    tower = ItemTower(new.n_items, content_only)
    tower.load_state_dict({k: v for k, v in state.items() if not k.startswith("item_emb")}, strict=False)
    tower.eval()
    return torch.cat([trained, tower(new)])
