"""Juice populations (issue 12, run 12): each new path against the one it replaced, in one run, as
ratios of the medians of interleaved rounds.

1. A sampled population's rollout, ``JuiceModel.sample`` (π looked up by observation key from
   one softmax of the update's logits, each member's H·B action uniforms drawn at once, the vector
   env stepped by ``step_keys``), against the per-step rollout it replaced (kept here as
   ``per_step_sample``, the named baseline: a forward pass of every member's policy, one
   ``sample_actions`` per member and a full ``step`` per time step, then ``observation_index``),
   tabular and MLP policies, 5 and 30 members of 32 episodes of 50 steps.
2. An update's gradients split at the logits (``member_gradients_through``: a reverse pass
   through the model per output, then one batched pass through the network for all of them and
   the 25 logits of the Fisher) against one reverse pass per output (``member_gradients``, the
   named baseline), the MLP (2 × 64): an untracked sampled NPG update (U and the logits) and a
   tracked exact one (U, P, F, P_probe, the log-odds at the four probe observations and the
   logits), 1, 2, 5, 8, 16 and 30 members. The population takes the split for at most
   ``SPLIT_MEMBERS`` members.
3. The η-probe's P at six scales (``JuiceModel.probability``: a visitation per block of M rows, P
   alone) against the model's quantities per block (the probe's previous code, the named
   baseline) and against one visitation of a block-diagonal chain of all 6M rows, exact juice
   MLP, 5 and 30 members.

    .venv/bin/python benchmarks/bench_juice_population.py      # about two minutes

Each pair is checked to give the same numbers first: the rollouts the same batch (equal arrays,
from generators in equal states), the gradients to 1e-12, the probe's P bit for bit."""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_population import juice_configs  # noqa: E402
from timing import interleaved_medians  # noqa: E402


def per_step_sample(model, pop, batch_size: int, baseline: str, radius: int):
    """The rollout before run 12 (``JuiceModel.sample`` of commit 752f675): the policy of all
    members in one forward pass per time step, each member's actions by ``sample_actions``, one
    full ``step`` of the vector env, then each member's keys by ``observation_index``."""
    from torch.func import functional_call, vmap

    from ntrl.agents.reinforce import aggregate_episodes, sample_actions
    from ntrl.envs.juice import observation_index

    sp = pop.stacked
    blocks = sp.unflatten(pop.theta.detach())

    action_rngs = pop.action_rngs
    M, H, B, K, N = len(action_rngs), model.horizon, batch_size, model.n_actions, model.n_states
    obs = model.venv.reset()[0].reshape(M, B, -1)
    O = np.empty((H, M, B, obs.shape[-1]), dtype=np.float32)
    A = np.empty((H, M, B), dtype=np.int64)
    Rw = np.empty((H, M, B))
    for t in range(H):
        with torch.no_grad():
            Z = vmap(lambda p, o: functional_call(sp.module, p, (o,)))(blocks, torch.as_tensor(obs))  # each member's own obs
            probs = torch.softmax(Z.to(torch.float64), dim=-1).cpu().numpy()
        O[t] = obs
        for m in range(M):
            A[t, m] = sample_actions(probs[m], action_rngs[m])
        nxt, reward, *_ = model.venv.step(A[t].reshape(-1))
        obs, Rw[t] = nxt.reshape(M, B, -1), reward.reshape(M, B)
    C_episode = np.zeros((M, B, N, K))
    for m in range(M):
        keys = observation_index(O[:, m].reshape(H * B, -1), radius).reshape(H, B)
        agg = aggregate_episodes(keys, A[:, m], Rw[:, m], K, baseline)
        C_episode[m][:, model.key_rows[agg["keys"]]] = agg["C_episode"]
    return C_episode


def population(policy: str, mode: str, members: int, out: str):
    from ntrl.population.trainer import _Population

    configs = [c.validate() for c in juice_configs(out, members, 10, policy, mode)]
    return _Population(configs, torch.device("cpu")), configs[0]


def streams(pop):
    """The generators a rollout draws from, to restore between the two paths."""
    return copy.deepcopy((pop.action_rngs, pop.model.venv.block_rngs))


def restore(pop, saved) -> None:
    action, blocks = copy.deepcopy(saved)
    pop.action_rngs[:] = action
    pop.model.venv.set_block_generators(blocks)


