"""Server optimisers of the FedOpt family (Reddi et al., 2021, "Adaptive Federated Optimization").

The aggregated delta is a pseudo-gradient (pointing downhill). `fedopt_step` does the math
as a pure function in the style of torch.optim's functional `adam()`; `ServerOptimizer` only
holds the state between rounds.
  fedavg:     x += lr * d
  fedadagrad: v += d^2
  fedadam:    v = b2 v + (1 - b2) d^2
  fedyogi:    v = v - (1 - b2) d^2 sign(v - d^2)
  (adaptive): m = b1 m + (1 - b1) d;  x += lr * m / (sqrt(v) + tau)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SERVER_OPTIMIZERS = ("fedavg", "fedadagrad", "fedadam", "fedyogi")


@dataclass(frozen=True)
class ServerOptConfig:
    name: str = "fedavg"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3


def fedopt_step(
    params: dict[str, torch.Tensor],
    delta: dict[str, torch.Tensor],
    m: dict[str, torch.Tensor],
    v: dict[str, torch.Tensor],
    cfg: ServerOptConfig,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return new (params, m, v); inputs are not modified."""
    if cfg.name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {cfg.name!r}; choose one of {SERVER_OPTIMIZERS}")
    if cfg.name == "fedavg":
        return {k: params[k] + cfg.lr * delta[k] for k in params}, m, v
    new_p, new_m, new_v = {}, {}, {}
    for k in params:
        d = delta[k]
        mk = cfg.beta1 * m.get(k, torch.zeros_like(d)) + (1 - cfg.beta1) * d
        vk = v.get(k, torch.full_like(d, cfg.tau**2))
        d2 = d * d
        if cfg.name == "fedadagrad":
            vk = vk + d2
        elif cfg.name == "fedadam":
            vk = cfg.beta2 * vk + (1 - cfg.beta2) * d2
        else:  # fedyogi
            vk = vk - (1 - cfg.beta2) * d2 * torch.sign(vk - d2)
        new_p[k] = params[k] + cfg.lr * mk / (vk.sqrt() + cfg.tau)
        new_m[k], new_v[k] = mk, vk
    return new_p, new_m, new_v


@dataclass
class ServerOptimizer:
    cfg: ServerOptConfig
    m: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)

    def step(self, params: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        params, self.m, self.v = fedopt_step(params, delta, self.m, self.v, self.cfg)
        return params
