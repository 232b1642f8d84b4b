"""The co-purchase term (fedrec/copurchase.py): score += w s (x_c B)_i, EASE's B from the summed Gram."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from fedrec import copurchase
from fedrec.baselines import ease_weights
from fedrec.config import check_networked, load_config
from fedrec.copurchase import (
    ITEMS,
    ease_from_gram,
    gram,
    item_block,
    purchase_rows,
    score_spread,
    spread,
    with_block,
    with_purchases,
)
from fedrec.errors import ConfigError
from fedrec.evaluation import val_recall_and_firsts
from fedrec.features import build_item_features
from fedrec.federated import copurchase_choice
from fedrec.federated.local import LocalConfig
from fedrec.federated.simulation import FederationConfig, run_federated
from fedrec.metrics import top1_share
from fedrec.model import ModelConfig, catalogue_embeddings, item_embeddings, tower_state
from tests.conftest import train_tiny_export

MODEL = ModelConfig(dim=8, feature_dim=8, hidden=16, hash_buckets=512, content_match_weights=(0.0,))
FED = FederationConfig(rounds=3, patience=0)


def _purchases(rows: int, items: int, seed: int) -> sp.csr_matrix:
    return sp.random(rows, items, density=0.2, random_state=seed, format="csr", data_rvs=np.ones)


def test_the_summed_gram_gives_pooled_ease_exactly():
    """B needs only the sum of the merchants' X'X: the same B as EASE on the pooled matrix."""
    a, b = _purchases(30, 12, 0), _purchases(20, 12, 1)
    np.testing.assert_allclose(gram([a, b]), (sp.vstack([a, b]).T @ sp.vstack([a, b])).toarray())
    np.testing.assert_allclose(ease_from_gram(gram([a, b]), 7.0), ease_weights(sp.vstack([a, b]).tocsr(), 7.0),
                               atol=1e-12)  # fmt: skip
    assert not np.diag(ease_from_gram(gram([a]), 3.0)).any()


def test_the_range_solve_gives_the_inverse_b_and_is_used_only_when_the_rank_is_low(monkeypatch):
    """Fewer customers than products: B from G's range (every lambda) equals the inverse's B, products
    nobody bought included; a full-rank G falls back to the inverse."""
    monkeypatch.setattr(copurchase, "INVERSE_MAX_ITEMS", 10)
    few = _purchases(25, 900, 3).tolil()
    few[:, 17] = 0  # one product nobody bought
    g = gram([few.tocsr()])
    ranged = copurchase._range_of(g, np.random.default_rng(0))
    assert ranged is not None and ranged[0].shape[1] <= 25  # the rank, found
    solve = copurchase.ease_solver(g)
    monkeypatch.setattr(copurchase, "ease_from_gram", lambda *_: pytest.fail("the inverse was used"))
    for lam in (0.5, 10.0, 1000.0):
        b = solve(lam)
        np.testing.assert_allclose(b, ease_from_gram(g, lam), atol=1e-10)
        assert not b[17].any() and not b[:, 17].any() and not np.diag(b).any()
    full = gram([_purchases(600, 30 * 12, 4)])  # rank 360 > a third of the catalogue: no range
    assert copurchase._range_of(full, np.random.default_rng(0), start=16) is None


def test_the_score_identity_and_new_products_get_zeros():
    x = _purchases(5, 6, 2)
    b = ease_from_gram(gram([x]), 2.0)
    u, v, w, s = torch.randn(5, 3), torch.randn(6, 3), 0.7, 1.9
    score = with_purchases(u, purchase_rows(x), w) @ with_block(v, item_block(b, s)).T
    want = u @ v.T + w * s * torch.from_numpy((x.toarray() @ b).astype(np.float32))
    torch.testing.assert_close(score, want)
    wider = with_block(torch.randn(8, 3), item_block(b, s))  # two products nobody had bought
    assert wider.shape == (8, 9) and not wider[6:, 3:].any()


def test_the_spread_is_pooled_from_sums():
    a, b = torch.randn(4, 3), torch.randn(7, 3)
    items = torch.randn(5, 3)
    pooled = torch.cat([a @ items.T, b @ items.T]).double()
    assert spread([score_spread(a, items), score_spread(b, items)]) == pytest.approx(float(pooled.std(unbiased=False)))


def test_the_choice_scores_every_candidate_and_zero_keeps_the_model(tiny_dataset):
    features = build_item_features(tiny_dataset.items, MODEL.hash_buckets)
    off = run_federated(tiny_dataset, features, MODEL, LocalConfig(), FED)
    assert off.copurchase is None  # off by default
    model = dataclasses.replace(MODEL, copurchase_weights=(0.0, 0.5, 2.0), copurchase_lambdas=(10.0, 100.0))
    on = run_federated(tiny_dataset, features, model, LocalConfig(), FED)
    term = on.copurchase
    assert term is not None and set(term.scores) == set(term.rule) == {"0", "10/0.5", "10/2", "100/0.5", "100/2"}
    # the one-standard-error rule: the least concentrated of the candidates within one standard
    # error of the best validation recall (tests/test_one_se.py checks the rule itself)
    best = max(term.scores.values())
    within = [k for k, row in term.rule.items() if row["within_one_se"]]
    for k, row in term.rule.items():
        assert row["within_one_se"] == (best - term.scores[k] <= row["se_vs_best"] + 1e-12)
    chosen = "0" if term.weight == 0 else f"{term.lam:g}/{term.weight:g}"
    assert chosen in within
    assert term.rule[chosen]["top1_share"] == min(term.rule[k]["top1_share"] for k in within)
    if term.weight == 0:
        assert ITEMS not in on.item_state
    # the "0" row is the trained model's own validation lists: its top-1 share, made here directly
    judged = off.early_stopped or off  # the choice scores the model trained on train alone
    vecs = item_embeddings(judged.item_state, features, MODEL)
    firsts = np.concatenate([
        val_recall_and_firsts(m, judged.user_embeddings[m.name], vecs, judged.item_biases[m.name])[1]
        for m in tiny_dataset.merchants
    ])  # fmt: skip
    assert term.rule["0"]["top1_share"] == pytest.approx(top1_share(firsts[:, None]))
    # training itself is untouched, and the weight-0 candidate scores the early-stopped model
    assert [h.val_recall_at_20 for h in on.history] == [h.val_recall_at_20 for h in off.history]
    for k, v in off.item_state.items():
        torch.testing.assert_close(on.item_state[k], v)
    assert term.scores["0"] == pytest.approx(max(h.val_recall_at_20 for h in on.history), abs=1e-9)


def _forced(monkeypatch, weight: float = 1.5, lam: float = 20.0, scale: float = 0.8) -> None:
    """Validation's choice replaced by a fixed one, to test what follows the choice."""
    real = copurchase_choice.choose

    def choose(merchants, users, items, biases, cfg, val_rows):  # noqa: ANN001, ANN202
        chosen, _ = real(merchants, users, items, biases, cfg, val_rows)
        b = ease_from_gram(gram([m.train for m in merchants]), lam)
        return copurchase_choice.CoPurchase(weight, lam, scale, chosen.scores, b.shape[0], chosen.rule), b

    monkeypatch.setattr(copurchase_choice, "choose", choose)


