"""The federated loop on the tiny shop: privacy of messages, determinism, and that it learns."""

import dataclasses

import pytest
import torch

from fedrec.baselines import popularity
from fedrec.data import pooled
from fedrec.evaluation import evaluate_test_all
from fedrec.features import build_item_features
from fedrec.federated.aggregation import sum_names
from fedrec.federated.local import LocalConfig
from fedrec.federated.messages import MerchantSums
from fedrec.federated.simulation import FederationConfig, run_federated
from fedrec.model import ModelConfig, item_embeddings, item_tower_shapes

MODEL = ModelConfig(dim=16, feature_dim=16, hidden=32, hash_buckets=1024)
LOCAL = LocalConfig(batch_size=128, temperature=0.5, weight_decay=0.1, lr=0.01, user_lr=0.05)


@pytest.fixture(scope="module")
def features(tiny_dataset):
    return build_item_features(tiny_dataset.items, MODEL.hash_buckets)


@pytest.mark.parametrize(("bias", "rule"), [(False, "fedavg"), (True, "fedavg"), (False, "rowwise")])
def test_messages_carry_only_the_round_sums_of_the_item_tower(tiny_dataset, features, bias, rule):
    sent: list[tuple[str, MerchantSums]] = []
    cfg = FederationConfig(rounds=2, patience=0, aggregation=rule)
    model = dataclasses.replace(MODEL, merchant_item_bias=bias)
    result = run_federated(tiny_dataset, features, model, LOCAL, cfg, on_message=lambda n, u: sent.append((n, u)))
    # the refit's rounds (on train + validation) send the same kind of message
    assert result.refit_rounds == result.best_round >= 1
    assert len(sent) == (2 + result.refit_rounds) * len(tiny_dataset.merchants)
    tower = item_tower_shapes(tiny_dataset.n_items, MODEL)
    for name, msg in sent:
        assert [f.name for f in dataclasses.fields(msg)] == ["tensors"]
        assert {k: tuple(v.shape) for k, v in msg.tensors.items()} == sum_names(tower, rule)
        # under fedavg nothing tells which items the shop sold; rowwise sends that on purpose
        assert any(k.startswith("rows/") for k in msg.tensors) == (rule == "rowwise")
        n_users = tiny_dataset.merchant(name).n_users
        users = result.user_embeddings[name]
        for t in msg.tensors.values():
            # no tensor is shaped like, or contains, a row of the merchant's user table
            assert t.dim() == 0 or t.shape[0] != n_users
            if t.ndim == 2 and t.shape[1] == users.shape[1]:
                assert torch.cdist(users, t).min() > 1e-6
        own_bias = result.item_biases[name]
        assert (own_bias is not None) == bias
        if bias:  # the shop's own item bias trained (moved off zero) but no message carries it
            assert own_bias.abs().max() > 1e-4
            for t in msg.tensors.values():
                if t.shape == own_bias.shape:
                    assert not torch.allclose(t, own_bias, atol=1e-6)
                if t.ndim == 2 and t.shape[0] == own_bias.shape[0]:  # no column of the item table is it
                    assert not any(torch.allclose(col, own_bias, atol=1e-6) for col in t.T)


def test_the_default_auto_rule_trains_exactly_as_rowwise_here(tiny_dataset, features):
    # one id row per product and no DP: auto is rowwise (fedrec/federated/aggregation.py)
    runs = {
        rule: run_federated(
            tiny_dataset, features, MODEL, LOCAL, FederationConfig(rounds=2, patience=0, aggregation=rule)
        )
        for rule in ("auto", "rowwise", "fedavg")
    }
    assert FederationConfig().aggregation == "auto"
    for k, v in runs["auto"].item_state.items():
        assert torch.equal(v, runs["rowwise"].item_state[k])
    assert any(not torch.equal(v, runs["fedavg"].item_state[k]) for k, v in runs["auto"].item_state.items())


def test_same_seed_same_model(tiny_dataset, features):
    cfg = FederationConfig(rounds=2, patience=0, seed=3)
    a = run_federated(tiny_dataset, features, MODEL, LOCAL, cfg)
    b = run_federated(tiny_dataset, features, MODEL, LOCAL, cfg)
    for k in a.item_state:
        assert torch.equal(a.item_state[k], b.item_state[k])


