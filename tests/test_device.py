"""`local.device`: the local steps on a GPU where one is asked for, the CPU everywhere else."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedrec.config import load_config
from fedrec.errors import ConfigError
from fedrec.federated.local import LocalConfig, local_update
from fedrec.model import ModelConfig, init_user_embeddings, item_embeddings, new_item_tower
from tests.toy_merchant import toy_merchant

MODEL = ModelConfig(dim=8, feature_dim=8, hidden=16, hash_buckets=512)


def _merchant(n_users: int = 30, n_items: int = 200, seed: int = 0):  # noqa: ANN202
    train, features = toy_merchant(
        n_users, n_items, per_user=5, tokens=100, width=4, buckets=MODEL.hash_buckets, seed=seed
    )
    state = new_item_tower(n_items, MODEL, 0).state_dict()
    users = init_user_embeddings(n_users, MODEL, torch.Generator().manual_seed(1))
    return train, features, state, users


def test_a_device_setting_is_checked_before_training():
    with pytest.raises(ConfigError, match="local.device must be cpu, cuda or cuda:N, got 'gpu'"):
        load_config(None, {"local.device": "gpu"})
    with pytest.raises(ConfigError, match="customer-level DP runs on local.device = 'cpu' only"):
        load_config(None, {"local.device": "cuda", "privacy.epsilon": 8})
    assert load_config(None, {"local.device": "cuda:1"}).local.device == "cuda:1"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_asking_for_cuda_without_one_is_a_clear_error():
    train, features, state, users = _merchant()
    with pytest.raises(ConfigError, match="local.device = 'cuda': torch sees no CUDA device"):
        local_update(state, users, train, features, MODEL, LocalConfig(device="cuda"), seed=3)


def _centred_scores(state, res, features):  # noqa: ANN001, ANN202
    new = {k: state[k] + res.delta[k] for k in state}
    scores = res.user_embeddings @ item_embeddings(new, features, MODEL).T + res.item_bias
    return scores - scores.mean(1, keepdim=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("loss", ["softmax", "sampled_softmax", "bpr"])
def test_the_local_update_on_cuda_matches_the_cpu_and_returns_cpu_tensors(loss):
    """The same random draws (the generator stays on the CPU) and the same math, so the same
    model up to float rounding, and nothing left on the GPU in what the runtime keeps or sends.

    Compared on what the model ranks by: each customer's scores, centred. Not tensor by tensor: a
    shift of every item vector leaves the softmax unchanged, so the output layer's bias has a
    gradient of zero up to rounding, and Adam's normalised step turns that rounding into a delta
    (a relative change of 1e-7 in the starting tower moves it by 10 to 40% on the CPU alone,
    while the centred scores move by 1e-7)."""
    train, features, state, users = _merchant()
    cfg = LocalConfig(loss=loss, user_solve_reg=3.0 if loss == "softmax" else 0.0, uniform_negatives=32, epochs=2)
    bias = torch.zeros(train.shape[1])  # a merchant item bias, trained and kept at home
    cpu = local_update(state, users, train, features, MODEL, cfg, seed=3, item_bias=bias)
    gpu = local_update(
        state, users, train, features, MODEL, dataclasses.replace(cfg, device="cuda"), seed=3, item_bias=bias
    )
    kept = [*gpu.delta.values(), gpu.user_embeddings, gpu.item_bias]
    assert all(t.device.type == "cpu" for t in kept) and gpu.num_steps == cpu.num_steps
    on_cpu, on_gpu = _centred_scores(state, cpu, features), _centred_scores(state, gpu, features)
    gap = float((on_gpu - on_cpu).norm() / on_cpu.norm())
    print(f"{loss}: relative gap of the centred scores {gap:.2e}")
    assert gap < 1e-3
    assert abs(gpu.mean_loss - cpu.mean_loss) < 1e-3 * abs(cpu.mean_loss)
