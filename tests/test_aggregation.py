"""Aggregation from sums: exact results on toy tensors, and equality with the per-merchant rules
the project used before the sum form (kept here as the reference)."""

import pytest
import torch

from fedrec.federated.aggregation import aggregate_sums, merchant_sums, resolve_rule, sum_all, sum_names
from fedrec.federated.messages import MerchantSums
from fedrec.federated.server_opt import ServerOptConfig, fedopt_step


def merchant(emb, dense, n, touched, steps=1, loss=0.5):
    return {
        "delta": {"item_emb.weight": torch.tensor(emb), "mlp.0.bias": torch.tensor(dense)},
        "n": n,
        "touched": torch.tensor(touched),
        "steps": steps,
        "loss": loss,
    }


A = merchant([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]], [3.0], 1, [True, True, False])
B = merchant([[4.0, 4.0], [-1.0, -1.0], [6.0, 6.0]], [0.0], 3, [True, False, False])
SHAPES = {"item_emb.weight": (3, 2), "mlp.0.bias": (1,)}


def sums(m, rule, normalize):
    return merchant_sums(m["delta"], m["n"], m["steps"], m["touched"], m["loss"], rule, normalize)


def aggregate(ms, rule="fedavg", normalize=False):
    return aggregate_sums(sum_all(sums(m, rule, normalize) for m in ms), rule, normalize)


def with_steps(m, steps):
    return {**m, "steps": steps}


# ---- the per-merchant rules of the previous release, as the reference ---------------------------


def reference(ms, rule, normalize):
    n = torch.tensor([float(m["n"]) for m in ms])
    tau = torch.tensor([float(m["steps"]) for m in ms])
    dense = n / n.sum()
    out = {}
    for name in ms[0]["delta"]:
        stacked = torch.stack([m["delta"][name] for m in ms])
        w = dense
        if rule == "rowwise" and name == "item_emb.weight":
            raw = torch.stack([m["touched"] for m in ms]).float() * n[:, None]
            denom = raw.sum(0)
            w = raw / denom.clamp_min(1e-12)
            w[:, denom == 0] = dense[:, None]
        extra = (1,) * (stacked.dim() - w.dim())
        if normalize:
            tau_eff = (w * tau.reshape(-1, *(1,) * (w.dim() - 1))).sum(0)
            per_step = stacked / tau.reshape(-1, *(1,) * (stacked.dim() - 1))
            out[name] = (w.reshape(*w.shape, *extra) * per_step).sum(0) * tau_eff.reshape(*tau_eff.shape, *extra)
        else:
            out[name] = (w.reshape(*w.shape, *extra) * stacked).sum(0)
    return out


@pytest.mark.parametrize("rule", ["fedavg", "rowwise"])
@pytest.mark.parametrize("normalize", [False, True])
def test_the_sum_form_equals_the_per_merchant_rules(rule, normalize):
    gen = torch.Generator().manual_seed(0)
    ms = [
        merchant(
            torch.randn(6, 3, generator=gen).tolist(),
            torch.randn(2, generator=gen).tolist(),
            int(n),
            (torch.rand(6, generator=gen) > 0.5).tolist(),
            steps=int(s),
        )
        for n, s in ((5, 2), (40, 9), (1, 1), (12, 4))
    ]
    for m in ms:
        m["touched"][-1] = False  # a row nobody touched: rowwise falls back to fedavg there
    got = aggregate(ms, rule, normalize)
    want = reference(ms, rule, normalize)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_fedavg_weights_by_examples():
    out = aggregate([A, B])
    # weights 1/4 and 3/4
    assert torch.allclose(out["mlp.0.bias"], torch.tensor([0.75]))
    assert torch.allclose(out["item_emb.weight"][0], torch.tensor([3.25, 3.25]))
    assert torch.allclose(out["item_emb.weight"][1], torch.tensor([-0.25, -0.25]))


def test_rowwise_averages_each_row_over_merchants_that_touched_it():
    out = aggregate([A, B], "rowwise")
    # row 0: both touched -> (1*1 + 3*4)/4 ; row 1: only A touched -> A's value
    assert torch.allclose(out["item_emb.weight"][0], torch.tensor([3.25, 3.25]))
    assert torch.allclose(out["item_emb.weight"][1], torch.tensor([2.0, 2.0]))
    # row 2: nobody touched -> falls back to plain fedavg (0*1 + 6*3)/4
    assert torch.allclose(out["item_emb.weight"][2], torch.tensor([4.5, 4.5]))
    # dense tensors are plain fedavg
    assert torch.allclose(out["mlp.0.bias"], torch.tensor([0.75]))


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate([A], "median")
    with pytest.raises(ValueError, match="unknown aggregation"):
        sum_names(SHAPES, "median")


