"""Grid files the safety tests share: the smallest study that still runs every stage."""


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
