import pytest
import torch

from ntrl.agents.policies import make_policy
from ntrl.engine.tangent import TangentEngine

OBS = torch.ones(1, 1)


@pytest.mark.parametrize("kind", ["single_logit", "tabular", "mlp"])
@pytest.mark.parametrize("p0", [1e-9, 1e-4, 0.01, 0.5, 0.999])
@pytest.mark.parametrize("target", [0, 1])
def test_initial_probability_exact(kind, p0, target):
    pol = make_policy(kind, 1, 2, target=target, p0=p0, reference_obs=OBS, seed=7)
    p = TangentEngine(pol).view().probs(OBS)[0, target].item()
    assert abs(p - p0) <= 1e-9 * max(p0, 1e-3) and abs(p - p0) < 1e-9


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu", "silu", "elu", "softplus"])
def test_mlp_shapes_and_k_actions(activation):
    pol = make_policy("mlp", 3, 5, target=4, p0=0.02, reference_obs=torch.zeros(1, 3), width=7, depth=3,
                      activation=activation)
    probs = TangentEngine(pol).view().probs(torch.zeros(1, 3))[0]
    assert probs.shape == (5,) and probs[4].item() == pytest.approx(0.02, abs=1e-12)
    assert sum(isinstance(m, torch.nn.Linear) for m in pol.modules()) == 4


def test_seed_controls_init_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = make_policy("mlp", 1, 2, 1, 0.1, OBS, seed=1)
    after = torch.rand(1)
    b = make_policy("mlp", 1, 2, 1, 0.1, OBS, seed=1)
    c = make_policy("mlp", 1, 2, 1, 0.1, OBS, seed=2)
    assert before == after
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.net[0].weight, c.net[0].weight)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"p0": 0.0}, "p0"), ({"p0": 1.0}, "p0"), ({"target": 2}, "target"), ({"kind": "cnn"}, "policy"),
     ({"activation": "swish"}, "activation")],
)
def test_bad_arguments(kwargs, match):
    args = dict(kind="mlp", obs_dim=1, n_actions=2, target=1, p0=0.1, reference_obs=OBS)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make_policy(**args)
