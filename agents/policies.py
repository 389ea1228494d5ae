"""Policies: modules mapping observations (N, d) to action logits (N, K).

Each is built at an exact initial probability p₀ of a chosen target action (``make_policy``):
the logits at the reference observation are set to z_target = log p₀ and
z_other = log((1 − p₀)/(K − 1)), so that softmax(z)_target = p₀ up to rounding; or, given a
start vector π₀, to z = log π₀, so that softmax(z) = π₀.

The escort policy (Mei et al., NeurIPS 2020) is the one parametrisation here that is not a softmax
of free logits: π_a = |θ_a|^q / Σ_b |θ_b|^q. It is written as the softmax of z_a = q·log|θ_a|,
so that every property, the tangent engine and the Fisher see it through its logits like the others.
"""

from __future__ import annotations

import math
from typing import Sequence

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
POLICY_KINDS = ("single_logit", "tabular", "mlp", "escort", "cnn")
ESCORT_Q = 2.0  # the escort exponent q of π_a ∝ |θ_a|^q (Mei et al.'s default)


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


class EscortPolicy(nn.Module):
    """The escort transform: π(a|s) = |θ_{s,a}|^q / Σ_b |θ_{s,b}|^q, q > 0 (Mei et al., NeurIPS 2020).

    Its logits are z_{s,a} = q·log|θ_{s,a}| (softmax(z) = π, in log space). With J_z = ∂z/∂θ =
    diag(q/θ_s) per state, the gradient of π_a is ∇θ π_a = π_a·(q/θ)⊙(e_a − π), so its
    Euclidean NTVar is π_a² (e_a − π)ᵀ Θ (e_a − π) with Θ = diag(q²/θ²); at q = 2, where
    θ_b² = ‖θ‖²·π_b, that is 4 π_a (1 − π_a)/‖θ‖²: linear in π_a for a rare action, as the natural
    gradient's p(1 − p), where softmax logits give p²(1 − p)². Its Fisher (one state) is
    F = J_zᵀ (diag π − ππᵀ) J_z, F_ab = (q²/(θ_a θ_b))(π_a δ_ab − π_a π_b), singular along θ
    (scaling θ leaves π unchanged). Indexing by state is the tabular policy's.
    """

    def __init__(self, n_states: int, n_actions: int, q: float = ESCORT_Q, dtype: torch.dtype = torch.float64):
        super().__init__()
        if n_states < 1 or n_actions < 2:
            raise ValueError(f"escort policy needs n_states >= 1 and n_actions >= 2, got {n_states}, {n_actions}")
        if not (math.isfinite(q) and q > 0):
            raise ValueError(f"escort exponent q must be a finite number > 0, got {q}")
        self.n_states, self.n_actions, self.q = n_states, n_actions, float(q)
        self.theta = nn.Parameter(torch.ones(n_states, n_actions, dtype=dtype))

    def forward(self, obs: Tensor) -> Tensor:
        n = obs.shape[0] if obs.ndim > 0 else 1
        z = self.q * torch.log(torch.abs(self.theta))
        if self.n_states == 1:
            return z.expand(n, self.n_actions)
        return z[obs.reshape(n, -1)[:, 0].long()]


