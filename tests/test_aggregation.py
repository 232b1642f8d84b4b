import pytest
import torch

from fedrec.federated.aggregation import aggregate, fedavg, rowwise_fedavg
from fedrec.federated.messages import ItemTowerUpdate
from fedrec.federated.server_opt import ServerOptConfig, fedopt_step


def upd(emb, dense, n, touched):
    return ItemTowerUpdate(
        delta={"item_emb.weight": torch.tensor(emb), "mlp.0.bias": torch.tensor(dense)},
        num_examples=n,
        touched_rows=torch.tensor(touched),
    )


A = upd([[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]], [3.0], 1, [True, True, False])
B = upd([[4.0, 4.0], [-1.0, -1.0], [6.0, 6.0]], [0.0], 3, [True, False, False])


def test_fedavg_weights_by_examples():
    out = fedavg([A, B])
    # weights 1/4 and 3/4
    assert torch.allclose(out["mlp.0.bias"], torch.tensor([0.75]))
    assert torch.allclose(out["item_emb.weight"][0], torch.tensor([3.25, 3.25]))
    assert torch.allclose(out["item_emb.weight"][1], torch.tensor([-0.25, -0.25]))


def test_rowwise_averages_each_row_over_merchants_that_touched_it():
    out = rowwise_fedavg([A, B])
    # row 0: both touched -> (1*1 + 3*4)/4 ; row 1: only A touched -> A's value
    assert torch.allclose(out["item_emb.weight"][0], torch.tensor([3.25, 3.25]))
    assert torch.allclose(out["item_emb.weight"][1], torch.tensor([2.0, 2.0]))
    # row 2: nobody touched -> falls back to plain fedavg (0*1 + 6*3)/4
    assert torch.allclose(out["item_emb.weight"][2], torch.tensor([4.5, 4.5]))
    # dense tensors are plain fedavg
    assert torch.allclose(out["mlp.0.bias"], torch.tensor([0.75]))


def test_aggregate_rejects_unknown_rule():
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate([A], "median")


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


def test_update_type_rejects_anything_but_the_item_tower():
    shapes = {"item_emb.weight": (3, 2), "mlp.0.bias": (1,)}
    A.validate(shapes)
    leaky = ItemTowerUpdate(
        delta={**A.delta, "user_emb.weight": torch.zeros(5, 2)}, num_examples=1, touched_rows=A.touched_rows
    )
    with pytest.raises(ValueError, match="user_emb.weight"):
        leaky.validate(shapes)
    wrong_shape = ItemTowerUpdate(
        delta={"item_emb.weight": torch.zeros(5, 2), "mlp.0.bias": torch.zeros(1)},
        num_examples=1,
        touched_rows=A.touched_rows,
    )
    with pytest.raises(ValueError, match="shape"):
        wrong_shape.validate(shapes)


def test_fednova_averages_per_step_deltas_and_rescales_by_mean_steps():
    # A: n=1, tau=1; B: n=3, tau=6. Weights 1/4, 3/4; tau_eff = 1/4 * 1 + 3/4 * 6 = 4.75
    a = ItemTowerUpdate(A.delta, 1, A.touched_rows, num_steps=1)
    b = ItemTowerUpdate(B.delta, 3, B.touched_rows, num_steps=6)
    out = fedavg([a, b], normalize_steps=True)
    # dense: (1/4 * 3/1 + 3/4 * 0/6) * 4.75
    assert torch.allclose(out["mlp.0.bias"], torch.tensor([0.75 * 4.75]))
    # row 0: (1/4 * 1/1 + 3/4 * 4/6) * 4.75
    assert torch.allclose(out["item_emb.weight"][0], torch.full((2,), (0.25 + 0.5) * 4.75))
    # equal step counts: identical to plain fedavg
    same = [ItemTowerUpdate(u.delta, u.num_examples, u.touched_rows, num_steps=5) for u in (A, B)]
    for name, t in fedavg(same, normalize_steps=True).items():
        assert torch.allclose(t, fedavg([A, B])[name])


def test_fednova_rowwise_uses_the_step_count_of_the_merchants_that_touched_each_row():
    a = ItemTowerUpdate(A.delta, 1, A.touched_rows, num_steps=2)
    b = ItemTowerUpdate(B.delta, 3, B.touched_rows, num_steps=4)
    out = rowwise_fedavg([a, b], normalize_steps=True)
    # row 1: only A touched it -> A's per-step delta times A's steps = A's delta
    assert torch.allclose(out["item_emb.weight"][1], torch.tensor([2.0, 2.0]))
    # row 0: both; tau_eff = 1/4*2 + 3/4*4 = 3.5; (1/4 * 1/2 + 3/4 * 4/4) * 3.5
    assert torch.allclose(out["item_emb.weight"][0], torch.full((2,), (0.125 + 0.75) * 3.5))
    # row 2: nobody touched it -> fedavg weights; (1/4 * 0/2 + 3/4 * 6/4) * 3.5
    assert torch.allclose(out["item_emb.weight"][2], torch.full((2,), 0.75 * 1.5 * 3.5))
