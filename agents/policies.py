"""Policies: modules mapping observations (N, d) to action logits (N, K).

Each is built at an exact initial probability p₀ of a chosen target action (``make_policy``):
the logits at the reference observation are set to z_target = log p₀ and
z_other = log((1 − p₀)/(K − 1)), so that softmax(z)_target = p₀ up to rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}
POLICY_KINDS = ("single_logit", "tabular", "mlp")


class SingleLogitPolicy(nn.Module):
    """Two actions, one parameter: z_target = b, z_other = 0, so p = σ(b)."""

    def __init__(self, target: int = 1, dtype: torch.dtype = torch.float64):
        super().__init__()
        if target not in (0, 1):
            raise ValueError(f"single-logit policy has actions 0 and 1; target {target} is out of range")
        self.target = target
        self.n_actions = 2
        self.bias = nn.Parameter(torch.zeros((), dtype=dtype))

    def forward(self, obs: Tensor) -> Tensor:
        n = obs.shape[0] if obs.ndim > 0 else 1
        zero = torch.zeros((), dtype=self.bias.dtype)
        z = torch.stack([self.bias, zero] if self.target == 0 else [zero, self.bias])
        return z.expand(n, 2)


class TabularSoftmaxPolicy(nn.Module):
    """One logit per (state, action): π(·|s) = softmax(θ_s).

    With ``n_states == 1`` the observation is ignored; otherwise ``obs`` holds integer state
    indices, shape (N,) or (N, 1).
    """

    def __init__(self, n_states: int, n_actions: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        if n_states < 1 or n_actions < 2:
            raise ValueError(f"tabular policy needs n_states >= 1 and n_actions >= 2, got {n_states}, {n_actions}")
        self.n_states, self.n_actions = n_states, n_actions
        self.logits = nn.Parameter(torch.zeros(n_states, n_actions, dtype=dtype))

    def forward(self, obs: Tensor) -> Tensor:
        n = obs.shape[0] if obs.ndim > 0 else 1
        if self.n_states == 1:
            return self.logits.expand(n, self.n_actions)
        idx = obs.reshape(n, -1)[:, 0].long()
        return self.logits[idx]


class MLPPolicy(nn.Module):
    """z = MLP(obs): ``depth`` hidden layers of ``width`` units with the chosen activation."""

    def __init__(
        self,
        obs_dim: int,
        n_actions: int,
        width: int = 64,
        depth: int = 2,
        activation: str = "tanh",
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if width < 1 or depth < 0:
            raise ValueError(f"MLP needs width >= 1 and depth >= 0, got width={width}, depth={depth}")
        layers: list[nn.Module] = []
        d = obs_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width, dtype=dtype), ACTIVATIONS[activation]()]
            d = width
        layers.append(nn.Linear(d, n_actions, dtype=dtype))
        self.net = nn.Sequential(*layers)
        self.n_actions = n_actions

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs.to(self.net[0].weight.dtype))

    @property
    def output_layer(self) -> nn.Linear:
        return self.net[-1]


def initial_logits(p0: float, target: int, n_actions: int) -> Tensor:
    """Logits (float64) whose softmax gives the target p₀ and splits 1 − p₀ evenly over the rest."""
    if not 0.0 < p0 < 1.0:
        raise ValueError(f"p0 must be in (0, 1), got {p0}")
    z = torch.full((n_actions,), math.log((1.0 - p0) / (n_actions - 1)), dtype=torch.float64)
    z[target] = math.log(p0)
    return z


def make_policy(
    kind: str,
    obs_dim: int,
    n_actions: int,
    target: int,
    p0: float,
    reference_obs: Tensor,
    seed: int = 0,
    n_states: int = 1,
    width: int = 64,
    depth: int = 2,
    activation: str = "tanh",
    dtype: torch.dtype = torch.float64,
) -> nn.Module:
    """Build a policy of ``kind`` whose π(target | reference_obs) = p₀.

    For the MLP the output bias is shifted so that the logits at ``reference_obs`` equal
    :func:`initial_logits` (averaged over the rows of ``reference_obs`` when there are several,
    which makes p₀ exact for one state and approximate for many). Initialisation uses its own
    RNG stream seeded by ``seed`` and leaves the global torch RNG untouched.
    """
    if kind not in POLICY_KINDS:
        raise ValueError(f"policy must be one of {', '.join(POLICY_KINDS)}, got {kind!r}")
    if not 0 <= target < n_actions:
        raise ValueError(f"target action must be in [0, {n_actions - 1}], got {target}")
    z0 = initial_logits(p0, target, n_actions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "single_logit":
            if n_actions != 2:
                raise ValueError(f"single-logit policy needs 2 actions, the env has {n_actions}")
            policy: nn.Module = SingleLogitPolicy(target=target, dtype=dtype)
            with torch.no_grad():
                policy.bias.fill_(z0[target] - z0[1 - target])
        elif kind == "tabular":
            policy = TabularSoftmaxPolicy(n_states, n_actions, dtype=dtype)
            with torch.no_grad():
                policy.logits.copy_(z0.expand(n_states, n_actions))
        else:
            policy = MLPPolicy(obs_dim, n_actions, width, depth, activation, dtype=dtype)
            with torch.no_grad():
                z = policy(torch.as_tensor(reference_obs)).to(torch.float64).mean(dim=0)
                out = policy.output_layer
                out.bias.copy_((out.bias.to(torch.float64) + z0 - z).to(dtype))
    return policy
