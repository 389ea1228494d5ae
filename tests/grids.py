"""Grid files the safety and Ray tests share: the smallest study that still runs every stage, and
one of population chunks that run for seconds, for kills that land inside a study."""


def tiny_grid(name: str = "s") -> str:
    """One cell (bandit, single logit, SGD, exact), one p₀, one seed: three runs of a few seconds."""
    return f"""name = "{name}"
policies = ["single_logit"]
optimizers = ["sgd"]
p0s = [0.01]
seeds = 1
extinction_steps = 20
max_steps = 200
track_every = 5
price_scales = [1.0, 0.5]
"""


def kill_grid(name: str = "kill", extinction_steps: int = 60) -> str:
    """Bandit MLP under SGD and sign descent, two p₀, three seeds: 18 runs (population chunks by
    default) of up to a few seconds each, so that kills land between and inside them."""
    return f"""name = "{name}"
policies = ["mlp"]
optimizers = ["sgd", "sign"]
p0s = [0.01, 0.001]
seeds = 3
extinction_steps = {extinction_steps}
max_steps = 3000
track_every = 10
price_scales = [1.0, 0.5]
"""