def test_a_chosen_term_extends_both_sides_with_what_each_model_trained_on(tiny_dataset, monkeypatch):
    _forced(monkeypatch)
    features = build_item_features(tiny_dataset.items, MODEL.hash_buckets)
    model = dataclasses.replace(MODEL, copurchase_weights=(1.5,))
    res = run_federated(tiny_dataset, features, model, LocalConfig(), dataclasses.replace(FED, refit=True))
    assert res.refit_rounds > 0 and res.copurchase.weight == 1.5
    n = tiny_dataset.n_items
    # the refit's B is from train + validation, the early-stopped model's from train alone
    full = ease_from_gram(gram([m.full_train for m in tiny_dataset.merchants]), 20.0)
    torch.testing.assert_close(res.item_state[ITEMS], item_block(full, 0.8))
    early = ease_from_gram(gram([m.train for m in tiny_dataset.merchants]), 20.0)
    torch.testing.assert_close(res.early_stopped.item_state[ITEMS], item_block(early, 0.8))
    items = item_embeddings(res.item_state, features, model)
    assert items.shape == (n, model.dim + n)
    tower = item_embeddings(tower_state(res.item_state), features, model)
    torch.testing.assert_close(items[:, : model.dim], tower)
    for m in tiny_dataset.merchants:
        users = res.user_embeddings[m.name]
        torch.testing.assert_close(users[:, model.dim :], 1.5 * torch.from_numpy(m.full_train.toarray()).float())
    # the whole catalogue (a product nobody bought appended): zeros in the block
    grown = build_item_features(pl.concat([tiny_dataset.items, tiny_dataset.items.head(1).with_columns(
        pl.lit("NEW").alias("item"))]), MODEL.hash_buckets)  # fmt: skip
    whole = catalogue_embeddings(res.item_state, grown, model, n)
    assert whole.shape == (n + 1, model.dim + n) and not whole[n, model.dim :].any()


