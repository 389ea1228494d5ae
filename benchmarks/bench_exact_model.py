"""The exact tabular model's visitation: the adjoint autograd node against the torch recursion.

    .venv/bin/python benchmarks/bench_exact_model.py            # about a minute
    .venv/bin/python benchmarks/bench_exact_model.py --quick    # a few seconds

For the juice gridworld's tabular model (5×5: 600 states, and 8×8: 4,032 states; horizon 50;
float64; single thread) it times, as medians of interleaved calls, with a random policy matrix π:

* forward:            d = visitation(π)
* forward + backward: ∂(c·d)/∂π by autograd, for a fixed random c
* utility gradient:   ``TangentEngine.value_and_gradient`` of the expected return with the 2×64
  tanh MLP policy (what every exact-mode training update computes)

once through ``TabularMDP.visitation`` (the adjoint node, ``FiniteHorizonVisitation``) and once
through ``TabularMDP.visitation_torch`` (the recursion in torch ops, which the adjoint node
replaced and which still runs under torch.func). The ratio torch / adjoint is how many times
faster the node is.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager

import torch

from ntrl.agents.policies import make_policy
from ntrl.envs.juice import OBS_DIM, N_ACTIONS, STAY, seen_observations, tabular_model
from ntrl.engine.exact_model import TabularMDP
from ntrl.engine.tangent import TangentEngine
from timing import interleaved_medians


@contextmanager
def torch_recursion():
    """Route TabularMDP.visitation through the torch recursion while active."""
    original = TabularMDP.visitation

    def torch_only(self, view, pi=None):
        return self.visitation_torch(self.policy_matrix(view) if pi is None else pi)

    TabularMDP.visitation = torch_only
    try:
        yield
    finally:
        TabularMDP.visitation = original


def cases(model: TabularMDP):
    gen = torch.Generator().manual_seed(0)
    pi = torch.softmax(torch.randn(model.n_states, model.n_actions, generator=gen, dtype=torch.float64), -1)
    c = torch.randn(model.n_states, generator=gen, dtype=torch.float64)
    probes = torch.as_tensor(seen_observations(5, 1))
    policy = make_policy("mlp", obs_dim=OBS_DIM, n_actions=N_ACTIONS, target=STAY, p0=0.5, reference_obs=probes,
                         seed=0, width=64, depth=2, activation="tanh", dtype=torch.float64)
    engine = TangentEngine(policy, dtype=torch.float64)

    def forward():
        with torch.no_grad():
            return model.visitation(None, pi)

    def forward_backward():
        p = pi.clone().requires_grad_(True)
        return torch.autograd.grad(model.visitation(None, p) @ c, p)

    def utility_gradient():
        return engine.value_and_gradient(model.expected_return)

    return {"forward": forward, "forward + backward": forward_backward, "utility gradient": utility_gradient}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rounds = 5 if args.quick else 40
    print(f"# exact-model visitation, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}, median of {rounds} interleaved calls")
    print()
    print("| grid | states | what | torch recursion (ms) | adjoint node (ms) | torch / adjoint |")
    print("|---|---|---|---|---|---|")
    for size in (5,) if args.quick else (5, 8):
        model = tabular_model(size=size, view_radius=1, horizon=50)
        fns = cases(model)
        for what, f in fns.items():
            adjoint_f = f

            def torch_f(f=f):
                with torch_recursion():
                    return f()

            t = interleaved_medians({"torch": torch_f, "adjoint": adjoint_f}, rounds)
            print(f"| {size}×{size} | {model.n_states} | {what} | {1e3 * t['torch']:.2f} | {1e3 * t['adjoint']:.2f} | "
                  f"{t['torch'] / t['adjoint']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