def test_merchants_trained_on_worker_threads_give_the_same_model_bit_for_bit(tiny_dataset, features):
    """federation.workers = 2 trains two merchants at once; their messages are still summed in
    the round's order, so the model, user tables and history equal the one-worker run's."""
    cfg = FederationConfig(rounds=2, patience=0, seed=3, refit=True)
    one = run_federated(tiny_dataset, features, MODEL, LOCAL, cfg)
    two = run_federated(tiny_dataset, features, MODEL, LOCAL, dataclasses.replace(cfg, workers=2))
    assert one.refit_rounds == two.refit_rounds >= 1
    for k in one.item_state:
        assert torch.equal(one.item_state[k], two.item_state[k])
    for name in one.user_embeddings:
        assert torch.equal(one.user_embeddings[name], two.user_embeddings[name])
    assert [(h.merchants, h.loss) for h in one.history] == [(h.merchants, h.loss) for h in two.history]


def test_in_order_yields_in_the_given_order_with_at_most_workers_held():
    import threading
    import time

    from fedrec.federated.simulation import in_order

    running, peak, lock = [0], [0], threading.Lock()

    def work(name: str) -> str:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02 if name in "ace" else 0.001)  # finish out of order
        with lock:
            running[0] -= 1
        return name.upper()

    got = list(in_order(work, list("abcdefg"), workers=3))
    assert got == [(n, n.upper()) for n in "abcdefg"]
    assert 2 <= peak[0] <= 3


def test_fraction_samples_merchants(tiny_dataset, features):
    cfg = FederationConfig(rounds=6, fraction=0.3, patience=0)
    res = run_federated(tiny_dataset, features, MODEL, LOCAL, cfg)
    assert all(len(h.merchants) == 1 for h in res.history)
    assert len({tuple(h.merchants) for h in res.history}) >= 2  # the sample changes between rounds


def test_tiny_shop_federated_run_with_merchant_bias_beats_popularity(tiny_dataset, features):
    """The CI-sized end-to-end check (no external data): three non-IID shops, the shipped recipe."""
    model = dataclasses.replace(MODEL, use_content=False, merchant_item_bias=True)
    local = dataclasses.replace(LOCAL, temperature=1.0)
    res = run_federated(tiny_dataset, features, model, local, FederationConfig(rounds=30, patience=8))
    items = item_embeddings(res.item_state, features, model)
    fed = evaluate_test_all(tiny_dataset.merchants, res.user_embeddings, items, res.item_biases)
    u, v = popularity(pooled(tiny_dataset).full_train)
    pop = evaluate_test_all(
        tiny_dataset.merchants,
        dict(zip([m.name for m in tiny_dataset.merchants], _split(u, tiny_dataset), strict=True)),
        v,
    )
    assert fed["overall"]["recall@20"] > pop["overall"]["recall@20"] + 0.02


def _split(u, dataset):
    out, start = [], 0
    for m in dataset.merchants:
        out.append(u[start : start + m.n_users])
        start += m.n_users
    return out


@pytest.mark.parametrize("server", ["fedavg", "fedadam"])
def test_small_federated_run_beats_popularity(ml_dataset, server):
    """Three regional stores of MovieLens (about 290 customers): federation must learn."""
    from fedrec.data import FederatedDataset
    from fedrec.federated.server_opt import ServerOptConfig

    part = FederatedDataset("ml-slice", ml_dataset.items, ml_dataset.merchants[:3])
    model = ModelConfig(dim=32, feature_dim=32, hidden=64, hash_buckets=4096)
    local = LocalConfig(temperature=0.5, weight_decay=0.1)
    feats = build_item_features(part.items, model.hash_buckets)
    srv = ServerOptConfig(name=server, lr=1.0 if server == "fedavg" else 0.01)
    # No refit: what is tested is that the rounds learn, not the refit (tested in its own tests).
    res = run_federated(part, feats, model, local, FederationConfig(rounds=25, patience=5, server=srv, refit=False))
    items = item_embeddings(res.item_state, feats, model)
    fed = evaluate_test_all(part.merchants, res.user_embeddings, items)
    u, v = popularity(pooled(part).full_train)
    pop = evaluate_test_all(part.merchants, {m.name: u[: m.n_users] for m in part.merchants}, v)
    assert fed["overall"]["recall@20"] > pop["overall"]["recall@20"] + 0.02


def test_fedprox_pulls_local_steps_towards_the_received_tower(tiny_dataset, features):
    """mu = 0 is FedAvg's local update bit for bit; a larger mu gives a shorter delta."""
    from fedrec.federated.local import local_update
    from fedrec.model import init_user_embeddings, new_item_tower

    m = tiny_dataset.merchants[0]
    state = {k: v.detach().clone() for k, v in new_item_tower(tiny_dataset.n_items, MODEL, 0).state_dict().items()}
    users = init_user_embeddings(m.n_users, MODEL, torch.Generator().manual_seed(0))

    def delta_norm(mu: float) -> tuple[float, dict]:
        local = dataclasses.replace(LOCAL, prox_mu=mu, epochs=2)
        r = local_update(state, users, m.train, features, MODEL, local, seed=5)
        return float(sum(d.pow(2).sum() for d in r.delta.values()) ** 0.5), r.delta

    plain = local_update(state, users, m.train, features, MODEL, LOCAL, seed=5)
    zero, _ = delta_norm(0.0)
    one_epoch = local_update(state, users, m.train, features, MODEL, dataclasses.replace(LOCAL, prox_mu=0.0), seed=5)
    for k in plain.delta:
        assert torch.equal(plain.delta[k], one_epoch.delta[k])
    strong, _ = delta_norm(50.0)
    weak, _ = delta_norm(1.0)
    assert strong < weak < zero


