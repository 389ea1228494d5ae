"""Price tracking inside Stable-Baselines3's on-policy algorithms (PPO, A2C): ``NTCovCallback``.

At the end of each tracked rollout (advantages are in the rollout buffer by then) the callback
computes, for every tracked property X and the policy-gradient surrogate of that rollout

    U(θ) = mean_t [ Â_t log π_θ(a_t | s_t) ] + c_ent · mean_t H(π_θ(· | s_t))

(Â normalised over the rollout when the algorithm normalises advantages), with ntrl's
:class:`~ntrl.engine.tangent.TangentEngine` on the SB3 policy's actor (obs → logits, float64):

    value         X(θ)
    ntvar_euc     NTVar(X) = ‖∇X‖²
    ntcov_euc     NTCov(X, U) = ∇X · ∇U

When the next rollout starts, ``train()`` has changed θ by Δθ and the callback records

    real_delta        X(θ + Δθ) − X(θ)
    pred_delta        ∇X · Δθ                (first order, from the actual parameter change)
    pred_delta_sgd    η · NTCov(X, U)        (one plain SGD step on the rollout's surrogate)
    residual          real_delta − pred_delta
    residual_sgd      real_delta − pred_delta_sgd

``pred_delta_sgd`` is only approximate for SB3: PPO takes ``n_epochs`` × minibatch Adam steps
with clipping and A2C takes one RMSprop step, so the step is M·g (several times, on minibatches),
not η·g. ``pred_delta`` uses the step that really happened and differs from the realised change
only by curvature, O(‖Δθ‖²).

Logged under ``ntrl/...`` through SB3's logger (averaged over probe states), to W&B (an
:class:`ntrl.wandb_sink.WandbSink`, else the active ``wandb.run``; step metric ``ntrl/update``
via ``define_metric``) and, when ``records_path`` is given, to an ntrl records file.

RL Zoo: list it under ``callback:`` in a hyperparameter file; every argument is plain YAML::

    CartPole-v1:
      policy: 'MlpPolicy'
      n_timesteps: !!float 1e5
      callback:
        - ntrl.agents.sb3.NTCovCallback:
            properties: ["action:1", "my_env:prefers_left"]
            n_probe: 64
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import CategoricalDistribution
from stable_baselines3.common.preprocessing import preprocess_obs
from torch import Tensor, nn

from ntrl.engine.metrics import Euclidean
from ntrl.properties import Property
from ntrl.records import RecordWriter
from ntrl.engine.tangent import PolicyView, TangentEngine
from ntrl.tracker import to_json
from ntrl.wandb_sink import WandbSink

__all__ = ["SB3ActorLogits", "NTCovCallback", "rollout_surrogate"]
SB3_SECTIONS = ("train/", "rollout/", "time/")  # SB3's own logger keys, forwarded into the records


class SB3ActorLogits(nn.Module):
    """obs → action logits of an SB3 ``ActorCriticPolicy`` with a Categorical action distribution.

    The same computation as ``policy.get_distribution(obs).distribution.logits`` (up to the
    softmax's shift), but in the dtype of the parameters it is called with, so that ntrl's engine
    can evaluate it at float64 copies of θ. The critic's parameters are part of the module
    (their Jacobian entries are zero), so flat vectors line up with ``policy.parameters()``.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        if not hasattr(policy, "action_dist") and hasattr(policy, "q_net"):  # DQN, QR-DQN: no π to track
            raise ValueError(f"NTCovCallback tracks policy-gradient (actor) policies, whose actions come from a "
                             f"softmax π(a|s): PPO, A2C; {type(policy).__name__} is value-based (it acts by argmax "
                             f"of Q), so it has no action probabilities whose change Price's equation predicts")
        if not isinstance(getattr(policy, "action_dist", None), CategoricalDistribution):
            raise ValueError(f"NTCovCallback needs a Discrete action space (a Categorical policy); this policy "
                             f"has {type(getattr(policy, 'action_dist', None)).__name__}")
        self.policy = policy

    def forward(self, obs: Tensor) -> Tensor:
        p = self.policy
        dtype = p.action_net.weight.dtype
        x = preprocess_obs(obs, p.observation_space, normalize_images=p.normalize_images).to(dtype)
        features = p.pi_features_extractor(x)
        latent = p.mlp_extractor.forward_actor(features)
        return p.action_net(latent)


def rollout_surrogate(obs: Tensor, actions: Tensor, advantages: Tensor, normalize: bool = False,
                      ent_coef: float = 0.0):
    """U(view) = mean(Â log π(a|s)) + ent_coef · mean H(π(·|s)): the actor part of A2C's and
    PPO's objective at θ_old (PPO's clipped ratio has the same gradient there)."""
    adv = advantages.to(torch.float64).reshape(-1)
    if normalize and adv.numel() > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    actions = actions.reshape(-1).long()

    def U(view: PolicyView) -> Tensor:
        logp = view.log_probs(obs)
        lp = logp.gather(-1, actions[:, None])[:, 0]
        out = (adv.to(lp.dtype) * lp).mean()
        if ent_coef:
            out = out - ent_coef * (logp.exp() * logp).sum(-1).mean()
        return out

    return U


class NTCovCallback(BaseCallback):
    """Predicted against realised change of tracked properties across each ``train()`` of PPO/A2C.

    :param properties: property specs or :class:`ntrl.properties.Property` objects
        (``action:A``, ``event:MOD:PRED``, ``MOD:FUNC``, ``NAME=SPEC``; see
        :mod:`ntrl.experiments.user_properties`). Default: the probability of action 0.
    :param probe_states: ``"rollout"`` (``n_probe`` states of the first rollout, frozen), an array,
        a ``.npy`` path or ``MOD:FUNC``.
    :param track_every: track every k-th rollout.
    :param sink: an :class:`ntrl.wandb_sink.WandbSink` (records are logged as in ntrl's own runs, with
        its step metric ``update``) or a ``wandb`` Run (logged under ``PREFIX/``, step ``PREFIX/update``).
    :param use_wandb: when no sink is given, log to the active ``wandb.run`` if there is one.
    :param records_path: also append each record to this ntrl records file (JSONL).
    :param run_name: used in error messages about user properties.
    """

    def __init__(
        self,
        properties: Sequence[Any] = ("action:0",),
        probe_states: Any = "rollout",
        n_probe: int = 64,
        track_every: int = 1,
        sink: Any = None,
        use_wandb: bool = True,
        records_path: str | None = None,
        prefix: str = "ntrl",
        seed: int = 0,
        run_name: str | None = None,
        exact_model: Any = None,
        verbose: int = 0,
    ):
        super().__init__(verbose)
        if track_every < 1:
            raise ValueError(f"track_every must be >= 1, got {track_every}")
        self.property_specs = list(properties)
        self.probe_spec = probe_states
        self.n_probe, self.track_every, self.seed = int(n_probe), int(track_every), int(seed)
        self.sink, self.use_wandb, self.prefix = sink, use_wandb, prefix
        self.records_path = records_path
        self.run_name = run_name
        self.exact_model = exact_model
        self.properties: list[Property] = []
        self.probes: Tensor | None = None
        self.records: list[dict[str, Any]] = []
        self.n_rollouts = 0
        self._pending: dict[str, Any] | None = None
        self._writer: RecordWriter | None = None
        self._wandb_run = None

    # ------------------------------------------------------------------ setup
    def _init_callback(self) -> None:
        from ntrl.experiments.user_properties import RunContext, load_probe_states

        self.actor = SB3ActorLogits(self.model.policy)
        self.engine = TangentEngine(self.actor, dtype=torch.float64)
        self.obs_space = self.model.observation_space
        self.n_actions = int(self.model.action_space.n)
        self.context = RunContext(run=self.run_name or type(self.model).__name__)
        raw = load_probe_states(self.probe_spec, tuple(self.obs_space.shape), None, flag="probe_states",
                                space=self.obs_space)
        if raw is not None:
            self._set_probes(raw)
        if self.records_path is not None:
            self._writer = RecordWriter(self.records_path)
        if self.sink is not None and not isinstance(self.sink, WandbSink):
            self._wandb_run, self.sink = self.sink, None  # a wandb Run was passed: log to it with our prefix
            self._wandb_run.define_metric(f"{self.prefix}/update")
            self._wandb_run.define_metric(f"{self.prefix}/*", step_metric=f"{self.prefix}/update")
        elif self.sink is None and self.use_wandb:
            import sys

            wandb = sys.modules.get("wandb")
            if wandb is not None and getattr(wandb, "run", None) is not None:
                self._wandb_run = wandb.run
                self._wandb_run.define_metric(f"{self.prefix}/update")
                self._wandb_run.define_metric(f"{self.prefix}/*", step_metric=f"{self.prefix}/update")

    def _set_probes(self, raw: np.ndarray) -> None:
        from ntrl.experiments.user_properties import check_properties, parse_property

        self.raw_probes = raw
        self.probes = torch.as_tensor(raw)
        self.properties = [parse_property(s, self.probes, self.n_actions, self.context,
                                          exact_model=self.exact_model, raw_probes=raw, flag="properties")
                           for s in self.property_specs]
        check_properties(self.engine, self.properties, flag="properties")

    # ------------------------------------------------------------------ events
    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        buf = self.model.rollout_buffer
        self.n_rollouts += 1
        update = self.n_rollouts - 1
        if self.probes is None:
            from ntrl.experiments.user_properties import sample_rows

            flat = buf.observations.reshape(-1, *self.obs_space.shape)
            self._set_probes(sample_rows(flat, self.n_probe, self.seed))
        if update % self.track_every != 0:
            return
        self.context.step = update
        obs = torch.as_tensor(buf.observations.reshape(-1, *self.obs_space.shape))
        actions = torch.as_tensor(buf.actions.reshape(-1))
        adv = torch.as_tensor(buf.advantages.reshape(-1))
        U = rollout_surrogate(obs, actions, adv, normalize=bool(getattr(self.model, "normalize_advantage", False)),
                              ent_coef=float(getattr(self.model, "ent_coef", 0.0) or 0.0))
        params = {k: v.clone() for k, v in self.engine.params().items()}  # θ before PPO's epochs
        u_value, g = self.engine.value_and_gradient(U, params)
        record: dict[str, Any] = {"update": update, "timesteps": int(self.num_timesteps), "U": u_value}
        stats = self.engine.stats_many(self.properties, {"euc": Euclidean()}, {"g": g}, params)
        for X, st in zip(self.properties, stats):
            record[f"{X.name}/value"] = to_json(st.value)
            record[f"{X.name}/ntvar_euc"] = to_json(st.ntvar["euc"])
            record[f"{X.name}/ntcov_euc"] = to_json(st.ntcov["g"])
        record["backend"] = "+".join(sorted({st.backend for st in stats}))
        self._pending = {"record": record, "params": params, "values": [st.value for st in stats]}

    def _on_rollout_start(self) -> None:
        self._finish_pending()

    def _on_training_end(self) -> None:
        self._finish_pending()
        if self._writer is not None:
            self._writer.close()

    # ------------------------------------------------------------------ realised change
    def _n_grad_steps(self) -> int:
        m = self.model
        if hasattr(m, "n_epochs") and hasattr(m, "batch_size"):
            n = m.rollout_buffer.buffer_size * m.rollout_buffer.n_envs
            return int(m.n_epochs) * int(np.ceil(n / m.batch_size))
        return 1

    def _finish_pending(self) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        record = dict(pending["record"])
        params, old = self.engine.params(), pending["params"]
        dtheta = self.engine.flatten(params) - self.engine.flatten(old)
        lr = float(self.model.policy.optimizer.param_groups[0]["lr"])
        record.update({"lr": lr, "step_norm": float(dtheta.norm()), "n_grad_steps": self._n_grad_steps()})
        record.update(self.sb3_metrics())
        # ∇X(θ_old)·Δθ: the first-order prediction of the change the epochs made
        first_order = self.engine.stats_many(self.properties, {}, {"dtheta": dtheta}, old)
        for X, value, st in zip(self.properties, pending["values"], first_order):
            real = self.engine.evaluate(X, params) - value
            pred = st.ntcov["dtheta"]
            pred_sgd = lr * torch.as_tensor(record[f"{X.name}/ntcov_euc"], dtype=torch.float64).reshape(-1)
            record[f"{X.name}/pred_delta"] = to_json(pred)
            record[f"{X.name}/pred_delta_sgd"] = to_json(pred_sgd)
            record[f"{X.name}/real_delta"] = to_json(real)
            record[f"{X.name}/residual"] = to_json(real - pred)
            record[f"{X.name}/residual_sgd"] = to_json(real - pred_sgd)
        self.records.append(record)
        self._log(record)

    def sb3_metrics(self) -> dict[str, float]:
        """SB3's own numbers of the rollout and ``train()`` just done, under SB3's names, as its
        logger (and W&B's SB3 integration) shows them: ``train/*`` (approx_kl, loss, entropy_loss,
        clip_fraction, ...) from the logger's pending values, and ``rollout/ep_rew_mean`` and
        ``rollout/ep_len_mean`` over SB3's episode buffer (its last 100 episodes), as SB3 computes them."""
        out: dict[str, float] = {}
        for k, v in getattr(self.model.logger, "name_to_value", {}).items():
            if k.startswith("train/") and isinstance(v, (int, float, np.floating)) and np.isfinite(v):
                out[k] = float(v)
        episodes = getattr(self.model, "ep_info_buffer", None) or []
        if len(episodes):
            out["rollout/ep_rew_mean"] = float(np.mean([e["r"] for e in episodes]))
            out["rollout/ep_len_mean"] = float(np.mean([e["l"] for e in episodes]))
        out["time/total_timesteps"] = int(self.model.num_timesteps)
        return out

    def _log(self, record: dict[str, Any]) -> None:
        from ntrl.records import scalar_items

        scalars = dict(scalar_items(record))
        for k, v in scalars.items():
            if k != "update" and not k.startswith(SB3_SECTIONS):  # SB3 logs its own under their names
                self.logger.record(f"{self.prefix}/{k}", v)
        if self._writer is not None:
            self._writer.write(record)
        if self.sink is not None:
            self.sink.log(record)
        elif self._wandb_run is not None:
            data = {f"{self.prefix}/{k}": v for k, v in scalars.items()}
            self._wandb_run.log(data)
