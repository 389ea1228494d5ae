"""Each optimizer's plan is the step it actually takes: Δθ = η · d with d = M g_eff."""

import pytest
import torch

from ntrl.agents.optimizers import make_optimizer
from ntrl.agents.policies import make_policy
from ntrl.engine.metrics import Diagonal, Euclidean, InverseFisher

OBS = torch.ones(1, 1, dtype=torch.float64)


def flat(pol):
    return torch.cat([p.detach().reshape(-1) for p in pol.parameters()])


@pytest.mark.parametrize("name", ["sgd", "adam", "sign", "npg"])
def test_plan_equals_realised_step(name):
    pol = make_policy("mlp", 1, 2, 1, 0.2, OBS, seed=0, width=6)
    opt = make_optimizer(name, pol, lr=0.05)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):  # several steps, so Adam's moments and bias corrections are exercised
        g = torch.randn(flat(pol).numel(), generator=gen, dtype=torch.float64)
        plan = opt.plan(g, (OBS, torch.ones(1, dtype=torch.float64)))
        before = flat(pol)
        opt.apply(plan)
        assert torch.allclose(flat(pol) - before, 0.05 * plan.direction, rtol=1e-10, atol=1e-14)


def test_metrics_and_directions():
    pol = make_policy("mlp", 1, 2, 1, 0.2, OBS, seed=0, width=4)
    P = flat(pol).numel()
    g = torch.linspace(-1, 1, P, dtype=torch.float64)
    g[0] = 0.0
    sgd = make_optimizer("sgd", pol, 0.1).plan(g)
    assert isinstance(sgd.metric, Euclidean) and torch.equal(sgd.direction, g)
    sign = make_optimizer("sign", pol, 0.1).plan(g)
    assert isinstance(sign.metric, Diagonal)
    assert torch.equal(sign.direction, torch.sign(g))
    assert torch.allclose(sign.metric.apply(g[None])[0], torch.sign(g))
    adam = make_optimizer("adam", pol, 0.1).plan(g)
    # first Adam step: m̂ = g, v̂ = g², so d = g / (|g| + ε) ≈ sign(g)
    assert torch.allclose(adam.direction, g / (g.abs() + 1e-8))
    npg = make_optimizer("npg", pol, 0.1).plan(g, (OBS, torch.ones(1, dtype=torch.float64)))
    assert isinstance(npg.metric, InverseFisher)


def test_single_logit_npg_step_is_delta_in_logit():
    # F = p(1-p), g = Δ p(1-p)  =>  Δb = η Δ, independent of p
    for p in (1e-6, 0.01, 0.4):
        pol = make_policy("single_logit", 1, 2, 1, p, OBS)
        opt = make_optimizer("npg", pol, lr=0.1)
        g = torch.tensor([2.0 * p * (1 - p)], dtype=torch.float64)
        plan = opt.plan(g, (OBS, torch.ones(1, dtype=torch.float64)))
        assert float(plan.direction[0]) == pytest.approx(2.0, rel=1e-9)


def test_npg_step_of_a_float32_policy_matches_float64():
    """The Fisher is factored in float64 whatever the policy dtype: no direction is lost."""
    obs = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(6, 2)
    w = torch.full((6,), 1 / 6, dtype=torch.float64)
    steps = {}
    pol64 = make_policy("mlp", 2, 5, 0, 0.2, obs, seed=0, width=32, dtype=torch.float64)
    pol32 = make_policy("mlp", 2, 5, 0, 0.2, obs, seed=0, width=32, dtype=torch.float32)
    pol32.load_state_dict({k: v.to(torch.float32).to(torch.float64).to(torch.float32) for k, v in pol64.state_dict().items()})
    with torch.no_grad():  # the same weights in both: the float64 copy holds float32-representable values
        for p64, p32 in zip(pol64.parameters(), pol32.parameters()):
            p64.copy_(p32.to(torch.float64))
    for dtype, pol in ((torch.float32, pol32), (torch.float64, pol64)):
        opt = make_optimizer("npg", pol, lr=0.1, damping=1e-3)
        g = torch.linspace(-1, 1, flat(pol).numel(), dtype=torch.float64)
        steps[dtype] = opt.plan(g, (obs, w)).direction.to(torch.float64)
    rel = (steps[torch.float32] - steps[torch.float64]).norm() / steps[torch.float64].norm()
    assert rel < 1e-9  # both factor the same float64 Fisher


def test_bad_optimizer_and_lr():
    pol = make_policy("single_logit", 1, 2, 1, 0.3, OBS)
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer("lbfgs", pol, 0.1)
    with pytest.raises(ValueError, match="learning rate"):
        make_optimizer("sgd", pol, 0.0)
    with pytest.raises(ValueError, match="npg needs"):
        make_optimizer("npg", pol, 0.1).plan(torch.ones(1, dtype=torch.float64))


NO_DYNAMO = """
import sys, tempfile
from pathlib import Path
from ntrl.experiments.bandit import BanditConfig
from ntrl.population import train_population
from ntrl.study.executor import work_units
from ntrl.study.grid import StudyConfig, enumerate_runs

study = StudyConfig.quick()
work_units(study, enumerate_runs(study), Path(tempfile.mkdtemp()) / "runs", 2, True)
with tempfile.TemporaryDirectory() as d:
    configs = [BanditConfig(policy=p, optimizer=o, p0=0.1, steps=5, seed=i, wandb="disabled", out=d,
                            run_name=f"{p}-{o}-{i}") for p in ("mlp", "single_logit") for o in ("sgd", "adam")
               for i in range(2)]
    for k in range(0, len(configs), 2):
        train_population(configs[k:k + 2], progress=False)
print("torch._dynamo" in sys.modules)
"""


def test_building_members_and_sizing_chunks_makes_no_torch_optimizer():
    """A population builds each member's experiment for its policy, and a study sizes its chunks
    from a built member: neither makes the torch.optim optimizer, whose first construction in a
    process imports torch._dynamo (about 1.4 s, once on the study's critical path and once in
    each worker). The per-run path makes it at its first use (the tests above step through it)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", NO_DYNAMO], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_the_torch_optimizer_is_made_at_its_first_use(name):
    pol = make_policy("mlp", 1, 2, 1, 0.2, OBS, seed=0, width=6)
    opt = make_optimizer(name, pol, lr=0.05)
    assert "torch_opt" not in vars(opt)
    opt.apply(opt.plan(torch.ones(flat(pol).numel(), dtype=torch.float64)))
    assert isinstance(opt.torch_opt, torch.optim.Optimizer) and opt.torch_opt.param_groups[0]["params"] == opt.params
