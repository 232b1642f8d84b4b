"""The content match (fedrec/content_match.py): score += w p_c . z_i, w chosen on validation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from fedrec.content_match import (
    BASIS,
    WEIGHT,
    basis_from_rows,
    basis_rows,
    content_basis,
    content_vectors,
    customer_profiles,
    shared_tokens,
    top_right_singular_vectors,
    with_content,
    with_profiles,
)
from fedrec.content_profiles import with_basket_profiles
from fedrec.errors import ConfigError
from fedrec.evaluation import evaluate_test_all
from fedrec.features import build_item_features
from fedrec.federated import content_choice
from fedrec.federated.local import LocalConfig
from fedrec.federated.simulation import FederationConfig, run_federated, with_validation_in_train
from fedrec.model import ModelConfig, catalogue_embeddings, item_embeddings, tower_state
from fedrec.privacy.accountant import DPMechanism
from tests.conftest import train_tiny_export

MODEL = ModelConfig(dim=8, feature_dim=8, hidden=16, hash_buckets=512, use_content=False, content_match_dim=8)
FED = FederationConfig(rounds=3, patience=0)


def _items(titles: list[str], categories: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"item": [f"P{i}" for i in range(len(titles))], "title": titles, "category": categories})


def test_basis_is_fixed_and_vectors_follow_shared_tokens():
    items = _items(
        ["red wool scarf", "red wool hat", "steel kitchen knife", "steel chef knife", "green garden hose"],
        ["fashion", "fashion", "kitchen", "kitchen", "garden"],
    )
    features = build_item_features(items, 512)
    basis = content_basis(features, 3)
    assert basis is not None and basis.shape == (513, 3)
    torch.testing.assert_close(basis, content_basis(features, 3))  # the same basis every run
    assert not basis[-1].any()  # padding adds nothing
    z = content_vectors(features, basis)
    # the hose shares no token with another product: nothing to match on, a zero vector
    torch.testing.assert_close(z.norm(dim=1), torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))
    sim = z @ z.T
    assert sim[0, 1] > sim[0, 2] and sim[2, 3] > sim[2, 0]  # scarf nearer hat; knife nearer knife


def test_the_wire_form_holds_the_shared_tokens_rows_and_loses_nothing():
    """The networked runtime sends only the shared tokens' rows: every other row is zero, so the
    node, which counts the same tokens in its own copy of the catalogue, rebuilds the whole basis."""
    items = _items(
        ["red wool scarf", "red wool hat", "steel kitchen knife", "steel chef knife", "green garden hose"],
        ["fashion", "fashion", "kitchen", "kitchen", "garden"],
    )
    features = build_item_features(items, 512)
    basis = content_basis(features, 3)
    shared = shared_tokens(features)
    outside = np.setdiff1d(np.arange(basis.shape[0]), shared)
    assert basis[outside].abs().sum() == 0 and basis[shared].abs().sum(dim=1).gt(0).all()
    rows = basis_rows(basis, features)
    assert rows.shape == (len(shared), 3) and len(shared) < 20  # red, wool, steel, knife, two categories
    assert torch.equal(basis_from_rows(rows, build_item_features(items, 512)), basis)


def test_no_content_no_basis():
    items = pl.DataFrame({"item": ["a", "b", "c"], "title": [None, None, None]}, schema_overrides={"title": pl.String})
    assert content_basis(build_item_features(items, 64), 8) is None
    # a file without metadata: each title is the product's id, so only hash collisions are shared
    ids = [f"P{i:05d}" for i in range(400)]
    ids_only = build_item_features(pl.DataFrame({"item": ids, "title": ids}), 16384)
    assert content_basis(ids_only, 8) is None
    # one shared word among them is content again
    worded = build_item_features(pl.DataFrame({"item": ids, "title": [f"{t} {'mug' if i % 2 else 'lamp'}"
                                                                       for i, t in enumerate(ids)]}), 512)  # fmt: skip
    assert content_basis(worded, 8) is not None


def test_a_token_the_basis_never_saw_gives_a_zero_vector():
    features = build_item_features(_items(["a b", "b c", "c d"], ["x", "y", "z"]), 512)
    basis = content_basis(features, 2)
    unseen = build_item_features(_items(["qqq"], ["www"]), 512)
    assert content_vectors(unseen, basis).abs().max() == 0


def test_profiles_and_the_score_identity():
    z = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    bought = sp.csr_matrix(np.array([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 2, 0, 0, 1]], dtype=float))
    p = customer_profiles(bought, z)
    torch.testing.assert_close(p[0], torch.nn.functional.normalize(z[0] + z[1], dim=0))
    assert not p[1].any()  # no purchases: no profile
    torch.testing.assert_close(p[2], torch.nn.functional.normalize(2 * z[2] + z[5], dim=0))
    u, v, w = torch.randn(3, 5), torch.randn(6, 5), 1.5
    score = with_profiles(u, bought, z, w) @ torch.cat([v, z], 1).T
    torch.testing.assert_close(score, u @ v.T + w * p @ z.T)
    basket = with_basket_profiles(u[[0, 2]].numpy(), [np.array([0, 1]), np.array([2, 2, 5])], z.numpy(), w)
    torch.testing.assert_close(torch.from_numpy(basket), with_profiles(u, bought, z, w)[[0, 2]])


def test_the_choice_scores_every_weight_on_validation_and_zero_keeps_the_model(tiny_dataset):
    features = build_item_features(tiny_dataset.items, MODEL.hash_buckets)
    off = run_federated(tiny_dataset, features, dataclasses.replace(MODEL, content_match_weights=(0.0,)),
                        LocalConfig(), FED)  # fmt: skip
    assert off.content_match is None  # nothing to choose
    on = run_federated(tiny_dataset, features, MODEL, LocalConfig(), FED)
    match = on.content_match
    assert match is not None and set(match.scores) == set(MODEL.content_match_weights)
    assert match.weight == max(match.scores, key=match.scores.get)
    # training itself is untouched: the same rounds, sums and tower as without the match
    assert [h.val_recall_at_20 for h in on.history] == [h.val_recall_at_20 for h in off.history]
    for k, v in off.item_state.items():
        torch.testing.assert_close(on.item_state[k], v)
    # the weight-0 candidate scores the model as trained (the early-stopped one, on validation)
    assert match.scores[0.0] == pytest.approx(max(h.val_recall_at_20 for h in on.history), abs=1e-9)


def test_a_chosen_match_extends_both_sides_with_the_profiles_of_what_each_model_trained_on(tiny_dataset):
    features = build_item_features(tiny_dataset.items, MODEL.hash_buckets)
    model = dataclasses.replace(MODEL, content_match_weights=(2.0,))  # forced: the only candidate
    res = run_federated(tiny_dataset, features, model, LocalConfig(), dataclasses.replace(FED, refit=True))
    assert res.content_match.weight == 2.0 and res.refit_rounds > 0
    basis = res.item_state[BASIS]
    assert float(res.item_state[WEIGHT]) == 2.0
    z = content_vectors(features, basis)
    items = item_embeddings(res.item_state, features, model)
    assert items.shape[1] == model.dim + basis.shape[1]
    torch.testing.assert_close(items[:, model.dim :], z)
    for m in tiny_dataset.merchants:
        released, early = res.user_embeddings[m.name], res.early_stopped.user_embeddings[m.name]
        torch.testing.assert_close(released[:, model.dim :], 2.0 * customer_profiles(m.full_train, z))
        torch.testing.assert_close(early[:, model.dim :], 2.0 * customer_profiles(m.train, z))
    # and it scores: the tower's score plus w p . z, through every reader of the state
    tower = item_embeddings(tower_state(res.item_state), features, model)
    m = tiny_dataset.merchants[0]
    u = res.user_embeddings[m.name]
    expected = u[:, : model.dim] @ tower.T + 2.0 * customer_profiles(m.full_train, z) @ z.T
    torch.testing.assert_close(u @ items.T, expected)
    assert evaluate_test_all(tiny_dataset.merchants, res.user_embeddings, items, res.item_biases)["users"] > 0


def test_new_products_get_their_own_content_block(tiny_dataset):
    features = build_item_features(tiny_dataset.items, MODEL.hash_buckets)
    n = 150  # train on the first 150 products' tokens, then embed all 200 as the export does
    known = dataclasses.replace(features, tokens=features.tokens[:n])
    basis = content_basis(known, 8)
    state = {**tower_state_of(n), BASIS: basis, WEIGHT: torch.tensor(1.0)}
    vecs = catalogue_embeddings(state, features, MODEL, n)
    torch.testing.assert_close(vecs[:, MODEL.dim :], content_vectors(features, basis))
    without = catalogue_embeddings(tower_state(state), features, MODEL, n)
    torch.testing.assert_close(vecs[:, : MODEL.dim], without)
    torch.testing.assert_close(with_content(without, features, basis), vecs)


def tower_state_of(n_items: int) -> dict[str, torch.Tensor]:
    from fedrec.model import initial_item_state

    return initial_item_state(n_items, MODEL, 0)


def test_without_validation_customers_the_model_stays_as_trained():
    total = {"content/0/val/recall@20": 0.0, "content/0/val/users": 0.0,
             "content/1/val/recall@20": 0.0, "content/1/val/users": 0.0}  # fmt: skip
    assert content_choice.choose_from_sums(total, (0.0, 1.0)) == (0.0, {})


def test_the_choice_keeps_the_model_as_trained_on_a_tie():
    total = {"content/0/val/recall@20": 1.0, "content/0/val/users": 4.0,
             "content/1/val/recall@20": 1.0, "content/1/val/users": 4.0}  # fmt: skip
    assert content_choice.choose_from_sums(total, (0.0, 1.0))[0] == 0.0


def test_the_api_serves_the_match_to_customers_and_baskets(tmp_path, tiny_csv):
    """A model trained with the match forced on: the export's vectors carry both blocks, a known
    customer ranks by [u, w p] . [v, z], and a basket folds u in against the tower's part alone
    (as training never saw the match) and adds its own w p."""
    from fastapi.testclient import TestClient

    from fedrec.config import config_from_dict
    from fedrec.serving.app import create_app
    from fedrec.serving.foldin import fold_in_many
    from fedrec.serving.settings import ServeSettings
    from fedrec.training.data import load_dataset

    train_tiny_export(tmp_path, tiny_csv, "model.content_match_weights=[1.5]", "model.content_match_dim=8",
                      "model.copurchase_weights=[]")  # fmt: skip
    root = tmp_path / "artifacts" / "file"
    card = json.loads((root / "exports" / "v0001" / "model_card.json").read_text())
    assert card["content_match"]["weight"] == 1.5 and card["dim"] == 16 + 8
    vectors = np.load(root / "exports" / "v0001" / "item_embeddings.npy")
    items = pl.read_parquet(root / "exports" / "v0001" / "items.parquet")["item"].to_list()
    z = vectors[:, 16:]
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    mdir = root / "merchants" / "big" / "v0001"
    users = np.load(mdir / "user_embeddings.npy")
    trained = config_from_dict(torch.load(root / "checkpoint.pt", weights_only=False)["config"])
    big = next(m for m in load_dataset(trained.data, trained.federation.seed).merchants if m.name == "big")
    # the released model is the refit: its customers' profiles are of everything before the test cut-off
    want = 1.5 * customer_profiles(big.full_train, torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(users[:, 16:], want, atol=1e-5)

    settings = ServeSettings(export=str(root / "exports"), merchant="big", watch_interval=0)
    with TestClient(create_app(settings)) as client:
        basket = [0, 1, 2]
        r = client.post("/v1/recommendations", json={"items": [items[i] for i in basket], "k": 10})
        assert r.status_code == 200, r.text
        u = fold_in_many(vectors[:, :16], [np.array(basket)], "softmax", 1.0, 1.0)
        want = with_basket_profiles(u, [np.array(basket)], z, 1.5) @ vectors.T
        want = want[0]
        want[basket] = -np.inf
        assert [it["id"] for it in r.json()["items"]] == [items[i] for i in np.argsort(-want)[:10]]
        np.testing.assert_allclose([it["score"] for it in r.json()["items"]], np.sort(want)[::-1][:10], rtol=1e-4)


def test_the_seeded_svd_finds_the_leading_directions_and_repeats_itself():
    rng = np.random.default_rng(1)
    x = sp.random(300, 120, density=0.05, random_state=2, format="csr") + sp.csr_matrix(
        np.outer(rng.random(300), rng.random(120)) * 3
    )  # a clear leading direction on top of sparse noise
    v = top_right_singular_vectors(x, 5)
    _, s, vt = np.linalg.svd(x.toarray(), full_matrices=False)
    np.testing.assert_allclose(np.abs(v[:, 0] @ vt[0]), 1.0, atol=1e-6)
    # the five found span the five leading directions (up to rotation within them)
    np.testing.assert_allclose(np.linalg.svd(vt[:5] @ v, compute_uv=False), 1.0, atol=1e-3)
    np.testing.assert_array_equal(v, top_right_singular_vectors(x, 5))  # the same basis every call


def test_under_dp_only_a_fixed_weight_applies_and_validation_is_not_read(tiny_dataset):
    mech = DPMechanism(clip=1.0, noise_multiplier=2.0, sample_rate=0.5, steps_per_round=2, delta=1e-5,
                       target_epsilon=50.0)  # fmt: skip
    features = build_item_features(tiny_dataset.items, MODEL.hash_buckets)
    fed = dataclasses.replace(FED, refit=False)
    choosing = run_federated(tiny_dataset, features, MODEL, LocalConfig(), fed, dp=mech)
    assert choosing.content_match is None  # a choice would read validation outside the accountant
    fixed_model = dataclasses.replace(MODEL, content_match_weights=(0.5,))
    fixed = run_federated(tiny_dataset, features, fixed_model, LocalConfig(), fed, dp=mech)
    assert fixed.content_match.weight == 0.5 and fixed.content_match.scores == {}
    for k, v in choosing.item_state.items():  # the DP release itself is the same; the basis is public
        torch.testing.assert_close(tower_state(fixed.item_state)[k], v)
    assert fixed.privacy == choosing.privacy
    # nothing is read from validation: with none left, the fixed weight still applies ...
    no_val = with_validation_in_train(tiny_dataset)
    assert run_federated(no_val, features, fixed_model, LocalConfig(), fed, dp=mech).content_match.weight == 0.5
    # ... where a non-private choice has nothing to choose on and keeps the model as trained
    plain = run_federated(no_val, features, MODEL, LocalConfig(), fed)
    assert plain.content_match.weight == 0 and plain.content_match.scores == {}


def test_a_customers_purchases_reach_only_their_own_profile():
    """The claim behind the DP form: p_c enters c's own scores only (the shared side, z, is a
    function of the catalogue alone; `content_basis` reads no purchase)."""
    z = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    bought = sp.csr_matrix(np.random.default_rng(0).integers(0, 2, (5, 8)).astype(float))
    changed = bought.tolil()
    changed[2, :] = 0
    changed[2, 7] = 3.0
    before, after = customer_profiles(bought, z), customer_profiles(changed.tocsr(), z)
    rows = [0, 1, 3, 4]
    torch.testing.assert_close(before[rows], after[rows])
    assert not torch.allclose(before[2], after[2])


def test_bad_settings_are_refused_with_the_setting_named():
    from fedrec.config import load_config

    assert load_config(None, {"model.content_match_weights": []}).model.content_match_weights == ()
    for bad in ([-1.0], [float("inf")], ["high"], [True]):
        with pytest.raises(ConfigError, match="model.content_match_weights must be"):
            load_config(None, {"model.content_match_weights": bad})
    with pytest.raises(ConfigError, match="model.content_match_dim must be >= 1"):
        load_config(None, {"model.content_match_dim": 0})
