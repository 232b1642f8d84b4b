"""Each customer's clipped gradient of the softmax loss in closed form, for fedrec's item towers.

DP-SGD needs every sampled customer's own gradient (to clip it). vmap gets it by running B
backward passes through the whole tower; for this loss most of that work is shared. One
customer's loss, -sum_i y_i log softmax((V u + b) / T)_i + wd (|u|^2 + sum_i y_i |E_i|^2), has
dL/dscores = r = (softmax * sum(y) - y) / T, so dL/dV = r u^T is rank one (plus the id rows' weight
decay). Pushed back through the tower (V = E + W2 relu(W1 mean(F[tokens]) + b1) + b2), every
parameter's per-customer gradient is a product of B x n matrices with the tower's activations, and
the token table's is a sparse sum. So the norms and the clipped sums cost about what a plain
batch step costs. `fedrec.federated.local.clipped_customer_sums` checks the shapes it applies to;
the tests check every formula against vmap.
"""

from __future__ import annotations

import torch

from fedrec.model import ID_TABLE as TABLE

FEAT = "feat_emb.weight"
W1, B1, W2, B2 = "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"


def basket_weights(pos: torch.Tensor, mask: torch.Tensor, n_items: int) -> torch.Tensor:
    """Each customer's purchases as a weight row over the catalogue, summing to 1 (0 for no purchases)."""
    w = mask.to(torch.get_default_dtype()) / mask.sum(1, keepdim=True).clamp(min=1)
    return torch.zeros(len(pos), n_items).scatter_add_(1, pos, w)


