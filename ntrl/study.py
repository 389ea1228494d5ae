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
        """Read a .toml or .json grid; unknown keys, wrong types and impossible values are errors."""
        path = Path(path)
        if path.is_dir():
            raise ConfigError("--config", f"{path} is a directory; give a .toml or .json grid file")
        if not path.exists():
            raise ConfigError("--config", f"file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError("--config", f"{path} is not valid {path.suffix[1:] or 'JSON'}: {e}") from None
        except OSError as e:
            raise ConfigError("--config", f"cannot read {path}: {e.strerror or e}") from None
        return cls.from_dict(data, f"{path}", "--config")

    @classmethod
    def from_dict(cls, data: Any, source: str, flag: str) -> "StudyConfig":
        """A grid from a table of settings (a grid file, or a study.json): every key known and of
        its type; a partial ``lrs`` table is merged into the defaults."""
        if not isinstance(data, dict):
            raise ConfigError(flag, f"{source} must hold a table of settings")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(flag, f"unknown key(s) {', '.join(unknown)} in {source}; known keys: {', '.join(sorted(known))}")
        base = cls()
        for key, value in data.items():
            check_type(key, value, getattr(base, key))
        data = dict(data)
        if "lrs" in data:  # merge a partial env → policy → optimizer table into the defaults
            merged = base.lrs
            for env, by_policy in data["lrs"].items():
                if not isinstance(by_policy, dict) or not all(isinstance(t, dict) for t in by_policy.values()):
                    raise ConfigError("config key 'lrs'", f"lrs.{env} must be a table policy → optimizer → learning rate")
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

        from ntrl.run_dirs import check_name

        check_name(self.name, "config key 'name'")
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
        if not self.cells_env_policy():
            supported = "; ".join(f"{e}: {', '.join(ENV_POLICIES[e])}" for e in self.envs)
            raise ConfigError("config key 'policies'", f"the grid has no runs: no policy in {self.policies} runs on "
                                                       f"{', '.join(self.envs)} (policies each env supports: {supported})")
        return self

    def cells_env_policy(self) -> list[tuple[str, str]]:
        """The (env, policy) pairs of the grid; policies an env cannot run are left out."""
        return [(e, p) for e in self.envs for p in self.policies if p in ENV_POLICIES[e]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_value(value: Any) -> str:
    """A TOML/JSON value as a person reads it: "the string '3'", "a table", "the number 5"."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return f"the list {value!r}"
    return f"a {type(value).__name__}"


def check_type(key: str, value: Any, default: Any) -> None:
    """A grid key's value must have its default's type (a float key also takes an integer; a
    list key a list of that element type); otherwise a ConfigError naming the key."""
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = number(value), "a number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    elif isinstance(default, dict):
        ok, want = isinstance(value, dict), "a table env → policy → optimizer → learning rate"
        if ok:
            leaves = [lr for by_p in value.values() if isinstance(by_p, dict)
                      for t in by_p.values() if isinstance(t, dict) for lr in t.values()]
            bad = [lr for lr in leaves if not number(lr)]
            if bad:
                raise ConfigError(f"config key '{key}'", f"learning rates must be numbers, got {describe_value(bad[0])}")
    elif isinstance(default, list):
        if default and isinstance(default[0], str):
            ok, want = isinstance(value, list) and all(isinstance(x, str) for x in value), "a list of strings"
        else:
            ok, want = isinstance(value, list) and all(number(x) for x in value), "a list of numbers"
    else:
        return
    if not ok:
        raise ConfigError(f"config key '{key}'", f"must be {want}, got {describe_value(value)}")


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


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a study: completed runs are kept and a re-run resumes."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def run_one(study_dict: dict[str, Any], spec_dict: dict[str, Any], runs_dir: str, wandb_mode: str,
            parent_pid: int | None = None) -> dict[str, Any]:
    """Worker: one training run plus its Price-scaling probe. Returns the run's summary.

    The run counts as complete only once its final summary (with the probe) is written; a
    worker whose parent has died writes nothing more."""
    import torch

    from ntrl.records import SUMMARY_FILE, write_json_atomic
    from ntrl.study_lock import parent_alive
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
    if parent_pid is not None and not parent_alive(parent_pid):
        os._exit(1)
    write_json_atomic(result.run_dir / SUMMARY_FILE, summary)
    return summary


def completed_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a finished run, or None if the run is missing, failed or incomplete."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return None
    ok = isinstance(summary, dict) and summary.get("status") in ("finished", "stopped_at_p") and "price_scaling" in summary
    return summary if ok else None


def read_study_file(study_dir: Path, flag: str = "--out") -> StudyConfig:
    """The StudyConfig in ``study_dir/study.json``; a missing, malformed or foreign file is a
    ConfigError that says which."""
    path = study_dir / STUDY_FILE
    if not study_dir.is_dir():
        raise ConfigError(flag, f"{study_dir} is not a directory, so it holds no study")
    if not path.is_file():
        raise ConfigError(flag, f"{study_dir} holds no study (no {STUDY_FILE}); give the directory a study wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(flag, f"{path} is not valid JSON ({e}); it was not written by ntrl, or was damaged") from None
    if not isinstance(data, dict) or set(data) != {f.name for f in dataclasses.fields(StudyConfig)}:
        raise ConfigError(flag, f"{path} is not an ntrl study file (its keys are not a study's)")
    try:
        return StudyConfig.from_dict(data, str(path), flag)
    except ConfigError as e:
        raise ConfigError(flag, f"{path} is not a valid ntrl study file: {e}") from None


def is_study_dir(study_dir: Path) -> bool:
    """Whether ``study_dir`` was made by a study: it has the study marker, or (studies made
    before the marker existed) a study.json that reads as a study."""
    from ntrl.run_dirs import STUDY_KIND, marker_kind

    if marker_kind(study_dir) == STUDY_KIND:
        return True
    try:
        read_study_file(study_dir)
        return True
    except ConfigError:
        return False


def remove_study_outputs(out: Path) -> None:
    """What ``--force`` removes: the study file, the run directories ntrl made under runs/ (and
    runs/ itself once empty), the report files the study recorded in its marker, and its W&B
    directory. Nothing else in ``out`` is touched."""
    import shutil

    from ntrl.run_dirs import MARKER, RUN_KIND, WANDB_KIND, marker_kind, marker_files

    runs = out / "runs"
    if runs.is_dir() and not runs.is_symlink():
        for child in runs.iterdir():
            if child.is_dir() and not child.is_symlink() and marker_kind(child) == RUN_KIND:
                shutil.rmtree(child)
        if not any(runs.iterdir()):
            runs.rmdir()
    for name in marker_files(out):
        target = out / name
        if target.is_file() and not target.is_symlink():
            target.unlink()
    wandb_dir = out / "wandb"
    if wandb_dir.is_dir() and not wandb_dir.is_symlink() and marker_kind(wandb_dir) == WANDB_KIND:
        shutil.rmtree(wandb_dir)
    for name in (STUDY_FILE, MARKER):
        if (out / name).is_file():
            (out / name).unlink()


def refuse_foreign_dir(out: Path) -> None:
    """A ConfigError unless ``out`` is absent, empty (but for ntrl's own lock and marker) or a study."""
    from ntrl.run_dirs import MARKER
    from ntrl.study_lock import LOCK_FILE

    if not out.is_dir():
        return
    if any(c.name not in (MARKER, LOCK_FILE) for c in out.iterdir()) and not is_study_dir(out):
        raise ConfigError("--out", f"{out} is not empty and holds no ntrl study, so ntrl will not write into it "
                                   f"(not even with --force); choose a new or empty directory")


def prepare_study_dir(study: StudyConfig, out: Path, force: bool) -> Path:
    """Create or reopen a study directory, under its lock (taken by the caller).

    An empty or new directory becomes a study; a study of the same config is resumed; a study of
    a different config is replaced only with ``force`` (and only what it wrote is removed); a
    non-empty directory that is not a study is refused, with or without ``force``."""
    from ntrl.records import write_json_atomic
    from ntrl.run_dirs import MARKER, STUDY_KIND, inside, write_marker

    path = out / STUDY_FILE
    refuse_foreign_dir(out)
    if path.exists():
        old = json.loads(path.read_text())
        if old != study.to_dict():
            if not force:
                changed = sorted(k for k in set(old) | set(study.to_dict()) if old.get(k) != study.to_dict().get(k))
                raise ConfigError("--out", f"{out} holds a study with a different config (differs in: {', '.join(changed)}); "
                                  "pass --force to replace it, or choose another --out")
            remove_study_outputs(out)
    inside(path, out)
    if not (out / MARKER).exists():
        write_marker(out, STUDY_KIND)
    write_json_atomic(path, study.to_dict())
    (out / "runs").mkdir(exist_ok=True)
    inside(out / "runs", out)
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
    """Run (or resume) every run of the grid; return (spec, summary) for each completed run.

    Holds the study directory's lock throughout. Workers end with this process (however it
    ends); on Ctrl-C or SIGTERM the running runs are stopped and :class:`StudyInterrupted` says
    how many are complete."""
    from ntrl.run_dirs import check_out_dir, made_dirs
    from ntrl.study_lock import study_lock

    study.validate()
    out = Path(out)
    check_out_dir(out)
    refuse_foreign_dir(out)  # before the lock file is made in it
    with made_dirs(out.absolute()):
        with study_lock(out):
            prepare_study_dir(study, out, force)
    with study_lock(out):
        return _run_grid(study, out, workers, wandb_mode, progress, on_error)


def _run_grid(study, out, workers, wandb_mode, progress, on_error):
    import multiprocessing as mp

    from ntrl.study_lock import worker_init

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
        pool = ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx, initializer=worker_init,
                                   initargs=(os.getpid(),))
        interrupted = False
        try:
            futures = {
                pool.submit(run_one, study.to_dict(), asdict(spec), str(runs_dir), wandb_mode, os.getpid()): spec
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
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if interrupted or sys.exc_info()[0] is not None:  # stop the running runs, drop the queued ones
                for proc in list(getattr(pool, "_processes", {}).values()):
                    proc.kill()
                pool.shutdown(wait=False, cancel_futures=True)
            else:
                pool.shutdown(wait=True)
            if bar is not None and (interrupted or sys.exc_info()[0] is not None):
                bar.close()
        if interrupted:
            k = sum(completed_summary(runs_dir / spec.run_id) is not None for spec in specs)  # on disk, as a resume sees it
            raise StudyInterrupted(f"{k} of {len(specs)} runs complete; re-run the same command to resume")
    if bar is not None:
        bar.close()
    if failures:
        spec, e = failures[0]
        raise StudyIncomplete(f"{len(failures)} run(s) failed, first {spec.run_id}: {e}; "
                              "completed runs are kept, re-run the same command to retry the rest")
    return [(spec, done[spec]) for spec in specs if spec in done]
