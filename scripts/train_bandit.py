"""Train REINFORCE on the two-action bandit and watch Price's equation predict each step.

Edit the config below (every field is documented in ntrl/config.py and ntrl/experiments/bandit.py)
and run:

    .venv/bin/python scripts/train_bandit.py

It does exactly what `ntrl train bandit` does: the policy starts with a rare "do"
(p₀ = 0.01); at every tracked update the tracker records the predicted change
ΔP = η·NTCov_M(P, U) next to the realised one, to runs/<name>/records.jsonl and to an
offline W&B run.
"""

from ntrl.experiments.bandit import BanditConfig
from ntrl.train import describe, train

config = BanditConfig(
    policy="mlp",  # single_logit | tabular | mlp
    width=64,
    depth=2,
    activation="tanh",
    optimizer="sgd",  # sgd | adam | npg | sign
    mode="exact",  # exact | sampled
    batch_size=64,  # episodes per update in sampled mode
    p0=0.01,  # initial probability of the target action
    target=1,  # 1 = do, 0 = dont
    lr=0.01,
    steps=400,
    seed=0,
    track_every=1,
    reward_do=1.0,
    reward_dont=-1.0,
    out="runs",
    run_name="train_bandit_script",
    force=True,
    wandb="offline",  # offline | online | disabled
)

if __name__ == "__main__":
    result = train(config)
    print(describe(result, config))
