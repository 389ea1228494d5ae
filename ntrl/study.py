"""The rarity study: a grid of training runs, run in a process pool, resumable.

Each run is one (environment, policy, optimizer, gradient mode, p₀, direction, seed):

* *rewarded* (escape): r_do = +1, r_dont = −1; train from P = p₀ until P ≥ ½ and record the
  escape time T(p₀) together with the tracked NTVar/ΔP trajectory;
* *punished* (extinction): r_do = −1, r_dont = +1; train from P = p₀ for a fixed number of
  updates and record how P fades.

Every run writes its own run directory (records, config, summary, W&B run grouped by study)
under ``STUDY_DIR/runs/``; a run whose summary is already there is skipped, so a study that
was killed resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tomllib
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from ntrl.config import ConfigError, TrainConfig
from ntrl.train import TrainingError

ENVS = ("bandit", "juice")
DIRECTIONS = ("rewarded", "punished")
STUDY_FILE = "study.json"


class StudyIncomplete(TrainingError):
    """Some runs of a study failed; the completed ones are kept and a re-run retries the rest."""

# Learning rates (env → policy → optimizer) that give escape times of tens to thousands of
# updates for p₀ ≥ 1e-4.
DEFAULT_LRS: dict[str, dict[str, dict[str, float]]] = {
    "bandit": {
        "single_logit": {"sgd": 2.0, "npg": 0.1, "sign": 0.1, "adam": 0.1},
        "tabular": {"sgd": 2.0, "npg": 0.1, "sign": 0.1, "adam": 0.1},
        "mlp": {"sgd": 0.1, "npg": 0.1, "sign": 2e-4, "adam": 1e-3},
    },
    "juice": {
        "tabular": {"sgd": 2.0, "npg": 0.005, "sign": 0.05, "adam": 0.05},
        "mlp": {"sgd": 0.2, "npg": 0.01, "sign": 5e-4, "adam": 1e-3},
    },
}
# Policies each environment supports (a single logit needs exactly two actions).
ENV_POLICIES = {"bandit": ("single_logit", "tabular", "mlp"), "juice": ("tabular", "mlp")}


@dataclass
class StudyConfig:
    """The grid of a rarity study. Presets: :meth:`quick` and :meth:`full`."""

    name: str = "rarity"
    envs: list[str] = field(default_factory=lambda: ["bandit"])
    policies: list[str] = field(default_factory=lambda: ["single_logit", "mlp"])
    optimizers: list[str] = field(default_factory=lambda: ["sgd", "npg", "sign", "adam"])
    modes: list[str] = field(default_factory=lambda: ["exact"])
    p0s: list[float] = field(default_factory=lambda: [1e-1, 1e-2, 1e-3, 1e-4])
    directions: list[str] = field(default_factory=lambda: ["rewarded", "punished"])
    seeds: int = 5
    extinction_p0: float = 0.2
    extinction_steps: int = 400
    max_steps: int = 20_000
    track_every: int = 5
    batch_size: int = 32
    width: int = 64
    depth: int = 2
    activation: str = "tanh"
    lrs: dict[str, dict[str, float]] = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_LRS)))
    price_scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25, 0.125])

    @classmethod
    def quick(cls) -> "StudyConfig":
        """Finishes in under 3 minutes on 2 cores: bandit, exact gradients, 3 decades, 5 seeds."""
        return cls(name="rarity-quick", p0s=[1e-2, 1e-3, 1e-4], seeds=5, extinction_steps=300, track_every=10)

    @classmethod
    def full(cls) -> "StudyConfig":
        """The complete grid of the issue: every policy, optimizer and gradient mode, 4 decades."""
        return cls(name="rarity-full", envs=["bandit", "juice"], policies=["single_logit", "tabular", "mlp"],
                   modes=["exact", "sampled"], p0s=[1e-1, 1e-2, 1e-3, 1e-4], seeds=5)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "StudyConfig":
        """Read a .toml or .json grid; unknown keys and impossible values are errors."""
        path = Path(path)
        if not path.exists():
            raise ConfigError("--config", f"file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError("--config", f"{path} is not valid {path.suffix[1:] or 'JSON'}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError("--config", f"{path} must hold a table of settings")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError("--config", f"unknown key(s) {', '.join(unknown)} in {path}; known keys: {', '.join(sorted(known))}")
        base = cls()
        if "lrs" in data:  # merge a partial env → policy → optimizer table into the defaults
            if not isinstance(data["lrs"], dict):
                raise ConfigError("--config", "lrs must be a table env → policy → optimizer → learning rate")
            merged = base.lrs
            for env, by_policy in data["lrs"].items():
                if not isinstance(by_policy, dict) or not all(isinstance(t, dict) for t in by_policy.values()):
                    raise ConfigError("--config", f"lrs.{env} must be a table policy → optimizer → learning rate")
                for pol, table in by_policy.items():
                    merged.setdefault(env, {}).setdefault(pol, {}).update(table)
            data["lrs"] = merged
        return dataclasses.replace(base, **data).validate()

    def validate(self) -> "StudyConfig":
        from ntrl.agents.optimizers import OPTIMIZERS
        from ntrl.agents.policies import ACTIVATIONS, POLICY_KINDS
        from ntrl.agents.reinforce import GRADIENT_MODES

        def need(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"config key '{key}'", message)

        def subset(key: str, allowed) -> None:
            values = getattr(self, key)
            need(isinstance(values, list) and len(values) > 0, key, "must be a non-empty list")
            bad = [v for v in values if v not in allowed]
            need(not bad, key, f"unknown value(s) {bad}; allowed: {', '.join(map(str, allowed))}")

        subset("envs", ENVS)
        subset("policies", POLICY_KINDS)
        subset("optimizers", OPTIMIZERS)
        subset("modes", GRADIENT_MODES)
        subset("directions", DIRECTIONS)
        need(isinstance(self.p0s, list) and len(self.p0s) > 0, "p0s", "must be a non-empty list")
        need(all(isinstance(p, (int, float)) and 0 < p < 0.5 for p in self.p0s), "p0s",
             f"every p0 must be in (0, 0.5) so that an escape to 1/2 exists, got {self.p0s}")
        need(0 < self.extinction_p0 < 1, "extinction_p0", f"must be in (0, 1), got {self.extinction_p0}")
        need(isinstance(self.seeds, int) and self.seeds >= 1, "seeds", f"must be an integer >= 1, got {self.seeds}")
        for key in ("extinction_steps", "max_steps", "track_every", "batch_size", "width"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= 1, key,
                 f"must be an integer >= 1, got {getattr(self, key)!r}")
        need(isinstance(self.depth, int) and self.depth >= 0, "depth", f"must be an integer >= 0, got {self.depth!r}")
        need(self.activation in ACTIVATIONS, "activation", f"must be one of {', '.join(ACTIVATIONS)}")
        for env, pol in self.cells_env_policy():
            for opt in self.optimizers:
                lr = self.lrs.get(env, {}).get(pol, {}).get(opt)
                need(isinstance(lr, (int, float)) and lr > 0, "lrs",
                     f"needs a learning rate > 0 for {env}/{pol}/{opt}, got {lr!r}")
        need(len(self.price_scales) >= 2 and all(0 < s <= 1 for s in self.price_scales), "price_scales",
             "needs at least two step-size scales in (0, 1]")
        return self

    def cells_env_policy(self) -> list[tuple[str, str]]:
        """The (env, policy) pairs of the grid; policies an env cannot run are left out."""
        return [(e, p) for e in self.envs for p in self.policies if p in ENV_POLICIES[e]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid."""

    env: str
    policy: str
    optimizer: str
    mode: str
    p0: float
    direction: str
    seed: int

    @property
    def cell(self) -> tuple[str, str, str, str]:
        return (self.env, self.policy, self.optimizer, self.mode)

    @property
    def run_id(self) -> str:
        return f"{self.env}-{self.policy}-{self.optimizer}-{self.mode}-{self.direction}-p0={self.p0:g}-seed{self.seed}"