def test_fedavg_messages_carry_no_per_row_weights():
    """Under fedavg nothing in a message says which items the merchant sold."""
    names = set(sums(A, "fedavg", True))
    assert names == set(sum_names(SHAPES, "fedavg")) == {"n", "n_tau", "n_loss", "delta/item_emb.weight",
                                                          "delta/mlp.0.bias"}  # fmt: skip
    assert "rows/n" in sums(A, "rowwise", True)


def test_the_round_loss_is_weighted_by_examples():
    from fedrec.federated.aggregation import mean_loss

    total = sum_all([sums({**A, "loss": 2.0}, "fedavg", False), sums({**B, "loss": 1.0}, "fedavg", False)])
    assert mean_loss(total) == pytest.approx((1 * 2.0 + 3 * 1.0) / 4)


def test_fedavg_server_step_is_plain_addition():
    p, _, _ = fedopt_step({"w": torch.tensor([1.0])}, {"w": torch.tensor([0.5])}, {}, {}, ServerOptConfig(lr=2.0))
    assert torch.allclose(p["w"], torch.tensor([2.0]))


@pytest.mark.parametrize(
    "name, v_expected",
    [
        # v0 = tau^2 = 0.01; d = 2 -> d^2 = 4
        ("fedadagrad", 0.01 + 4.0),
        ("fedadam", 0.99 * 0.01 + 0.01 * 4.0),
        ("fedyogi", 0.01 - 0.01 * 4.0 * -1.0),
    ],
)
def test_adaptive_server_steps_match_reddi_et_al(name, v_expected):
    cfg = ServerOptConfig(name=name, lr=0.5, beta1=0.9, beta2=0.99, tau=0.1)
    p, m, v = fedopt_step({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}, {}, {}, cfg)
    m_expected = 0.1 * 2.0
    assert m["w"].item() == pytest.approx(m_expected)
    assert v["w"].item() == pytest.approx(v_expected)
    assert p["w"].item() == pytest.approx(1.0 + 0.5 * m_expected / (v_expected**0.5 + 0.1))


def test_message_type_rejects_anything_but_the_round_sums():
    expected = sum_names(SHAPES, "fedavg")
    MerchantSums(sums(A, "fedavg", False)).validate(expected)
    leaky = MerchantSums({**sums(A, "fedavg", False), "user_emb.weight": torch.zeros(5, 2)})
    with pytest.raises(ValueError, match="user_emb.weight"):
        leaky.validate(expected)
    wrong_shape = MerchantSums({**sums(A, "fedavg", False), "delta/item_emb.weight": torch.zeros(5, 2)})
    with pytest.raises(ValueError, match="shape"):
        wrong_shape.validate(expected)
    bad = sums(A, "fedavg", False)
    bad["delta/mlp.0.bias"] = torch.tensor([float("nan")])
    with pytest.raises(ValueError, match="NaN"):
        MerchantSums(bad).validate(expected)
    inf = float("inf")
    for poison in ([[inf, 0.0]], [[-inf, 1.0]], [[inf, -inf]]):  # the row sums to inf, -inf and NaN
        rows = sums(A, "fedavg", False)
        rows["delta/item_emb.weight"] = torch.tensor(poison + [[0.0, 0.0]] * 2)
        with pytest.raises(ValueError, match="infinite"):
            MerchantSums(rows).validate(expected)
    # Finite values whose float32 sum overflows are still finite: the sum is only a fast path.
    huge = sums(A, "fedavg", False)
    huge["delta/item_emb.weight"] = torch.full_like(huge["delta/item_emb.weight"], 3e38)
    assert not torch.isfinite(huge["delta/item_emb.weight"].sum())
    MerchantSums(huge).validate(expected)
    wrong_dtype = {**sums(A, "fedavg", False), "n": torch.tensor(1.0, dtype=torch.float64)}
    with pytest.raises(ValueError, match="float32"):
        MerchantSums(wrong_dtype).validate(expected)


def test_fednova_averages_per_step_deltas_and_rescales_by_mean_steps():
    # A: n=1, tau=1; B: n=3, tau=6. Weights 1/4, 3/4; tau_eff = 1/4 * 1 + 3/4 * 6 = 4.75
    out = aggregate([with_steps(A, 1), with_steps(B, 6)], normalize=True)
    # dense: (1/4 * 3/1 + 3/4 * 0/6) * 4.75
    assert torch.allclose(out["mlp.0.bias"], torch.tensor([0.75 * 4.75]))
    # row 0: (1/4 * 1/1 + 3/4 * 4/6) * 4.75
    assert torch.allclose(out["item_emb.weight"][0], torch.full((2,), (0.25 + 0.5) * 4.75))
    # equal step counts: identical to plain fedavg
    same = [with_steps(m, 5) for m in (A, B)]
    for name, t in aggregate(same, normalize=True).items():
        assert torch.allclose(t, aggregate([A, B])[name])


