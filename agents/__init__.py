"""ntrl's agents, installed as ``ntrl.agents``: policies, REINFORCE and optimizers."""
