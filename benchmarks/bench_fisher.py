"""The exact inverse-Fisher factorisation: ``ntrl.engine.metrics.right_singular`` (QR of Aᵀ, then the
SVD of the small triangular factor) against ``torch.linalg.svd`` of A, on the Fisher rows the
tracker factors; and for a population's batch of such Fishers (30 members, as a study's juice
chunk), ``HouseholderSVD`` (the same QR and SVD, Vh kept as Householder reflectors) against
``right_singular`` (Vh formed), each with what a tracked update then does with it: the directional
derivatives Vh ∇X of three properties' gradients; and the Fisher rows ∇log π formed from the
members' logit gradients into a new tensor or over the stacked gradients (``log_prob_rows``).

    .venv/bin/python benchmarks/bench_fisher.py            # about 10 s

A holds the rows √(w_o π(a|o)) ∇log π(a|o) of the juice gridworld's 2×64 tanh MLP at its distinct
observations (5 observations × 5 actions = 25 rows, 4741 parameters, float64), and of the same
MLP at 64 random observations (320 rows). Median of interleaved calls, single thread.
"""

from __future__ import annotations

import os
import time

import torch

from ntrl.experiments.juice import JuiceConfig
from ntrl.engine.metrics import AllLogProbs, HouseholderSVD, right_singular
from ntrl.engine.tangent import TangentEngine
from timing import interleaved_medians


def fisher_rows(engine: TangentEngine, obs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    values, J = engine.dense_jacobian(AllLogProbs(obs, 5))
    scale = (weights.repeat_interleave(5) * values.exp()).sqrt()
    return J * scale[:, None]


def main() -> None:
    torch.set_num_threads(1)
    exp = JuiceConfig(policy="mlp", optimizer="sgd", p0=0.01, wandb="disabled").build()
    engine = TangentEngine(exp.policy, dtype=torch.float64)
    obs, w = exp.utility(TangentEngine(exp.policy), None).fisher_states
    cases = {
        "juice distinct observations": fisher_rows(engine, obs.to(torch.float64), w.to(torch.float64)),
        "64 random observations": fisher_rows(engine, torch.randn(64, 3, dtype=torch.float64,
                                                                  generator=torch.Generator().manual_seed(0)),
                                              torch.full((64,), 1 / 64, dtype=torch.float64)),
    }
    print(f"# inverse-Fisher factorisation, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print()
    print("| rows of A | A | torch.linalg.svd (ms) | right_singular (ms) | svd / right_singular |")
    print("|---|---|---|---|---|")
    for name, A in cases.items():
        t = {k: 1e3 * v for k, v in interleaved_medians(
            {"svd": lambda: torch.linalg.svd(A, full_matrices=False), "qr": lambda: right_singular(A)}, 200).items()}
        print(f"| {name} | {A.shape[0]} × {A.shape[1]} | {t['svd']:.2f} | {t['qr']:.2f} | {t['svd'] / t['qr']:.2f} |")
    print()
    A = cases["juice distinct observations"]
    batch = torch.stack([A * (1 + 0.01 * i) for i in range(30)])  # 30 members' Fishers
    grads = torch.randn(30, A.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def formed():
        _, Vh = right_singular(batch)
        return Vh @ grads

    t = {k: 1e3 * v for k, v in interleaved_medians(
        {"formed": formed, "reflectors": lambda: HouseholderSVD(batch).project(grads)}, 40).items()}
    print("| Fishers | right_singular, Vh ∇X (ms) | HouseholderSVD, Vh ∇X (ms) | formed / reflectors |")
    print("|---|---|---|---|")
    print(f"| 30 × ({A.shape[0]} × {A.shape[1]}) | {t['formed']:.2f} | {t['reflectors']:.2f} | "
          f"{t['formed'] / t['reflectors']:.2f} |")
    print()
    # the rows ∇log π = ∇z − Σ_b π_b ∇z_b of the same 30 members from their 25 logit gradients, as a
    # population forms them: stacked, then into a new tensor, or over the stacked gradients
    from ntrl.engine.batched import log_prob_rows

    gen = torch.Generator().manual_seed(2)
    logit_grads = [torch.randn(30, A.shape[1], dtype=torch.float64, generator=gen) for _ in range(25)]
    probs = torch.softmax(torch.randn(30, 5, 5, dtype=torch.float64, generator=gen), -1)

    def stacked():
        return torch.stack(logit_grads, 1).reshape(30, 5, 5, -1)

    def former():  # the expression log_prob_rows had before: a (30, 5, 5, P) temporary and a new tensor
        J = stacked()
        return J - (probs[..., None] * J).sum(dim=2, keepdim=True)

    t = {k: 1e3 * v for k, v in interleaved_medians(
        {"former": former, "new": lambda: log_prob_rows(stacked(), probs),
         "over": lambda: log_prob_rows(stacked(), probs, overwrite=True)}, 40).items()}
    print("| Fisher rows from logit gradients | former expression (ms) | log_prob_rows, a new tensor (ms) | "
          "overwrite=True (ms) | former / overwrite |")
    print("|---|---|---|---|---|")
    print(f"| 30 × 25 × {A.shape[1]} | {t['former']:.2f} | {t['new']:.2f} | {t['over']:.2f} | "
          f"{t['former'] / t['over']:.2f} |")


if __name__ == "__main__":
    main()
