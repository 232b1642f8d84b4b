"""One merchant in the networked runtime: its data bundle, its private state on disk, its stages.

A merchant's node holds a bundle (its purchase matrices and the shared catalogue) and a state
directory. Its user table and item bias live in that directory, under the run's key (so a new
run never picks up an old run's tables), one file per completed round (`round-NNNN.pt`): they
survive a node restart, and a round that the coordinator repeats after a crash starts from the
state before it, never from a half-applied one. Only `wire.to_wire` of the
round's sums leaves the node. The math is the shared pure functions: `local_update`,
`merchant_sums`, `merchant_metric_sums`; nothing here is specific to Flower.

Stages, each answering with sums only:
  train     validation sums of the received model, then local_update -> the round's sums
  validate  validation sums of the received model (the last round's, for the best-round choice)
  refit     `train` on train + validation, by `refit_node()` (its own state directory, round numbers)
  buyers    its customers per product (train, train + validation): a large catalogue's prior
  prior     validation sums of the early-stopped model under each candidate prior weight
  content   validation sums of the early-stopped model under each candidate content-match weight
  finish    test sums of the released model (with the chosen prior or content match), and the
            merchant's own export files

With ALS's exact item step (DP-ALS, `privacy.mechanism = "als"`) every stage that receives a new
table first re-solves the customers against it (`ials_user_step`), as the in-process runtime does
right after the coordinator's solve: the users validated, tested and exported belong to it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

from fedrec import served_weight
from fedrec.atomic import atomic_dir, write_with
from fedrec.config import RunConfig, aggregation_rule
from fedrec.content_match import content_vectors, with_profiles
from fedrec.data import FederatedDataset, MerchantData
from fedrec.errors import FedrecError
from fedrec.evaluation import evaluate_test, evaluate_val
from fedrec.features import ItemFeatures, build_item_features
from fedrec.federated import content_choice, popularity_prior
from fedrec.federated.aggregation import merchant_sums
from fedrec.federated.local import ials_user_step, local_update
from fedrec.federated.messages import MerchantSums
from fedrec.federated.wire import TEST_PREFIX, TEST_USERS, VAL_HITS, VAL_USERS
from fedrec.folder_names import RULE, folder_name_problem
from fedrec.metrics import METRICS
from fedrec.model import init_item_bias, init_user_embeddings, item_embeddings
from fedrec.privacy.accountant import DPMechanism, plan_mechanism
from fedrec.served_weight import SERVED_WEIGHT_FILE

BUNDLE_FORMAT = 1
CATALOGUE = "catalogue.parquet"
NEW = "new"  # catalogue column: true for products nobody had bought (not trained; exported by content)


def catalogue_with_new(items: pl.DataFrame, new_items: pl.DataFrame | None) -> pl.DataFrame:
    """One catalogue file for every role: the trained products first, then the new ones."""
    frames = [items.with_columns(pl.lit(False).alias(NEW))]
    if new_items is not None and new_items.height:
        frames.append(new_items.select(items.columns).with_columns(pl.lit(True).alias(NEW)))
    return pl.concat(frames, how="vertical_relaxed")


def split_catalogue(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """(trained products, new products) of a catalogue file; a file without the column is all trained."""
    if NEW not in frame.columns:
        return frame, None
    new = frame[NEW].fill_null(False)
    return frame.filter(~new).drop(NEW), frame.filter(new).drop(NEW)


_STATE = re.compile(r"^round-(\d{4,})\.pt$")


@dataclass(frozen=True)
class MerchantBundle:
    """What one merchant's node loads: its own purchases and the shared catalogue."""

    merchant: MerchantData
    index: int  # position in the federation's merchant list (seeds, as in the in-process runtime)
    items: pl.DataFrame  # the trained products (the matrices' columns)
    new_items: pl.DataFrame | None = None  # catalogue products nobody had bought