class MLPPolicy(nn.Module):
    """z = MLP(obs): ``depth`` hidden layers of ``width`` units with the chosen activation.

    With ``one_hot_states = n`` the observations are the integer indices of a Discrete(n) space,
    shape (N,) or (N, 1), and the network reads their one-hot encoding (``obs_dim`` must be n): every
    property, event and probe state then sees the env's own observations, as on every other path.
    """

    def __init__(
        self,
        obs_dim: int,
        n_actions: int,
        width: int = 64,
        depth: int = 2,
        activation: str = "tanh",
        dtype: torch.dtype = torch.float64,
        one_hot_states: int | None = None,
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
        self.activation = activation
        if one_hot_states is not None and one_hot_states != obs_dim:
            raise ValueError(f"one_hot_states ({one_hot_states}) must equal obs_dim ({obs_dim})")
        self.one_hot_states = one_hot_states

    def encode(self, obs: Tensor, dtype: torch.dtype) -> Tensor:
        """The network's input: the observations, or the one-hot of Discrete indices."""
        if self.one_hot_states is None:
            return obs.to(dtype)
        n = obs.shape[0] if obs.ndim > 0 else 1
        return torch.nn.functional.one_hot(obs.reshape(n, -1)[:, 0].long(), self.one_hot_states).to(dtype)

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(self.encode(obs, self.net[0].weight.dtype))

    @property
    def output_layer(self) -> nn.Linear:
        return self.net[-1]


class CNNPolicy(nn.Module):
    """z = MLP head(conv stack(obs)) for image observations of shape (N, H, W, C):

        x = obs / 255 (uint8 images) or obs (floats), as (N, C, H, W)
        → Conv2d(C, 16, 3, stride 2, padding 1) → act → Conv2d(16, 32, 3, stride 2, padding 1) → act
        → flatten → Linear(width) → act → Linear(K)

    Small on purpose (the tangent engine answers it through its torch.func reference backend,
    which forms ∂z/∂θ for every probe state; the structured backend covers Linear stacks only).
    """

    def __init__(self, obs_shape: tuple[int, int, int], n_actions: int, width: int = 64, activation: str = "tanh",
                 dtype: torch.dtype = torch.float64, pixel_scale: float = 255.0):
        super().__init__()
        if len(obs_shape) != 3 or min(obs_shape) < 1:
            raise ValueError(f"the CNN policy reads images of shape (H, W, C); got observations of shape {obs_shape}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        H, W, C = obs_shape
        act = ACTIVATIONS[activation]
        self.conv = nn.Sequential(nn.Conv2d(C, 16, 3, stride=2, padding=1, dtype=dtype), act(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1, dtype=dtype), act())
        h, w = (H + 1) // 2, (W + 1) // 2
        h, w = (h + 1) // 2, (w + 1) // 2
        self.head = nn.Sequential(nn.Linear(32 * h * w, width, dtype=dtype), act(), nn.Linear(width, n_actions, dtype=dtype))
        self.obs_shape, self.n_actions, self.pixel_scale = tuple(obs_shape), n_actions, float(pixel_scale)

    def forward(self, obs: Tensor) -> Tensor:
        dtype = self.head[0].weight.dtype
        x = obs.reshape(-1, *self.obs_shape)
        x = x.to(dtype) / self.pixel_scale if not obs.is_floating_point() else x.to(dtype)
        return self.head(self.conv(x.permute(0, 3, 1, 2)).flatten(1))

    @property
    def output_layer(self) -> nn.Linear:
        return self.head[-1]


def initial_logits(p0: float, target: int, n_actions: int, start: Sequence[float] | None = None) -> Tensor:
    """Logits (float64) whose softmax gives the target p₀ and splits 1 − p₀ evenly over the rest,
    or, given ``start`` (K probabilities summing to 1, start[target] = p₀), z = log start."""
    if not 0.0 < p0 < 1.0:
        raise ValueError(f"p0 must be in (0, 1), got {p0}")
    if start is not None:
        pi = torch.as_tensor(list(start), dtype=torch.float64)
        if pi.shape != (n_actions,) or not bool((pi > 0).all()) or abs(float(pi.sum()) - 1.0) > 1e-9:
            raise ValueError(f"start must hold {n_actions} probabilities > 0 that sum to 1, got {list(start)}")
        if abs(float(pi[target]) - p0) > 1e-12 * max(1.0, p0):
            raise ValueError(f"start[{target}] = {float(pi[target])} differs from p0 = {p0}")
        return torch.log(pi)
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
    start: Sequence[float] | None = None,
    escort_q: float = ESCORT_Q,
    one_hot_states: int | None = None,
    obs_shape: tuple[int, ...] | None = None,
) -> nn.Module:
    """Build a policy of ``kind`` whose π(target | reference_obs) = p₀ (and π(·|reference_obs) =
    ``start`` when a start vector is given; :func:`initial_logits`).

    For the MLP the output bias is shifted so that the logits at ``reference_obs`` equal
    :func:`initial_logits` (averaged over the rows of ``reference_obs`` when there are several,
    which makes p₀ exact for one state and approximate for many). Initialisation uses its own
    RNG stream seeded by ``seed`` and leaves the global torch RNG untouched.
    """
    if kind not in POLICY_KINDS:
        raise ValueError(f"policy must be one of {', '.join(POLICY_KINDS)}, got {kind!r}")
    if not 0 <= target < n_actions:
        raise ValueError(f"target action must be in [0, {n_actions - 1}], got {target}")
    z0 = initial_logits(p0, target, n_actions, start)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU generator alone, which fork_rng restores
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
        elif kind == "escort":
            # |θ_a| = π_a^(1/q), so that Σ_a |θ_a|^q = 1 and ‖θ‖_q = 1 at the start
            policy = EscortPolicy(n_states, n_actions, q=escort_q, dtype=dtype)
            with torch.no_grad():
                pi = torch.softmax(z0, dim=0)
                policy.theta.copy_(torch.exp(torch.log(pi) / escort_q).expand(n_states, n_actions))
        else:
            if kind == "cnn":
                if obs_shape is None or len(obs_shape) != 3:
                    raise ValueError(f"the cnn policy reads image observations (H, W, C); got shape {obs_shape}")
                policy = CNNPolicy(tuple(obs_shape), n_actions, width, activation, dtype=dtype)
            else:
                policy = MLPPolicy(obs_dim, n_actions, width, depth, activation, dtype=dtype,
                                   one_hot_states=one_hot_states)
            with torch.no_grad():
                z = policy(torch.as_tensor(reference_obs)).to(torch.float64).mean(dim=0)
                out = policy.output_layer
                out.bias.copy_((out.bias.to(torch.float64) + z0 - z).to(dtype))
    return policy
