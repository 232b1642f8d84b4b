"""Distributed DP (`privacy.noise_split`): one DP-SGD step a round, its noise split across merchants."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant

from fedrec.config import check_networked, load_config
from fedrec.errors import ConfigError
from fedrec.features import build_item_features
from fedrec.federated.local import LocalConfig, clipped_customer_sums, local_update
from fedrec.federated.server_opt import ServerOptConfig
from fedrec.federated.simulation import FederationConfig, run_federated
from fedrec.model import ModelConfig, init_user_embeddings, new_item_tower
from fedrec.privacy.accountant import DPMechanism, colluded, epsilon_spent, plan_mechanism
from fedrec.privacy.config import PrivacyConfig
from fedrec.privacy.dp_sgd import add_noise, padded_baskets

MODEL = ModelConfig(dim=8, feature_dim=8, hidden=16, hash_buckets=256)
# No user solve here, so that the customers' vectors going into the step are the ones given.
LOCAL = LocalConfig(batch_size=128, temperature=0.5, weight_decay=0.1, lr=0.01, user_lr=0.05, user_solve_reg=0.0)
SERVER = ServerOptConfig(name="fedadam", lr=0.01)


@pytest.fixture(scope="module")
def features(tiny_dataset):
    return build_item_features(tiny_dataset.items, MODEL.hash_buckets)


def test_a_split_round_is_one_step_and_opacus_agrees_on_its_epsilon():
    cfg = PrivacyConfig(epsilon=8.0, sample_rate=0.1, noise_split=6)
    mech = plan_mechanism(cfg, rounds=200, epochs=3)  # local epochs do not count: one step a round
    assert mech.steps_per_round == 1 and mech.noise_split == 6
    acc = PRVAccountant()  # the default accountant
    for _ in range(200):
        acc.step(noise_multiplier=mech.noise_multiplier, sample_rate=0.1)
    assert acc.get_epsilon(delta=1e-5) == pytest.approx(epsilon_spent(mech, 200), rel=1e-9)
    assert 8.0 * 0.99 <= epsilon_spent(mech, 200) <= 8.0
    # The same budget without the split takes 10 steps a round: it needs more noise per step.
    local = plan_mechanism(dataclasses.replace(cfg, noise_split=0), rounds=200, epochs=1)
    assert local.steps_per_round == 10 and local.noise_multiplier > mech.noise_multiplier


def test_a_coalition_of_the_coordinator_and_the_other_merchants_faces_one_share():
    mech = plan_mechanism(PrivacyConfig(epsilon=8.0, sample_rate=0.1, noise_split=4), rounds=100, epochs=1)
    worst = colluded(mech)
    assert worst.noise_multiplier == pytest.approx(mech.noise_multiplier / 2)  # sqrt(4) shares removed but one
    acc = PRVAccountant()
    acc.history = [(mech.noise_multiplier / 2, 0.1, 100)]
    assert epsilon_spent(worst, 100) == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert epsilon_spent(worst, 100) > 8.0  # what the trust assumption buys, stated beside it
    assert mech.share_std == pytest.approx(mech.noise_multiplier * mech.clip / 2)


def test_the_shares_of_k_merchants_add_up_to_the_whole_noise():
    mech = DPMechanism(clip=0.5, noise_multiplier=1.2, sample_rate=0.1, steps_per_round=1, delta=1e-5,
                       target_epsilon=8, noise_split=5)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    shares = [add_noise({"w": torch.zeros(200_000)}, mech, gen, std=mech.share_std)["w"] for _ in range(5)]
    assert shares[0].std().item() == pytest.approx(0.5 * 1.2 / math.sqrt(5), rel=0.01)
    assert sum(shares).std().item() == pytest.approx(0.5 * 1.2, rel=0.01)


def test_a_merchant_sends_minus_its_clipped_sum_plus_its_noise_share(tiny_dataset, features):
    m = tiny_dataset.merchants[0]
    state = {k: v.detach().clone() for k, v in new_item_tower(tiny_dataset.n_items, MODEL, 0).state_dict().items()}
    users = init_user_embeddings(m.n_users, MODEL, torch.Generator().manual_seed(0)) * 10
    quiet = DPMechanism(clip=0.05, noise_multiplier=0.0, sample_rate=1.0, steps_per_round=1, delta=1e-5,
                        target_epsilon=math.inf, noise_split=3)  # fmt: skip
    res = local_update(state, users, m.train, features, MODEL, LOCAL, seed=1, dp=quiet)
    # Every customer sampled (rate 1), no noise: exactly minus the clipped sum at the received tower.
    rows = torch.arange(m.n_users)
    pos, mask = padded_baskets(
        torch.from_numpy(m.train.indptr.astype(np.int64)), torch.from_numpy(m.train.indices.astype(np.int64)), rows
    )
    expected, _, norms = clipped_customer_sums(state, features, MODEL, 0.5, 0.1, users, pos, mask, 0.05)
    assert (norms > 0.05).any()  # clipping is in play
    for k in state:
        torch.testing.assert_close(res.delta[k], -expected[k], rtol=1e-5, atol=1e-7)
    total = math.sqrt(sum(float(v.pow(2).sum()) for v in res.delta.values()))
    assert total <= m.n_users * 0.05 * (1 + 1e-6)
    assert (res.num_examples, res.num_steps, res.mean_loss) == (1, 1, 0.0) and not res.touched_rows.any()
    # With noise, the difference from the quiet delta is this merchant's share: std sigma * clip / sqrt(3).
    noisy = dataclasses.replace(quiet, noise_multiplier=2.0)
    diff = torch.cat([(a - b).ravel() for a, b in zip(
        local_update(state, users, m.train, features, MODEL, LOCAL, seed=1, dp=noisy).delta.values(),
        res.delta.values(), strict=True,
    )])  # fmt: skip
    assert diff.std().item() == pytest.approx(2.0 * 0.05 / math.sqrt(3), rel=0.05)


def test_an_in_process_run_with_split_noise_certifies_the_sum_and_refuses_too_few_merchants(tiny_dataset, features):
    mech = plan_mechanism(PrivacyConfig(epsilon=8.0, sample_rate=0.5, noise_split=3), rounds=4, epochs=1)
    cfg = FederationConfig(rounds=4, patience=0, server=SERVER)
    res = run_federated(tiny_dataset, features, MODEL, LOCAL, cfg, dp=mech)
    assert len(res.history) == 4 and res.best_round == 4  # the last round is released
    card = res.privacy
    assert card["noise_split"] == 3 and card["steps_per_round"] == 1
    assert card["epsilon"] <= 8.0 < card["epsilon_if_other_merchants_collude"]
    assert "sum" in card["trust"]
    with pytest.raises(ConfigError, match="noise_split = 3 needs at least"):
        run_federated(tiny_dataset, features, MODEL, LOCAL, dataclasses.replace(cfg, fraction=0.5), dp=mech)


def test_split_noise_settings_are_checked_before_training():
    base = {"privacy.epsilon": 8.0, "privacy.noise_split": 3}
    with pytest.raises(ConfigError, match="adaptive optimiser"):
        load_config(None, base)  # the default server optimiser (fedavg) is refused by name
    with pytest.raises(ConfigError, match="privacy.noise_split must be >= 0"):
        load_config(None, {"privacy.noise_split": -1})
    ok = {**base, "federation.server.name": "fedadam", "federation.server.lr": 0.01}
    with pytest.raises(ConfigError, match="only a share of the noise"):
        load_config(None, {**ok, "federation.robust": "median"})
    check_networked(load_config(None, {**ok, "network.secagg": True, "network.min_merchants": 3}))
    with pytest.raises(ConfigError, match="network.secagg"):
        check_networked(load_config(None, {**ok, "network.secagg": False}))
    with pytest.raises(ConfigError, match="min_merchants >= 4"):  # a sum of 3 would carry 3 of 4 shares
        check_networked(load_config(None, {**ok, "privacy.noise_split": 4, "network.secagg": True,
                                           "network.min_merchants": 3}))  # fmt: skip


def test_a_split_delta_fits_the_secure_aggregation_range_at_a_fine_scale(tiny_dataset, features):
    from fedrec.federated.aggregation import merchant_sums
    from fedrec.federated.protocol import stage_format
    from fedrec.federated.wire import from_wire, to_wire

    sets = {"privacy.epsilon": 8.0, "privacy.noise_split": 3, "federation.server.name": "fedadam",
            "model.dim": 8, "model.hash_buckets": 256, "model.use_content": False}  # fmt: skip
    cfg = load_config(None, sets)
    fmt = stage_format("train", tiny_dataset.n_items, cfg)
    m = tiny_dataset.merchants[0]
    state = {k: v.detach().clone() for k, v in new_item_tower(tiny_dataset.n_items, cfg.model, 0).state_dict().items()}
    users = init_user_embeddings(m.n_users, cfg.model, torch.Generator().manual_seed(0))
    mech = plan_mechanism(cfg.privacy, rounds=10, epochs=1)
    res = local_update(state, users, m.train, features, cfg.model, LOCAL, seed=0, dp=mech)
    sums = merchant_sums(res.delta, res.num_examples, res.num_steps, res.touched_rows, res.mean_loss, "fedavg", True)
    sums.update({k: torch.zeros(s) for k, s in fmt.expected.items() if k not in sums})  # the validation sums
    back = from_wire(to_wire(sums, fmt, cfg.network.clipping_range), fmt)
    for k, v in sums.items():
        torch.testing.assert_close(back[k], v.float().reshape(back[k].shape), rtol=1e-5, atol=1e-6)
    # One quantisation step of SecAgg+ in the delta's own units: far below the noise share.
    step = 2 * cfg.network.clipping_range / cfg.network.quantization_range
    scale = fmt.scales[fmt.names.index(next(n for n in fmt.names if n.endswith("item_emb.weight")))]
    assert step * scale < mech.share_std / 100