def clipped_softmax_table_sums(
    table: torch.Tensor,
    bias: torch.Tensor | None,
    users: torch.Tensor,
    weights: torch.Tensor,
    temperature: float,
    weight_decay: float,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """A plain id table V (one row per product, no content tower) and the merchant's bias b.

    One customer's gradient is r u^T + diag(2 wd y) V for V and r for b. Returns (table sum,
    bias sum or None, each customer's user-vector gradient, each customer's norm before clipping);
    `weights` is `basket_weights` (B x n).
    """
    uv = users @ table.T
    scores = uv if bias is None else uv + bias
    r = _score_grads(scores, weights, temperature)
    a = 2 * weight_decay * weights
    sq = _table_sq_norms(table, users, r, a, uv)
    if bias is not None:
        sq = sq + r.pow(2).sum(1)
    norms = sq.clamp(min=0).sqrt()
    factor = _factor(norms, clip)
    table_sum = _table_clipped_sum(table, users, r, a, factor)
    user_grads = r @ table + 2 * weight_decay * users
    return table_sum, (factor @ r if bias is not None else None), user_grads, norms


def clipped_softmax_content_sums(
    shared: dict[str, torch.Tensor],
    bias_key: str,
    tokens: torch.Tensor,
    pad: int,
    users: torch.Tensor,
    weights: torch.Tensor,
    temperature: float,
    weight_decay: float,
    clip: float,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """A content tower (token table, two-layer MLP), with or without a plain id table and the bias.

    `shared` holds FEAT, W1, B1, W2, B2, optionally TABLE and `bias_key`; `tokens` (n x K) are
    the items' token rows, `pad` the padding row. Returns (sums keyed like `shared`, user grads,
    norms before clipping).
    """
    feat = shared[FEAT]
    keep = (tokens != pad).to(feat.dtype)
    count = keep.sum(1, keepdim=True).clamp(min=1)
    mean = (feat[tokens] * keep[..., None]).sum(1) / count  # n x f
    pre = mean @ shared[W1].T + shared[B1]
    active = (pre > 0).to(feat.dtype)  # n x h
    hidden = pre.clamp(min=0)
    vecs = hidden @ shared[W2].T + shared[B2]
    if TABLE in shared:
        vecs = vecs + shared[TABLE]
    bias = shared.get(bias_key)
    scores = users @ vecs.T if bias is None else users @ vecs.T + bias
    r = _score_grads(scores, weights, temperature)  # B x n
    u2 = users.pow(2).sum(1)
    grads: dict[str, torch.Tensor] = {}  # per-customer pieces, each with its squared norm
    sq = u2 * r.sum(1).pow(2)  # B2: u sum(r)
    hr = r @ hidden  # W2: u (H^T r)^T
    sq = sq + u2 * hr.pow(2).sum(1)
    c = users @ shared[W2]  # B x h: W2^T u, what reaches the hidden layer
    rm = r @ active
    sq = sq + (c * rm).pow(2).sum(1)  # B1: c * (m^T r)
    p = torch.einsum("bi,ih,if->bhf", r, active, mean)  # W1: c_h P[h, f]
    sq = sq + (c.pow(2)[..., None] * p.pow(2)).sum((1, 2))
    # The token rows: d mean = r_i (m_i * c) W1, spread over each item's tokens (a sparse sum).
    d_mean = r[..., None] * ((active[None] * c[:, None, :]) @ shared[W1])  # B x n x f, before the 1/count
    used, slot = torch.unique(tokens[tokens != pad], return_inverse=True)
    items = torch.nonzero(tokens != pad)[:, 0]
    spread = torch.sparse_coo_tensor(
        torch.stack([slot, items]), 1 / count[items, 0], (len(used), len(tokens)), check_invariants=True
    )
    b, f = len(users), feat.shape[1]
    d_feat = torch.sparse.mm(spread.coalesce(), d_mean.transpose(0, 1).reshape(len(tokens), b * f))
    d_feat = d_feat.reshape(len(used), b, f).transpose(0, 1)  # B x used rows x f
    sq = sq + d_feat.pow(2).sum((1, 2))
    if TABLE in shared:
        a = 2 * weight_decay * weights
        sq = sq + _table_sq_norms(shared[TABLE], users, r, a, users @ shared[TABLE].T)
    if bias is not None:
        sq = sq + r.pow(2).sum(1)
    norms = sq.clamp(min=0).sqrt()
    factor = _factor(norms, clip)
    fu = factor[:, None] * users
    grads[B2] = (factor * r.sum(1)) @ users
    grads[W2] = fu.T @ hr
    grads[B1] = factor @ (c * rm)
    grads[W1] = torch.einsum("b,bh,bhf->hf", factor, c, p)
    grads[FEAT] = torch.zeros_like(feat).index_copy_(0, used, torch.einsum("b,buf->uf", factor, d_feat))
    if TABLE in shared:
        grads[TABLE] = _table_clipped_sum(shared[TABLE], users, r, a, factor)
    if bias is not None:
        grads[bias_key] = factor @ r
    user_grads = r @ vecs + 2 * weight_decay * users
    return {k: grads[k] for k in shared}, user_grads, norms


def _table_sq_norms(
    table: torch.Tensor, users: torch.Tensor, r: torch.Tensor, a: torch.Tensor, ue: torch.Tensor
) -> torch.Tensor:
    """Each customer's squared norm of r u^T + diag(a) V, their gradient of a plain id table V
    (a = 2 wd y, the weight decay on their purchases' rows; ue = U V^T)."""
    return users.pow(2).sum(1) * r.pow(2).sum(1) + 2 * (r * a * ue).sum(1) + a.pow(2) @ table.pow(2).sum(1)


def _table_clipped_sum(
    table: torch.Tensor, users: torch.Tensor, r: torch.Tensor, a: torch.Tensor, factor: torch.Tensor
) -> torch.Tensor:
    """sum over customers of factor * (r u^T + diag(a) V): the clipped sum for the id table."""
    return (factor[:, None] * r).T @ users + (factor @ a)[:, None] * table


def _score_grads(scores: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """d loss / d scores for each customer: (softmax(scores / T) * sum(y) - y) / T."""
    return (torch.softmax(scores / temperature, dim=1) * weights.sum(1, keepdim=True) - weights) / temperature


def _factor(norms: torch.Tensor, clip: float) -> torch.Tensor:
    return (clip / (norms + 1e-12)).clamp(max=1.0)
