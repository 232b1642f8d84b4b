"""ALS's exact item step, federated: each merchant sends sums, the coordinator solves.

With every customer's vector u fixed (each merchant has just solved its own: ALS's user step,
`fedrec.ials_users`), product i's part of the iALS loss is quadratic, and its minimiser solves

    (U'U + alpha U_i'U_i + reg I) v_i = (1 + alpha) U_i'1

with U_i the customers who bought i (Hu et al., 2008). Every term is a sum over customers, so a
sum over merchants: merchant k sends U_k'U_k, and per product alpha U_ki'U_ki and (1 + alpha) U_ki'1
(`item_step_terms`); the round's sum of these (added in the clear or by secure aggregation) is all
the coordinator needs to solve the table (`item_step_delta`). In-process they are added in the
clear; the networked runtime does not run this step yet, as its terms have no public bound to
scale into SecAgg+'s fixed range (`config.check_networked`). The federation then runs exactly
centralized ALS on the pooled purchases (tested against it), with no step size to choose: the SGD
item step (`local.ials_item_step = "sgd"`) needs `local.ials_lr` and moves a row a little per round.

What it costs and shows: the message holds n_items x (dim^2 + dim) numbers, so it suits the small
dimensions ALS uses (16 here: 1.1 KB a product), and only id-table towers (no content MLP to
solve for). Like any delta, a merchant's terms are non-zero only for the products it sold, so they
tell the coordinator what each merchant sold.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.errors import ConfigError
from fedrec.ials_users import ials_normal_terms
from fedrec.model import ID_TABLE as TABLE  # the one tensor of an id-only tower with one row per product

if TYPE_CHECKING:
    from fedrec.federated.local import LocalConfig
    from fedrec.federated.simulation import FederationConfig
    from fedrec.model import ModelConfig

GRAM, LHS, RHS = "als/gram", "als/lhs", "als/rhs"


def exact_step_problems(
    model: ModelConfig,
    local: LocalConfig,
    fed: FederationConfig,
    *,
    set_keys: Collection[str] | None = None,
    counted_bias: bool = False,
) -> list[str]:
    """Why these settings cannot take the exact item step, one message each ([] when they can, or
    when they do not ask for it). The config refuses a run with any; a candidate with any is
    skipped (`candidates.unsupported`): the coordinator solves an id table from every customer's
    terms, and its delta lands the table on the solution. With `set_keys` ("local.loss", ...),
    only the problems that one of those settings causes: what a candidate breaks by itself, which
    the config refuses up front, rather than what the run it joins cannot give. `counted_bias`: DP-ALS
    sets the merchant item bias from noised counts (`noisy_als.count_bias`), not by solving."""
    if local.ials_item_step != "exact":
        return []
    need = "local.ials_item_step = 'exact' "
    checks = [
        (("local.loss",), local.loss == "ials", "is the ials loss's item step: set local.loss = 'ials'"),
        (
            ("local.user_solve_reg",),
            local.user_solve_reg > 0,
            "follows ALS's user step: set local.user_solve_reg > 0 (its reg)",
        ),
        (("model.use_item_id",), model.use_item_id, "solves an id table: set model.use_item_id = true"),
        (("model.use_content",), not model.use_content, "solves an id table alone: set model.use_content = false"),
        (
            ("model.merchant_item_bias",),
            counted_bias or not model.merchant_item_bias,
            "solves an id table alone: set model.merchant_item_bias = false (DP-ALS: or privacy.count_share > 0)",
        ),
        (
            ("federation.aggregation",),
            fed.aggregation == "auto",
            "is aggregated by solving: set federation.aggregation = 'auto'",
        ),
        (
            ("federation.robust",),
            fed.robust == "none",
            "solves from the sum of every merchant's terms: set federation.robust = 'none'",
        ),
        (
            ("federation.sum_clip",),
            fed.sum_clip == 0,
            "lands the table on the solution, which a bound on the averaged rows would not: set "
            "federation.sum_clip = 0",
        ),
        (
            ("federation.fraction",),
            fed.fraction == 1,
            "solves each product from every merchant that sold it; a round without some merchants would zero "
            "their products: set federation.fraction = 1",
        ),
        (
            ("federation.upload_precision",),
            fed.upload_precision == "float32",
            "sends sums of squares that half precision would round or overflow: set federation.upload_precision = "
            "'float32'",
        ),
        (
            ("federation.server.name", "federation.server.lr"),
            fed.server.name == "fedavg" and fed.server.lr == 1,
            "lands the table on the solution: set federation.server.name = 'fedavg' and federation.server.lr = 1",
        ),
    ]
    return [need + why for keys, ok, why in checks if not ok and (set_keys is None or any(k in set_keys for k in keys))]


def item_step_names(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The terms a merchant's message holds, with their shapes, for a tower of `shapes`."""
    if set(shapes) != {TABLE}:
        raise ConfigError(
            "local.ials_item_step = 'exact' solves an id table with one row per product: it needs "
            "model.use_content = false and a catalogue of at most 2 x model.id_rows products (or model.id_rows = 0)"
        )
    n_items, dim = shapes[TABLE]
    return {GRAM: (dim, dim), LHS: (n_items, dim, dim), RHS: (n_items, dim)}


def item_step_terms(users: np.ndarray, purchases: sp.csr_matrix, alpha: float) -> dict[str, torch.Tensor]:
    """One merchant's terms of the item step (pure): its customers' vectors (one row each) and its
    purchase matrix (customers x items). Customers without purchases are left out: ALS's user step
    gives them the zero vector, which adds nothing."""
    bought = np.flatnonzero(np.diff(purchases.indptr))
    u = np.asarray(users, dtype=np.float64)[bought]
    lhs, rhs = ials_normal_terms(u, purchases[bought].T.tocsr(), alpha)
    return {
        GRAM: torch.from_numpy(u.T @ u).float(),
        LHS: torch.from_numpy(lhs).float(),
        RHS: torch.from_numpy(rhs).float(),
    }


def solve_item_table(total: Mapping[str, torch.Tensor], reg: float) -> torch.Tensor:
    """The item table that minimises the iALS loss given the round's summed terms (pure). A product
    nobody bought this round gets the zero vector, as in ALS."""
    gram = total[GRAM].double()
    lhs = total[LHS].double() + gram + reg * torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.linalg.solve(lhs, total[RHS].double()).float()


def item_step_delta(
    total: Mapping[str, torch.Tensor], item_state: Mapping[str, torch.Tensor], reg: float
) -> dict[str, torch.Tensor]:
    """The server step that lands the table on the solution (with fedavg at lr 1, which the config
    requires for this step)."""
    return {TABLE: solve_item_table(total, reg) - item_state[TABLE]}