def rollout(policy: str, members: int, rounds: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        pop, first = population(policy, "sampled", members, d)
        q = pop.forward()
        saved = streams(pop)

        def new():
            return pop.model.sample(q, first.batch_size, first.baseline, pop.action_rngs, pop.noise_rngs)

        def old():
            return per_step_sample(pop.model, pop, first.batch_size, first.baseline, first.view_radius)

        batch = new()
        restore(pop, saved)
        assert np.array_equal(batch.C_episode.numpy(), old()), "the two rollouts differ"
        t = interleaved_medians({"new": new, "old": old}, rounds)
        pop.model.close()
        return t["new"] * 1e3, t["old"] * 1e3


def gradients(mode: str, members: int, rounds: int) -> tuple[float, float]:
    """(ms split at the logits, ms one pass per output), the forward pass they share subtracted."""
    from ntrl.engine.batched import member_gradients, member_gradients_through

    tracked = mode == "exact"
    with tempfile.TemporaryDirectory() as d:
        pop, _ = population("mlp", mode, members, d)
        N, K = pop.model.n_states, pop.model.n_actions

        def outputs():
            q = pop.forward()
            outs = [q["U"]] + ([q["P"], q["F"], q["P_probe"]] + [q["z"][:, i] for i in range(pop.model.n_z)]
                               if tracked else [])
            return outs, q

        def new():
            outs, q = outputs()
            return member_gradients_through(outs, q["Z"], q["leaves"], N * K)

        def old():
            outs, q = outputs()
            return member_gradients(outs + [q["Z"][:, o, a] for o in range(N) for a in range(K)], q["leaves"])

        for x, y in zip(new(), old()):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-300)
        t = interleaved_medians({"new": new, "old": old, "forward": outputs}, rounds)
        pop.model.close()
        return (t["new"] - t["forward"]) * 1e3, (t["old"] - t["forward"]) * 1e3


def probe(members: int, rounds: int, scales: int = 6) -> dict[str, float]:
    """ms for P at the η-probe's ``scales``·M rows of exact juice MLP members: ``JuiceModel.probability``
    (a visitation per block of M rows, P alone), against the probe's previous code (the model's
    quantities per block of M rows, the named baseline) and against one visitation of a single
    block-diagonal chain of all the rows (the model's ``probability`` with as many rows as members)."""
    with tempfile.TemporaryDirectory() as d:
        pop, _ = population("mlp", "exact", members, d)
        model = pop.model
        M = pop.theta.shape[0]
        with torch.no_grad():
            theta = pop.theta.repeat(scales, 1) * (1 + 1e-3 * torch.arange(scales * M, dtype=torch.float64)[:, None] / M)
            Z = pop.logits_at(theta)
        one_chain = copy.copy(model)
        one_chain.rewards = model.rewards.repeat(scales, 1, 1)  # the block size probability() reads

        def old():
            return torch.cat([model.quantities(z)["P"] for z in Z.split(M)])

        with torch.no_grad():
            want = old()
            assert torch.equal(model.probability(Z), want) and torch.equal(one_chain.probability(Z), want)
            t = interleaved_medians({"new": lambda: model.probability(Z), "old": old,
                                     "one chain": lambda: one_chain.probability(Z)}, rounds)
        model.close()
        return {k: v * 1e3 for k, v in t.items()}


def main() -> None:
    torch.set_num_threads(1)
    for policy in ("tabular", "mlp"):
        for members in (5, 30):
            new, old = rollout(policy, members, rounds=7)
            print(f"rollout, {policy}, {members} members × 32 episodes: {new:.1f} ms against {old:.1f} ms, "
                  f"{old / new:.1f}×", flush=True)
    for mode, what in (("sampled", "untracked sampled NPG"), ("exact", "tracked exact")):
        for members in (1, 2, 5, 8, 16, 30):
            new, old = gradients(mode, members, rounds=9)
            print(f"gradients, {what} MLP update, {members} member(s): split {new:.2f} ms against {old:.2f} ms, "
                  f"{old / new:.2f}×", flush=True)
    for members in (5, 30):
        t = probe(members, rounds=9)
        print(f"η-probe's P at 6 scales, exact MLP, {members} members: {t['new']:.2f} ms against {t['old']:.2f} ms "
              f"(quantities per block), {t['old'] / t['new']:.2f}×; one chain of all rows {t['one chain']:.2f} ms, "
              f"{t['one chain'] / t['new']:.2f}× as long", flush=True)


if __name__ == "__main__":
    main()