def test_proximal_term_is_half_mu_squared_distance_with_gradient_mu_times_drift():
    from fedrec.federated.local import proximal_term
    from fedrec.model import ItemTower

    tower = ItemTower(5, ModelConfig(dim=3, feature_dim=2, hidden=4, hash_buckets=8))
    received = {k: v.detach().clone() for k, v in tower.state_dict().items()}
    with torch.no_grad():
        tower.item_emb.weight.add_(1.0)  # drift of 1 in each of 15 entries
    value = proximal_term(tower, received, mu=0.4)
    assert value.item() == pytest.approx(0.5 * 0.4 * 15)
    value.backward()
    assert torch.allclose(tower.item_emb.weight.grad, torch.full((5, 3), 0.4))
    assert tower.mlp[0].weight.grad.abs().max() == 0


def test_val_scope_round_scores_only_the_merchants_that_trained(tiny_dataset, features, monkeypatch):
    """val_scope = round: a round's validation sums come from its sampled merchants alone (as in the
    networked runtime); the default scores every merchant."""
    import fedrec.federated.simulation as simulation

    scored: list[str] = []
    real = simulation.evaluate_val

    def recording(merchant, *args, **kwargs):
        scored.append(merchant.name)
        return real(merchant, *args, **kwargs)

    monkeypatch.setattr(simulation, "evaluate_val", recording)
    n = len(tiny_dataset.merchants)
    for scope in ("round", "all"):
        scored.clear()
        cfg = FederationConfig(rounds=4, fraction=0.3, patience=0, refit=False, val_scope=scope)
        res = run_federated(tiny_dataset, features, MODEL, LOCAL, cfg)
        expected = (
            [m for h in res.history for m in h.merchants]
            if scope == "round"
            else 4 * [m.name for m in tiny_dataset.merchants]
        )
        assert scored == expected and len(scored) == (4 if scope == "round" else 4 * n)


def test_refit_retrains_on_train_and_validation_for_the_chosen_rounds(tiny_dataset, features, monkeypatch):
    """The released model is a second run, from the same start, on train + validation for the best
    round's number of rounds; the first run alone saw only train."""
    import fedrec.federated.simulation as simulation

    seen: list[int] = []
    real = simulation.local_update

    def recording(item_state, users, train, *args, **kwargs):
        seen.append(int(train.nnz))
        return real(item_state, users, train, *args, **kwargs)

    monkeypatch.setattr(simulation, "local_update", recording)
    cfg = FederationConfig(rounds=4, patience=0, refit=True)
    res = run_federated(tiny_dataset, features, MODEL, LOCAL, cfg)
    n = len(tiny_dataset.merchants)
    assert len(res.history) == 4 and 1 <= res.best_round <= 4
    assert res.refit_rounds == res.best_round
    assert len(seen) == (4 + res.best_round) * n
    train_nnz = sorted(m.train.nnz for m in tiny_dataset.merchants)
    full_nnz = sorted(m.full_train.nnz for m in tiny_dataset.merchants)
    assert train_nnz != full_nnz  # the validation slice is not empty
    assert sorted(seen[: 4 * n]) == sorted(train_nnz * 4)
    assert sorted(seen[4 * n :]) == sorted(full_nnz * res.best_round)

    # Without the refit the released model is the best round's, trained on train alone.
    seen.clear()
    plain = run_federated(tiny_dataset, features, MODEL, LOCAL, dataclasses.replace(cfg, refit=False))
    assert plain.refit_rounds == 0 and len(seen) == 4 * n
    assert plain.best_round == res.best_round  # the first phase is the same run
    assert any(not torch.equal(plain.item_state[k], res.item_state[k]) for k in res.item_state)


def test_with_validation_in_train_moves_the_slice(tiny_dataset):
    from fedrec.federated.simulation import with_validation_in_train

    whole = with_validation_in_train(tiny_dataset)
    for before, after in zip(tiny_dataset.merchants, whole.merchants, strict=True):
        assert (after.train != before.full_train).nnz == 0
        assert after.val.nnz == 0 and after.val.shape == before.val.shape
        assert (after.test != before.test).nnz == 0