def test_never_under_dp_nor_past_the_size_limit_nor_networked():
    model = dataclasses.replace(MODEL, copurchase_weights=(0.5,))
    assert copurchase_choice.applies(model, 100, 50, private=False)
    assert not copurchase_choice.applies(model, 100, 50, private=True)
    assert not copurchase_choice.applies(model, copurchase_choice.MAX_ITEMS + 1, 50, private=False)
    many = copurchase_choice.MAX_CELLS // 100 + 1  # dense purchase rows past the memory budget
    assert not copurchase_choice.applies(model, 100, many, private=False)
    with pytest.raises(ConfigError, match="copurchase_weights: the co-purchase term runs in-process only"):
        check_networked(load_config(None, {"model.copurchase_weights": [0.5]}))
    check_networked(load_config(None, {"model.copurchase_weights": [0.0]}))  # off: fine


@pytest.mark.parametrize(
    ("setting", "value"),
    [("model.copurchase_weights", [-1.0]), ("model.copurchase_lambdas", [0.0]), ("model.copurchase_lambdas", [])],
)
def test_bad_settings_are_refused(setting, value):
    with pytest.raises(ConfigError, match=setting):
        load_config(None, {setting: value})


def test_the_api_serves_the_term_to_customers_and_baskets(tmp_path, tiny_csv, monkeypatch):
    """A model with the term (validation's choice forced): the export's vectors end with s B', a
    known customer's with w x, and a basket folds u in against the tower's part alone and appends
    its own w x, so it ranks as a customer with those purchases would."""
    from fastapi.testclient import TestClient

    from fedrec.serving.app import create_app
    from fedrec.serving.foldin import fold_in_many
    from fedrec.serving.settings import ServeSettings

    _forced(monkeypatch)
    root = train_tiny_export(tmp_path, tiny_csv, "model.content_match_weights=[0]", "model.copurchase_weights=[1.5]")
    card = json.loads((root / "model_card.json").read_text())
    width = card["copurchase"]["width"]
    assert card["copurchase"]["weight"] == 1.5 and width > 0 and card["dim"] == 16 + width
    assert "co-purchase counts summed over merchants" in card["privacy"]["copurchase_gram"]
    vectors = np.load(root / "item_embeddings.npy")
    items = pl.read_parquet(root / "items.parquet")["item"].to_list()
    settings = ServeSettings(export=str(tmp_path / "artifacts" / "file" / "exports"), merchant="big", watch_interval=0)
    with TestClient(create_app(settings)) as client:
        basket = [0, 1, 2]
        r = client.post("/v1/recommendations", json={"items": [items[i] for i in basket], "k": 10})
        assert r.status_code == 200, r.text
        u = fold_in_many(vectors[:, :16], [np.array(basket)], "softmax", 1.0, 1.0)
        x = np.zeros((1, width), dtype=np.float32)
        x[0, basket] = 1.0
        want = (np.hstack([u, 1.5 * x]) @ vectors.T)[0]
        want[basket] = -np.inf
        assert [it["id"] for it in r.json()["items"]] == [items[i] for i in np.argsort(-want)[:10]]
        np.testing.assert_allclose([it["score"] for it in r.json()["items"]], np.sort(want)[::-1][:10], rtol=1e-4)
    _sparse_block_scoring_matches_faiss(root)


def _sparse_block_scoring_matches_faiss(root) -> None:  # noqa: ANN001
    """The API scores the co-purchase block sparsely (`recommend.exact_top`): the same top-10 and
    scores as FAISS's dense flat search, for every customer, with and without a merchant's bias."""
    from fedrec.serving.export_store import load_export
    from fedrec.serving.index import build_index, search_index
    from fedrec.serving.recommend import exact_top, served_index

    export = load_export(root, "big")
    assert export.kind == "flat" and export.copurchase[1] > 0
    bias = np.random.default_rng(0).standard_normal(export.n_items).astype(np.float32)
    own = build_index(np.hstack([export.item_vectors, bias[:, None]]), "flat")
    biased = dataclasses.replace(export, merchant=dataclasses.replace(export.merchant, item_bias=bias, index=own))
    for served, weight in ((export, None), (biased, 0.5)):
        index, queries = served_index(served, served.merchant.user_vectors, weight)
        assert queries.shape[1] == export.dim + (weight is not None)
        want_scores, want_rows = search_index(index, queries, 10)
        scores, rows = exact_top(served, queries, 10)
        # every position's score is FAISS's, and each is its row's own score (rounding may swap
        # near-ties, as it did for 2 of 6,190 rows)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-5)
        table = np.hstack([export.item_vectors, bias[:, None]]) if weight is not None else export.item_vectors
        own = np.einsum("qd,qkd->qk", queries.astype(np.float64), table[rows].astype(np.float64))
        np.testing.assert_allclose(scores, own, rtol=1e-4, atol=1e-5)
        assert (rows != want_rows).mean() < 0.01