def test_fednova_rowwise_uses_the_step_count_of_the_merchants_that_touched_each_row():
    out = aggregate([with_steps(A, 2), with_steps(B, 4)], "rowwise", normalize=True)
    # row 1: only A touched it -> A's per-step delta times A's steps = A's delta
    assert torch.allclose(out["item_emb.weight"][1], torch.tensor([2.0, 2.0]))
    # row 0: both; tau_eff = 1/4*2 + 3/4*4 = 3.5; (1/4 * 1/2 + 3/4 * 4/4) * 3.5
    assert torch.allclose(out["item_emb.weight"][0], torch.full((2,), (0.125 + 0.75) * 3.5))
    # row 2: nobody touched it -> fedavg weights; (1/4 * 0/2 + 3/4 * 6/4) * 3.5
    assert torch.allclose(out["item_emb.weight"][2], torch.full((2,), 0.75 * 1.5 * 3.5))


@pytest.mark.parametrize(
    ("name", "v1", "v2"),
    [
        # v0 = tau^2 = 0.01; d1 = 2 (d1^2 = 4), d2 = -1 (d2^2 = 1); beta2 = 0.99
        ("fedadagrad", 0.01 + 4.0, 0.01 + 4.0 + 1.0),
        ("fedadam", 0.99 * 0.01 + 0.01 * 4.0, 0.99 * (0.99 * 0.01 + 0.01 * 4.0) + 0.01 * 1.0),
        ("fedyogi", 0.01 + 0.01 * 4.0, 0.01 + 0.01 * 4.0 + 0.01 * 1.0),  # sign(v - d^2) = -1 both times
    ],
)
def test_adaptive_server_optimisers_over_two_rounds_by_hand(name, v1, v2):
    from fedrec.federated.server_opt import ServerOptimizer

    cfg = ServerOptConfig(name=name, lr=0.5, beta1=0.9, beta2=0.99, tau=0.1)
    opt = ServerOptimizer(cfg)
    x = opt.step({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])})
    m1 = 0.1 * 2.0
    x1 = 1.0 + 0.5 * m1 / (v1**0.5 + 0.1)
    assert x["w"].item() == pytest.approx(x1, rel=1e-6)
    x = opt.step(x, {"w": torch.tensor([-1.0])})
    m2 = 0.9 * m1 + 0.1 * -1.0
    assert opt.m["w"].item() == pytest.approx(m2, rel=1e-6)
    assert opt.v["w"].item() == pytest.approx(v2, rel=1e-6)
    assert x["w"].item() == pytest.approx(x1 + 0.5 * m2 / (v2**0.5 + 0.1), rel=1e-6)


def test_plain_server_step_over_two_rounds_is_the_sum_of_scaled_deltas():
    from fedrec.federated.server_opt import ServerOptimizer

    opt = ServerOptimizer(ServerOptConfig(name="fedavg", lr=0.5))
    x = opt.step(opt.step({"w": torch.tensor([1.0])}, {"w": torch.tensor([2.0])}), {"w": torch.tensor([-1.0])})
    assert x["w"].item() == pytest.approx(1.0 + 0.5 * 2.0 - 0.5 * 1.0)


def test_the_running_sum_equals_the_stacked_sum():
    gen = torch.Generator().manual_seed(1)
    messages = [
        sums(merchant(torch.randn(3, 2, generator=gen).tolist(), [float(i)], i + 1, [True, i % 2 == 0, False]),
             "rowwise", True)
        for i in range(7)
    ]  # fmt: skip
    running = sum_all(messages)
    for name in running:
        torch.testing.assert_close(running[name], torch.stack([m[name] for m in messages]).sum(0))
    assert messages[0]["n"].item() == 1.0  # the first term was copied, not added into


def test_auto_is_rowwise_only_where_rowwise_applies():
    per_product = {"item_emb.weight": (3, 2), "mlp.0.bias": (1,)}
    hashed = {**per_product, "item_emb_q.weight": (2, 2)}  # compositional ids share rows between products
    content_only = {"mlp.0.bias": (1,)}
    assert resolve_rule("auto", per_product, private=False, robust="none") == "rowwise"
    assert resolve_rule("auto", per_product, private=True, robust="none") == "fedavg"  # DP does not noise row weights
    assert resolve_rule("auto", per_product, private=False, robust="median") == "fedavg"  # reads whole deltas
    assert resolve_rule("auto", hashed, private=False, robust="none") == "fedavg"
    assert resolve_rule("auto", content_only, private=False, robust="none") == "fedavg"
    # an explicit rule is kept as given (the config check refuses the incompatible ones)
    assert resolve_rule("fedavg", per_product, private=False, robust="none") == "fedavg"
    assert resolve_rule("rowwise", hashed, private=False, robust="none") == "rowwise"