def seed_matters(policy: str, mode: str) -> bool:
    """Whether runs with different seeds differ. The seed sets the MLP's initial weights and the
    sampled episodes; a single-logit or tabular policy with exact gradients is deterministic, so
    its cell runs one seed (its bootstrap intervals are then points)."""
    return policy == "mlp" or mode == "sampled"


def enumerate_runs(study: StudyConfig) -> list[RunSpec]:
    """Every run of the grid, in a fixed order (the order the pool starts them)."""
    specs = []
    for env, policy in study.cells_env_policy():
        for opt in study.optimizers:
            for mode in study.modes:
                for direction in study.directions:
                    p0s = study.p0s if direction == "rewarded" else [study.extinction_p0]
                    for p0 in p0s:
                        for seed in range(study.seeds if seed_matters(policy, mode) else 1):
                            specs.append(RunSpec(env, policy, opt, mode, float(p0), direction, seed))
    return specs


def train_config_for(study: StudyConfig, spec: RunSpec, runs_dir: Path, wandb_mode: str) -> TrainConfig:
    """The TrainConfig of one run: rewards and stopping rule follow its direction."""
    rewarded = spec.direction == "rewarded"
    common = dict(
        policy=spec.policy, optimizer=spec.optimizer, mode=spec.mode, p0=spec.p0,
        lr=float(study.lrs[spec.env][spec.policy][spec.optimizer]),
        steps=study.max_steps if rewarded else study.extinction_steps,
        stop_at_p=0.5 if rewarded else None,
        seed=spec.seed, batch_size=study.batch_size, track_every=study.track_every,
        width=study.width, depth=study.depth, activation=study.activation,
        out=str(runs_dir), run_name=spec.run_id, group=study.name, wandb=wandb_mode, force=True,
    )
    if spec.env == "juice":
        from ntrl.juice_setup import JuiceConfig

        # the behaviour is approaching seen juice; punishing it makes drinking cost −1
        return JuiceConfig(reward=1.0 if rewarded else -1.0, decomposition=False, **common).validate()
    from ntrl.bandit_setup import BanditConfig

    return BanditConfig(target=1, reward_do=1.0 if rewarded else -1.0, reward_dont=-1.0 if rewarded else 1.0,
                        **common).validate()


