"""``ntrl train --env ID --algo ppo|a2c``: Stable-Baselines3 with :class:`ntrl.agents.sb3.NTCovCallback`.

One tracked update is one rollout of ``n_steps × n_envs`` transitions followed by SB3's
``train()``; ``--steps`` counts those updates. SB3's own policy (``MlpPolicy`` with
``--depth`` hidden layers of ``--width`` units and ``--activation``) replaces ntrl's: ``--policy``,
``--optimizer``, ``--p0``, ``--baseline`` and ``--batch-size`` apply to REINFORCE only. The
run directory holds the same files as a REINFORCE run (config.json, records.jsonl,
summary.json); in the records ``pred_delta`` is ∇X·Δθ from the step SB3 took and
``pred_delta_sgd`` is η·NTCov(X, U).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ntrl.experiments.gym_env import GymConfig
from ntrl.records import CONFIG_FILE, RECORDS_FILE, SUMMARY_FILE, read_records, write_json_atomic
from ntrl.run_dirs import RunDirLocks
from ntrl.termination import sigterm_as_interrupt
from ntrl.train import RunInterrupted, RunResult, non_default_settings, prepare_run_dir, price_check, price_check_text
from ntrl.wandb_sink import WandbSink


def make_model(config: GymConfig, verbose: int = 0):
    """The SB3 algorithm on ``n_envs`` copies of the env (checked by ``make_env`` first)."""
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.env_util import make_vec_env

    env = config.make_env()  # validates the id, kwargs, action space and check_env, once
    env.close()
    venv = make_vec_env(lambda: config.make_env_unchecked(), n_envs=config.n_envs, seed=config.seed)
    from ntrl.agents.policies import ACTIVATIONS

    policy_kwargs = {"net_arch": [config.width] * config.depth, "activation_fn": ACTIVATIONS[config.activation]}
    common = dict(learning_rate=config.lr, n_steps=config.n_steps, gamma=config.gamma, seed=config.seed,
                  policy_kwargs=policy_kwargs, verbose=verbose, device="cpu")
    if config.algo == "ppo":
        n = config.n_steps * config.n_envs
        model = PPO("MlpPolicy", venv, batch_size=min(64, n), n_epochs=4, **common)
    else:
        model = A2C("MlpPolicy", venv, **common)
    # a logger of its own: SB3's default one makes an empty /tmp/SB3-<date> folder at every learn()
    from stable_baselines3.common.logger import Logger

    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def train_sb3(config: GymConfig, progress: bool = True) -> RunResult:
    """Train PPO or A2C with Price tracking at every ``track_every``-th rollout. The run directory
    is locked while the run trains (:class:`ntrl.run_dirs.RunDirLocks`); a SIGTERM at its default
    action ends the process only once the run is written (:mod:`ntrl.termination`)."""
    with sigterm_as_interrupt(), RunDirLocks() as locks:
        return _train_sb3(config, progress, locks)


def _train_sb3(config: GymConfig, progress: bool, locks: RunDirLocks) -> RunResult:
    from ntrl.agents.sb3 import NTCovCallback
    from ntrl.experiments.user_properties import load_probe_states

    config.validate()
    torch.set_num_threads(config.threads)  # as for REINFORCE: tiny networks, extra threads only contend
    model = make_model(config)
    probes = load_probe_states(config.probe_states, tuple(model.observation_space.shape), None,
                               space=model.observation_space)
    specs = [f"P=action:{config.target}"] + list(config.property)
    exact = _exact_model(config, specs)
    _check_properties(config, model, specs, probes, exact)  # before any run directory exists
    run_dir = prepare_run_dir(config, locks)
    recorded = sb3_config(config, model)
    write_json_atomic(run_dir / CONFIG_FILE, recorded)
    sink = WandbSink(run_dir, recorded, mode=config.wandb, name=run_dir.name, group=config.group,
                     **config.wandb_settings())
    callback = NTCovCallback(properties=specs, probe_states="rollout" if probes is None else probes,
                             n_probe=config.n_probe, track_every=config.track_every, sink=sink,
                             records_path=str(run_dir / RECORDS_FILE), seed=config.seed, run_name=run_dir.name,
                             exact_model=exact)
    status = "finished"
    total = config.steps * config.n_steps * config.n_envs
    try:
        model.learn(total_timesteps=total, callback=callback, progress_bar=False)
    except KeyboardInterrupt:
        status = "interrupted"
    except BaseException:
        status = "failed"
        raise
    finally:
        if callback._writer is not None:
            callback._writer.close()
        records = read_records(run_dir / RECORDS_FILE) if (run_dir / RECORDS_FILE).exists() else []
        P = [r["P/value"] for r in records]
        summary = {
            "status": status,
            "algo": config.algo,
            "updates": len(records),
            "timesteps": int(model.num_timesteps),
            "p_start": float(np.mean(P[0])) if P else float("nan"),
            "p_end": float(np.mean(records[-1]["P/value"]) + np.mean(records[-1]["P/real_delta"])) if P else float("nan"),
            "crossed_half_at": None,
            "price_check_P": price_check(records, "P"),
            "price_check_P_sgd": _price_check_sgd(records, "P"),
            "records": str(run_dir / RECORDS_FILE),
            "wandb_dir": sink.directory,
            "wandb_mode": sink.mode,
        }
        write_json_atomic(run_dir / SUMMARY_FILE, summary)
        flat = {k: v for k, v in summary.items() if not isinstance(v, dict)}
        for key in ("price_check_P", "price_check_P_sgd"):
            flat.update({f"{key}/{k}": v for k, v in summary[key].items()})
        sink.finish(flat, exit_code=0 if status != "failed" else 1)
        model.get_env().close()
    if status == "interrupted":
        raise RunInterrupted(f"interrupted at update {len(records)}; {len(records)} records kept in {run_dir}")
    return RunResult(run_dir, summary, summary["wandb_dir"], f"a={config.target}")


SB3_HYPERPARAMETERS = ("learning_rate", "n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda", "clip_range",
                       "clip_range_vf", "normalize_advantage", "ent_coef", "vf_coef", "max_grad_norm", "use_sde",
                       "target_kl", "rms_prop_eps", "use_rms_prop", "n_envs", "seed", "device")


def sb3_hyperparameters(model) -> dict[str, Any]:
    """The model's hyperparameters as SB3 holds them (schedules at the start of training), its
    class, policy class and network."""
    out: dict[str, Any] = {"algo_class": type(model).__name__, "policy_class": type(model.policy).__name__,
                           "net_arch": getattr(model.policy, "net_arch", None),
                           "activation_fn": getattr(getattr(model.policy, "activation_fn", None), "__name__", None),
                           "optimizer_class": type(model.policy.optimizer).__name__}
    for name in SB3_HYPERPARAMETERS:
        if not hasattr(model, name):
            continue
        value = getattr(model, name)
        if callable(value):
            value = value(1.0)  # a schedule, at progress_remaining = 1
        out[name] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
    return out


def sb3_config(config: GymConfig, model) -> dict[str, Any]:
    """What a PPO/A2C run records as its config: the flags that apply to it (not REINFORCE's own)
    and SB3's hyperparameters under ``sb3``."""
    from ntrl.experiments.gym_env import REINFORCE_ONLY

    out = {k: v for k, v in config.to_dict().items() if k not in REINFORCE_ONLY}
    out["sb3"] = sb3_hyperparameters(model)
    return out


def _exact_model(config: GymConfig, specs: list) -> Any:
    """The toy-text model for a ``return`` property (SB3's policy reads raw Discrete observations)."""
    if "return" not in [str(sp).split("=", 1)[-1] for sp in specs]:
        return None
    from ntrl.experiments.gym_env import episode_horizon, tabular_model

    env = config.make_env_unchecked()
    try:
        return tabular_model(env, episode_horizon(env, config.horizon), one_hot=False)
    finally:
        env.close()


def _check_properties(config: GymConfig, model, specs: list, probes, exact) -> None:
    """Evaluate every property once on the initial SB3 policy, at the probe states (or at a reset
    observation when the probes will come from the first rollout)."""
    from ntrl.agents.sb3 import SB3ActorLogits
    from ntrl.engine.tangent import TangentEngine
    from ntrl.experiments.user_properties import RunContext, check_properties, parse_property

    if probes is None:
        probes = np.asarray(model.get_env().reset())[:1]
    context = RunContext(run=config.run_name or config.default_run_name())
    engine = TangentEngine(SB3ActorLogits(model.policy), dtype=torch.float64)
    n_actions = int(model.action_space.n)
    props = [parse_property(sp, torch.as_tensor(probes), n_actions, context, exact_model=exact, raw_probes=probes)
             for sp in specs]
    check_properties(engine, props)


def _price_check_sgd(records: list[dict[str, Any]], name: str) -> dict[str, float]:
    renamed = [{"update": r["update"], f"{name}/value": r[f"{name}/value"],
                f"{name}/pred_delta": r[f"{name}/pred_delta_sgd"], f"{name}/real_delta": r[f"{name}/real_delta"]}
               for r in records if f"{name}/pred_delta_sgd" in r]
    return price_check(renamed, name)


def describe_sb3(result: RunResult, config: GymConfig) -> str:
    s = result.summary
    pc, sgd = s["price_check_P"], s["price_check_P_sgd"]
    r2_sgd = (f"gives R² = {sgd['r2']:.4f}" if isinstance(sgd.get("r2"), float) and math.isfinite(sgd["r2"])
              else "has no R² (the realised ΔP did not vary)")
    text = (
        f"{config.algo.upper()} on {config.env}: P = π(a={config.target}) over the probe states went from "
        f"{s['p_start']:.4g} to {s['p_end']:.4g} in {s['updates']} rollouts ({s['timesteps']} steps, lr {config.lr:g}). "
        f"{price_check_text(pc, 'first-order ∇P·Δθ')} The plain-SGD prediction η·NTCov(P, U) "
        f"{r2_sgd} (SB3 steps with Adam/RMSprop, several epochs and clipping, so it is only "
        f"approximate). Records: {s['records']}."
    )
    if result.wandb_dir:
        text += f" W&B ({s.get('wandb_mode', config.wandb)}): {result.wandb_dir} (browse: wandb leet {result.wandb_dir})."
    from ntrl.experiments.gym_env import REINFORCE_ONLY

    differ = non_default_settings(config, skip=REINFORCE_ONLY)
    if differ:
        text += f" Settings other than the generic defaults: {differ}."
    return text
