"""What to train on: configs that build an :class:`ntrl.config.Experiment` (the bandit, the juice
gridworld, any Gymnasium env, SB3), and the user's own properties and probe states."""