def write_bundles(dataset: FederatedDataset, out: Path) -> list[Path]:
    """Split a dataset into one directory per merchant (what each merchant would hold at home)."""
    paths = []
    for i, m in enumerate(dataset.merchants):
        target = out / m.name
        with atomic_dir(target) as tmp:
            catalogue_with_new(dataset.items, dataset.new_items).write_parquet(tmp / CATALOGUE)
            sp.save_npz(tmp / "train.npz", m.train)
            sp.save_npz(tmp / "val.npz", m.val)
            sp.save_npz(tmp / "test.npz", m.test)
            pl.DataFrame({"user": m.user_ids.astype(str)}).write_parquet(tmp / "users.parquet")
            meta = {"format": BUNDLE_FORMAT, "merchant": m.name, "index": i, "dataset": dataset.name}
            (tmp / "bundle.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        paths.append(target)
    return paths


def load_bundle(path: Path) -> MerchantBundle:
    """Read a bundle; any problem is a FedrecError naming the file and what is wrong."""
    path = Path(path)
    meta_path = path / "bundle.json"
    if not meta_path.is_file():
        raise FedrecError(f"{meta_path}: not found (a merchant bundle is made by `fedrec federation prepare`)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        name, index = str(meta["merchant"]), int(meta["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise FedrecError(f"{meta_path}: unreadable bundle metadata ({exc})") from None
    if meta.get("format") != BUNDLE_FORMAT:
        raise FedrecError(f"{meta_path}: bundle format {meta.get('format')!r}, want {BUNDLE_FORMAT}")
    if (why := folder_name_problem(name)) is not None:  # the node writes its export half under this name
        raise FedrecError(f"{meta_path}: merchant {name!r} {why} ({RULE})")
    mats = {}
    for part in ("train", "val", "test"):
        f = path / f"{part}.npz"
        try:
            mats[part] = sp.load_npz(f).tocsr().astype(np.float32)
        except (OSError, ValueError) as exc:
            raise FedrecError(f"{f}: cannot read the {part} purchase matrix ({exc})") from None
    try:
        items, new_items = split_catalogue(pl.read_parquet(path / CATALOGUE))
        users = pl.read_parquet(path / "users.parquet")["user"].to_numpy()
    except Exception as exc:  # polars raises several types for a bad file
        raise FedrecError(f"{path}: cannot read the catalogue or user list ({exc})") from None
    shapes = {k: v.shape for k, v in mats.items()}
    if len({s for s in shapes.values()}) != 1 or shapes["train"] != (len(users), items.height):
        raise FedrecError(
            f"{path}: matrix shapes {shapes} do not match {len(users)} users x {items.height} catalogue items"
        )
    merchant = MerchantData(name, users, mats["train"], mats["val"], mats["test"])
    return MerchantBundle(merchant, index, items, new_items)


def write_merchant_export(
    target: Path,
    m: MerchantData,
    users: torch.Tensor,
    bias: torch.Tensor | None,
    n_catalogue: int | None = None,
    served: dict | None = None,
) -> None:
    """A merchant's private half of an export version: its user table, ids, purchases, bias, and
    the popularity weight its API serves by default (`served`, `ServedWeight.entry()`).

    With `n_catalogue` beyond the trained items (new products in the export), the purchases get
    empty columns for them and the bias gives each the median of this shop's bias over the
    trained products it never sold: what the model says of a product this shop has no sales of.

    A retried `finish` (after a coordinator restart) asks for the same version again: the old
    half is replaced, since the coordinator publishes LATEST only after every half is written.
    """
    if target.exists():
        shutil.rmtree(target)
    with atomic_dir(target) as tmp:
        np.save(tmp / "user_embeddings.npy", users.numpy().astype(np.float32))
        pl.DataFrame({"user": m.user_ids.astype(str)}).with_row_index("user_index").write_parquet(tmp / "users.parquet")
        # Everything the customer bought so far, for "exclude already bought".
        bought = (m.full_train + m.test).tocsr()
        n_new = (n_catalogue or bought.shape[1]) - bought.shape[1]
        if n_new:
            bought = sp.hstack([bought, sp.csr_matrix((bought.shape[0], n_new), dtype=bought.dtype)]).tocsr()
        sp.save_npz(tmp / "purchased.npz", bought)
        if bias is not None:  # this shop's own item popularity: private, like its users
            b = bias.numpy().astype(np.float32)
            if n_new:
                unsold = np.asarray(m.train.sum(axis=0)).ravel() == 0
                prior = float(np.median(b[unsold])) if unsold.any() else float(np.median(b))
                b = np.concatenate([b, np.full(n_new, prior, dtype=np.float32)])
            np.save(tmp / "item_bias.npy", b)
            if served is not None:
                (tmp / SERVED_WEIGHT_FILE).write_text(json.dumps(served, indent=2) + "\n")


class MerchantNode:
    """A merchant's node: the bundle in memory, the private state in `state_dir`."""

    def __init__(self, bundle: MerchantBundle, state_dir: Path, cfg: RunConfig) -> None:
        self.bundle, self.cfg = bundle, cfg
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.features: ItemFeatures = build_item_features(bundle.items, cfg.model.hash_buckets)

    @functools.cached_property
    def dp(self) -> DPMechanism | None:
        """The DP mechanism, from the config alone: planned once, on first use. Only training reads
        it, and the networked client builds a node (under DP, and its refit node) for every message,
        where planning a budget's noise costs about a second with the PRV accountant."""
        return plan_mechanism(self.cfg.privacy, self.cfg.federation.rounds, self.cfg.local.epochs)

    @property
    def name(self) -> str:
        return self.bundle.merchant.name

    # -- private state -------------------------------------------------------------------------
    def _rounds(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.state_dir.iterdir() if (m := _STATE.match(p.name)))

    def load_state(self, before: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The user table and item bias after the latest completed round < `before` (or fresh)."""
        done = [r for r in self._rounds() if r < before]
        if done:
            st = torch.load(self.state_dir / f"round-{done[-1]:04d}.pt", weights_only=True)
            return st["users"], st.get("bias")
        seed = self.cfg.federation.seed * 7919 + self.bundle.index
        m = self.bundle.merchant
        users = init_user_embeddings(m.n_users, self.cfg.model, torch.Generator().manual_seed(seed))
        return users, init_item_bias(self.features.n_items, self.cfg.model)

    def refit_node(self) -> MerchantNode:
        """This merchant for the refit (`federation.refit`): train + validation as its training
        data, and a state directory of its own, so the early-stopped state stays as it was."""
        bundle = dataclasses.replace(self.bundle, merchant=self.bundle.merchant.with_validation_in_train())
        return MerchantNode(bundle, self.state_dir / "refit", self.cfg)

    def state_at(self, rnd: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.load_state(before=rnd + 1)

    def save_state(self, rnd: int, users: torch.Tensor, bias: torch.Tensor | None, keep: set[int]) -> None:
        payload = {"users": users, **({"bias": bias} if bias is not None else {})}
        write_with(self.state_dir / f"round-{rnd:04d}.pt", lambda tmp: torch.save(payload, tmp))
        for r in self._rounds():  # keep this round, the one before and the coordinator's best so far
            if r < rnd - 1 and r not in keep:
                (self.state_dir / f"round-{r:04d}.pt").unlink(missing_ok=True)

    # -- stages ----------------------------------------------------------------------------------
    def _users_for(self, item_state: dict[str, torch.Tensor], users: torch.Tensor) -> torch.Tensor:
        """The customers for `item_state`: as saved, or under the exact item step solved against it."""
        if self.cfg.local.ials_item_step != "exact":
            return users
        m = self.bundle.merchant
        return ials_user_step(item_state, users, m.train, self.features, self.cfg.model, self.cfg.local)

    def _customers_at(self, item_state: dict[str, torch.Tensor], rnd: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The customers and item bias saved at round `rnd`, the customers for `item_state`."""
        users, bias = self.state_at(rnd)
        return self._users_for(item_state, users), bias

    def _val_sums(self, item_state: dict[str, torch.Tensor], users, bias) -> dict[str, torch.Tensor]:
        users = self._users_for(item_state, users)
        vecs = item_embeddings(item_state, self.features, self.cfg.model)
        val = evaluate_val(self.bundle.merchant, users, vecs, bias)
        return {VAL_HITS: torch.tensor(val.sums["recall@20"]), VAL_USERS: torch.tensor(float(val.users))}

    def train(
        self, item_state: dict[str, torch.Tensor], rnd: int, best_round: int, expected: dict
    ) -> dict[str, torch.Tensor]:
        users, bias = self.load_state(before=rnd)
        out = self._val_sums(item_state, users, bias)
        fed = self.cfg.federation
        seed = fed.seed * 1_000_003 + rnd * 1009 + self.bundle.index
        m = self.bundle.merchant
        res = local_update(
            item_state, users, m.train, self.features, self.cfg.model, self.cfg.local, seed, bias, self.dp, release=rnd
        )
        sums = merchant_sums(
            res.delta, res.num_examples, res.num_steps, res.touched_rows, res.mean_loss,
            aggregation_rule(self.cfg, self.features.n_items), fed.normalize_steps, res.item_terms,
        )  # fmt: skip
        out.update(sums)
        MerchantSums(out).validate(expected)  # the node's own check, before anything is sent
        self.save_state(rnd, res.user_embeddings, res.item_bias, keep={best_round})
        return out

    def validate(self, item_state: dict[str, torch.Tensor], rnd: int) -> dict[str, torch.Tensor]:
        users, bias = self.load_state(before=rnd)
        return self._val_sums(item_state, users, bias)

    def buyers(self) -> dict[str, torch.Tensor]:
        return popularity_prior.merchant_buyers(self.bundle.merchant)

    def prior(
        self, item_state: dict[str, torch.Tensor], best_round: int, buyers: np.ndarray
    ) -> dict[str, torch.Tensor]:
        """Validation sums of the early-stopped model under each candidate weight of the prior."""
        users, bias = self._customers_at(item_state, best_round)
        vecs = item_embeddings(item_state, self.features, self.cfg.model)
        weights = self.cfg.local.sampled_popularity_weights
        return popularity_prior.merchant_candidate_sums(self.bundle.merchant, users, vecs, bias, buyers, weights)

    def content(
        self, item_state: dict[str, torch.Tensor], best_round: int, basis: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Validation sums of the early-stopped model under each candidate content-match weight."""
        users, bias = self._customers_at(item_state, best_round)
        vecs = item_embeddings(item_state, self.features, self.cfg.model)
        z = content_vectors(self.features, basis)
        weights = self.cfg.model.content_match_weights
        return content_choice.merchant_candidate_sums(self.bundle.merchant, users, vecs, bias, z, weights)

    def choose_served_weight(
        self, early_state: dict[str, torch.Tensor], best_round: int, content: tuple[torch.Tensor, float] | None
    ) -> dict | None:
        """This merchant's served popularity weight, chosen on its validation slice with the
        early-stopped model and its content match, as `simulation.with_served_weights` chooses it:
        its bias, customers and validation purchases never leave it, so nothing is sent back."""
        users, vecs, bias = self._scoring_at(early_state, best_round, content)
        model = self.cfg.model
        chosen = served_weight.choose(
            self.bundle.merchant, users, vecs, bias, model.served_popularity_weights, model.max_top1_share
        )  # fmt: skip
        return None if chosen is None else chosen.entry()

    def _scoring_at(
        self, item_state: dict[str, torch.Tensor], rnd: int, content: tuple[torch.Tensor, float] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The customers, item vectors and bias of the model at round `rnd` with `item_state`, with
        the content match (basis, weight) added where given: profiles from what this node trained on."""
        users, bias = self._customers_at(item_state, rnd)
        if content is not None:
            basis, weight = content
            item_state = content_choice.with_match(item_state, basis, weight)
            users = with_profiles(users, self.bundle.merchant.train, content_vectors(self.features, basis), weight)
        return users, item_embeddings(item_state, self.features, self.cfg.model), bias

    def finish(
        self,
        item_state: dict[str, torch.Tensor],
        best_round: int,
        version: str,
        out_root: Path,
        prior_offsets: torch.Tensor | None = None,
        content: tuple[torch.Tensor, float] | None = None,
        served: dict | None = None,
    ) -> dict:
        """Test sums of the chosen model; writes this merchant's export under out_root. The chosen
        popularity prior's offsets, where there is one, join its item bias (served with it too); the
        chosen content match (basis, weight) adds its blocks, the profiles from what this node
        trained on (train, or train + validation for the refit's twin). `served`: the popularity
        weight this merchant chose to serve with (`choose_served_weight`), written with its export."""
        users, vecs, bias = self._scoring_at(item_state, best_round, content)
        if prior_offsets is not None:
            bias = popularity_prior.shifted(bias, prior_offsets)
        m = self.bundle.merchant
        test = evaluate_test(m, users, vecs, bias)
        new = self.bundle.new_items
        n_catalogue = m.train.shape[1] + (0 if new is None else new.height)
        target = Path(out_root) / "merchants" / m.name / version
        write_merchant_export(target, m, users, bias, n_catalogue, served)
        out = {TEST_PREFIX + k: torch.tensor(float(test.sums[k])) for k in METRICS}
        out[TEST_USERS] = torch.tensor(float(test.users))
        return out