def price_scaling_probe(config: TrainConfig, scales: list[float]) -> dict[str, list[float]]:
    """Relative Price error |ΔP_real − ΔP_pred| / |ΔP_real| of one step from the initial state,
    for step sizes η·s. A first-order prediction has error O(η): slope 1 in log–log."""
    import torch

    from ntrl.tangent import TangentEngine
    from ntrl.train import split_seed

    exp = config.build()
    engine = TangentEngine(exp.policy, dtype=torch.float64)
    env_seed, rng = split_seed(config.seed)
    exp.env.reset(seed=env_seed)
    u = exp.utility(TangentEngine(exp.policy), rng)
    plan = exp.optimizer.plan(u.gradient, u.fisher_states)
    P = exp.properties[0]
    theta = engine.flatten(engine.params())
    d = plan.direction.to(torch.float64)
    base = engine.evaluate(P)
    ntcov = float(engine.stats(P, directions={"d": d}).ntcov["d"][0])
    errors = []
    for s in scales:
        eta = config.lr * s
        real = float((engine.evaluate(P, engine.unflatten(theta + eta * d)) - base)[0])
        pred = eta * ntcov
        errors.append(abs(real - pred) / abs(real) if real != 0 else float("nan"))
    exp.env.close()
    return {"lr": [config.lr * s for s in scales], "rel_error": errors}


def run_one(study_dict: dict[str, Any], spec_dict: dict[str, Any], runs_dir: str, wandb_mode: str) -> dict[str, Any]:
    """Worker: one training run plus its Price-scaling probe. Returns the run's summary."""
    import torch

    from ntrl.records import SUMMARY_FILE, write_json_atomic
    from ntrl.train import train

    torch.set_num_threads(1)
    study = StudyConfig(**study_dict)
    spec = RunSpec(**spec_dict)
    config = train_config_for(study, spec, Path(runs_dir), wandb_mode)
    probe = price_scaling_probe(config, study.price_scales)
    result = train(config, progress=False)
    summary = dict(result.summary)
    summary["price_scaling"] = probe
    summary["spec"] = spec_dict
    write_json_atomic(result.run_dir / SUMMARY_FILE, summary)
    return summary


def completed_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a finished run, or None if the run is missing, failed or incomplete."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    ok = summary.get("status") in ("finished", "stopped_at_p") and "price_scaling" in summary
    return summary if ok else None


def prepare_study_dir(study: StudyConfig, out: Path, force: bool) -> Path:
    """Create or reopen a study directory; a directory of a different study is refused."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / STUDY_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ConfigError("--out", f"{path} is not valid JSON; pass --force to replace that study") from None
        if old != study.to_dict():
            if not force:
                changed = sorted(k for k in set(old) | set(study.to_dict()) if old.get(k) != study.to_dict().get(k))
                raise ConfigError("--out", f"{out} holds a study with a different config (differs in: {', '.join(changed)}); "
                                  "pass --force to replace it, or choose another --out")
            import shutil

            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    from ntrl.records import write_json_atomic

    write_json_atomic(path, study.to_dict())
    (out / "runs").mkdir(exist_ok=True)
    return out


def run_study(
    study: StudyConfig,
    out: str | os.PathLike,
    workers: int = 2,
    wandb_mode: str = "offline",
    force: bool = False,
    progress: bool = True,
    on_error: Callable[[RunSpec, BaseException], None] | None = None,
) -> list[tuple[RunSpec, dict[str, Any]]]:
    """Run (or resume) every run of the grid; return (spec, summary) for each completed run."""
    import multiprocessing as mp

    study.validate()
    out = prepare_study_dir(study, Path(out), force)
    runs_dir = out / "runs"
    specs = enumerate_runs(study)
    done: dict[RunSpec, dict[str, Any]] = {}
    todo = []
    for spec in specs:
        s = completed_summary(runs_dir / spec.run_id)
        if s is not None:
            done[spec] = s
        else:
            todo.append(spec)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(specs), initial=len(done), desc=f"{study.name} runs", unit="run", file=sys.stderr,
                   dynamic_ncols=True)
    failures = []
    if todo:
        ctx = mp.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx)
        try:
            futures = {
                pool.submit(run_one, study.to_dict(), asdict(spec), str(runs_dir), wandb_mode): spec
                for spec in todo
            }
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    spec = futures[fut]
                    try:
                        done[spec] = fut.result()
                    except Exception as e:  # a failed run is reported; the others go on
                        failures.append((spec, e))
                        if on_error is not None:
                            on_error(spec, e)
                    if bar is not None:
                        bar.update(1)
        finally:  # on Ctrl-C, drop the queued runs instead of waiting for them
            pool.shutdown(wait=True, cancel_futures=True)
    if bar is not None:
        bar.close()
    if failures:
        spec, e = failures[0]
        raise StudyIncomplete(f"{len(failures)} run(s) failed, first {spec.run_id}: {e}; "
                              "completed runs are kept, re-run the same command to retry the rest")
    return [(spec, done[spec]) for spec in specs if spec in done]

