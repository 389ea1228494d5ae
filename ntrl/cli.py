"""The ``ntrl`` command line: a thin layer that turns config dataclasses into flags with tyro.

    ntrl train bandit --optimizer sgd --p0 0.01 --lr 0.1 --steps 300
    ntrl train juice --p0 0.01 --f0 0.01
    ntrl train --env CartPole-v1 --steps 50 --property action:1
    ntrl rarity --quick

Each flag comes from its config field (:class:`ntrl.config.TrainConfig` and the experiment
configs): the field's type gives the flag's type and, for a ``Literal``, its allowed values; its
default is the flag's default; its ``option(help=...)`` is the flag's help. tyro builds the
parser (``--flag/--no-flag`` booleans, choices, repeatable list flags), as CleanRL uses it.

The error contract is ntrl's own: bad input gets one line ``ntrl: error: --flag: what is wrong``
on stderr and exit status 2. tyro's boxed error messages are folded into that line, and a flag
that the chosen command does not use is an error, never dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal, Sequence

from ntrl.termination import Terminated  # SIGTERM or SIGHUP, handled like Ctrl-C (one line, exit 128 + N)
from ntrl.termination import forget_raised, note_raised, noting_raised, raise_if_swallowed
from ntrl.termination import send_again as _send_again  # the standard library's modules alone

# ``ntrl train <name>``: the config class of each experiment, imported when used.
EXPERIMENTS = {
    "bandit": ("ntrl.experiments.bandit:BanditConfig", "REINFORCE on ntrl/TwoArmedBandit-v0"),
    "kbandit": ("ntrl.experiments.kbandit:KBanditConfig", "REINFORCE on ntrl/KArmedBandit-v0 (the gravity well)"),
    "juice": ("ntrl.experiments.juice:JuiceConfig", "REINFORCE on ntrl/JuiceGridworld-v0"),
}
GYM_CONFIG = "ntrl.experiments.gym_env:GymConfig"
HELP_FLAGS = ("-h", "--help")

TOP_HELP = """usage: ntrl {train,rarity} ...

Price's equation for neural networks, measured in RL training.

commands:
  train bandit [FLAGS]     REINFORCE on ntrl/TwoArmedBandit-v0, with Price tracking
  train juice [FLAGS]      REINFORCE on ntrl/JuiceGridworld-v0, with Price tracking
  train --env ID [FLAGS]   any Gymnasium env with Discrete actions (REINFORCE, or SB3 PPO/A2C)
  rarity [FLAGS]           the rarity study: p² or p(1 − p)? with confidence intervals

Each command's --help lists its flags, their allowed values and its own defaults.
"""

TRAIN_HELP = """usage: ntrl train {bandit,juice} [FLAGS]
       ntrl train --env ID [FLAGS]

  bandit         REINFORCE on ntrl/TwoArmedBandit-v0      (ntrl train bandit --help)
  juice          REINFORCE on ntrl/JuiceGridworld-v0      (ntrl train juice --help)
  --env ID       any Gymnasium id, or MODULE:ID           (ntrl train --env ID --help)

Flags go after the experiment: ntrl train bandit --p0 0.01. The three differ in some defaults
(for example --width, --batch-size, --mode, --fisher and --target); each --help gives its own.
"""


class UsageError(Exception):
    """A command line that cannot be read; ``flag`` names the culprit."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}" if flag else message)


def load_class(path: str) -> type:
    import importlib

    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)


def experiment_config(name: str) -> type:
    return load_class(EXPERIMENTS[name][0])


# ---------------------------------------------------------------------- the rarity command's flags
@dataclass
class RarityArgs:
    """``ntrl rarity``: run (or resume) the rarity study, analyse it, write the report."""

    quick: bool = field(default=False, metadata={"help": "the small grid (159 runs): bandit, exact gradients, "
                                                         "five p₀ over four decades, and the gravity well (the "
                                                         "default)"})
    full: bool = field(default=False, metadata={"help": "the complete grid (1165 runs): bandit and juice, exact "
                                                        "and sampled, and the gravity well"})
    config: str | None = field(default=None, metadata={"help": "a grid of your own (.toml or .json; keys: "
                                                               "examples/rarity_grid.toml)"})
    out: str = field(default="runs", metadata={"help": "parent directory of the study directory: the study "
                                                       "writes OUT/<study name>"})
    study_dir: str | None = field(default=None, metadata={"help": "with --analyse-only: analyse this study "
                                                                   "directory, wherever it is"})
    seed: int | None = field(default=None, metadata={"help": "the grid's base seed: runs use seeds SEED … "
                                                             "SEED + seeds − 1 (None: the grid's own, 0)"})
    workers: int = field(default=min(2, os.cpu_count() or 1), metadata={"help": "parallel runs"})
    force: bool = field(default=False, metadata={"help": "replace a study of a different config in the study "
                                                         "directory (only what the study wrote is removed)"})
    wandb: Literal["offline", "online", "disabled"] | None = field(
        default=None, metadata={"help": "W&B mode (None: WANDB_MODE from the environment, else offline)"})
    wandb_project: str | None = field(default=None, metadata={"help": "W&B project of the study's runs and summary "
                                                                       "run (without it: WANDB_PROJECT, else ntrl)"})
    wandb_entity: str | None = field(default=None, metadata={"help": "W&B entity, a user or team (without it: "
                                                                      "WANDB_ENTITY)"})
    tags: list[str] = field(default_factory=list, metadata={"help": "W&B tags of every run of the study (repeat the "
                                                                    "flag; without it: WANDB_TAGS, comma-separated)"})
    analyse_only: bool = field(default=False, metadata={"help": "only analyse and report the runs already there"})
    population: bool = field(default=True, metadata={"help": "train the cells populations support (bandit, "
                                                            "K-armed bandit and juice, exact and sampled) as "
                                                            "batched population chunks; --no-population runs "
                                                            "every run on its own"})
    device: Literal["cpu", "cuda", "auto"] = field(default="cpu", metadata={"help": "where populations train "
                                                                                 "(auto: cuda when present)"})
    executor: Literal["local", "ray"] = field(default="local", metadata={
        "help": "where the runs train: local, a process pool of --workers; ray, Ray tasks (the ray extra: pip "
                "install 'ntrl[ray]'), on a local Ray instance of --workers CPUs or the cluster of --ray-address"})
    ray_address: str | None = field(default=None, metadata={
        "help": "with --executor ray: the cluster, auto (RAY_ADDRESS, else the one `ray start` started or joined "
                "on this machine) or HOST:PORT (None: start a local Ray instance that ends with the study)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})
    verbose: bool = field(default=False, metadata={"help": "say on stderr which tangent backend answers each "
                                                           "property, and why"})


# Flags that every ``train`` command has besides its config's fields.
RUN_FLAGS: list[tuple[str, type, Any, str]] = [
    ("device", Literal["cpu", "cuda", "auto"], "cpu", "where to train: cpu, or cuda (auto: cuda when present), "
                                                      "where the run trains as a population of one (ntrl.population: "
                                                      "bandit and juice)"),
    ("quiet", bool, False, "no progress bar"),
    ("verbose", bool, False, "say on stderr which tangent backend answers each property, and why"),
]


# ---------------------------------------------------------------------- dataclass → tyro
def flag_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag", True)]


def flag_dataclass(cls: type, extra: Sequence[tuple[str, type, Any, str]] = ()) -> type:
    """A dataclass for tyro with one field per flag of ``cls`` (its type, default and help), plus
    ``extra`` CLI-only flags. ``--wandb`` defaults to None, read as "from the environment"."""
    import tyro

    hints = typing.get_type_hints(cls)
    out = []
    for f in flag_fields(cls):
        kind, help_text = hints[f.name], f.metadata.get("help", "")
        if f.name == "wandb":
            kind = typing.Optional[kind]
            default: Any = None
            help_text = "W&B mode (None: WANDB_MODE from the environment, else offline)"
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        markers: list[Any] = [tyro.conf.arg(help=help_text, aliases=("-v",) if f.name == "verbose" else None)]
        if typing.get_origin(kind) is list and not f.metadata.get("values"):
            markers.append(tyro.conf.UseAppendAction)
        spec = (field(default_factory=lambda d=default: list(d)) if isinstance(default, list)
                else field(default=default))
        out.append((f.name, Annotated[(kind, *markers)], spec))
    for name, kind, default, help_text in extra:
        alias = ("-v",) if name == "verbose" else None
        out.append((name, Annotated[kind, tyro.conf.arg(help=help_text, aliases=alias)], field(default=default)))
    made = dataclasses.make_dataclass(cls.__name__ + "Flags", out)
    made.__doc__ = (cls.__doc__ or "").strip().split("\n\n")[0].replace("``", "")
    return made


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
BOX = "╭╮╰╯│─┃━┏┓┗┛"


def one_line(boxed: str, prog: str) -> str:
    """tyro's boxed error message as ``--flag: what is wrong`` (one line)."""
    text = ANSI.sub("", boxed)
    title, sections = "", [[]]
    for ln in (ln.strip().strip("│┃").strip() for ln in text.splitlines()):
        if ln.startswith(("╭", "┏")):
            title = ln.strip(BOX + " ")
        elif ln and set(ln) <= set(BOX + " -"):  # a rule (UTF-8 or, without a UTF-8 stdout, ASCII)
            if not title and len(sections) == 1 and len(sections[0]) == 1:
                title = sections[0].pop()  # the ASCII box: its title stands above the first rule
            else:
                sections.append([])  # the next section: suggestions, help
        elif ln and not ln.startswith(("╰", "┗")):
            sections[-1].append(ln)
    message = " ".join(" ".join(sections[0]).split())
    hint = ""
    for sec in sections[1:]:
        if sec and sec[0].startswith("Perhaps you meant"):
            near = re.findall(r"(--[\w-]+)", " ".join(sec[1:]))
            hint = f"; did you mean {near[0]}?" if near else ""
    m = re.match(r"Error parsing (--[\w-]+): (.*)", message)
    if m:
        return f"{m.group(1)}: {m.group(2)}"
    m = re.match(r"invalid choice (.*) for argument '(--[\w-]+)'\. Expected one of \((.*)\)\.?", message)
    if m:
        choices = ", ".join(c.strip().strip("'\"") for c in m.group(3).split(",") if c.strip())
        return f"{m.group(2)}: invalid choice {m.group(1)}; choose one of {choices}"
    m = re.match(r"Unrecognized(?: or misplaced)? options?: (.*)", message)
    if m:
        first = re.split(r",\s*|\s+\(applied to[^)]*\)\s*", m.group(1).strip())[0].split("=", 1)[0]
        if first.startswith("-"):
            return f"{first}: `{prog}` has no such flag{hint} (see `{prog} --help`)"
        return f"{first}: unexpected argument to `{prog}`; values follow their flag (see `{prog} --help`)"
    m = re.match(r"Missing value for argument '(--[\w-]+)'", message)
    if m:
        return f"{m.group(1)}: needs a value"
    m = re.search(r"'?(--[\w-]+)'?", message)
    if m:
        return f"{m.group(1)}: {message}"
    return f"{title.lower() or 'error'}: {message}" if message else title


def parse_flags(cls: type, args: list[str], prog: str, extra=()) -> Any:
    """``args`` parsed into an instance of ``flag_dataclass(cls)``; ``--help`` prints and exits 0;
    an error raises UsageError with one line."""
    import tyro

    flags_cls = flag_dataclass(cls, extra)
    if any(a in HELP_FLAGS for a in args):
        tyro.cli(flags_cls, args=["--help"], prog=prog)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(flags_cls, args=args, prog=prog)
    except SystemExit as e:
        if e.code in (0, None):
            raise
        raise UsageError("", one_line(captured.getvalue(), prog)) from None


def given_flags(args: Sequence[str]) -> list[str]:
    """The config field names of the flags on a command line (``--no-fisher`` → ``fisher``)."""
    names = []
    for a in args:
        if a.startswith("--") and len(a) > 2:
            name = a[2:].split("=", 1)[0].replace("-", "_")
            names.append(name[3:] if name.startswith("no_") else name)
    return names


# ---------------------------------------------------------------------- command lines
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def join_negative_numbers(argv: Sequence[str]) -> list[str]:
    """``--flag -1e3`` → ``--flag=-1e3`` for long flags followed by a negative number."""
    out: list[str] = []
    for token in argv:
        prev = out[-1] if out else ""
        if NEGATIVE_NUMBER.match(token) and prev.startswith("--") and "=" not in prev and prev != "--":
            out[-1] = f"{prev}={token}"
        else:
            out.append(token)
    return out


def normalise(argv: Sequence[str]) -> list[str]:
    """``--no-wandb`` is ``--wandb disabled``; ``--flag -1e3`` keeps its number."""
    out = []
    for a in join_negative_numbers(argv):
        out.extend(["--wandb", "disabled"] if a == "--no-wandb" else [a])
    return out


def env_flag_given(args: Sequence[str]) -> bool:
    return any(a == "--env" or a.startswith("--env=") for a in args)


def dispatch(argv: list[str]) -> tuple[str, type, list[str], str]:
    """(command, config class, its flags, prog) of a command line; UsageError if there is none."""
    if not argv:
        raise UsageError("", "give a command: train or rarity (see ntrl --help)")
    command, rest = argv[0], argv[1:]
    if command == "rarity":
        return "rarity", RarityArgs, rest, "ntrl rarity"
    if command != "train":
        raise UsageError("", f"unknown command {command!r}; choose train or rarity (see ntrl --help)")
    names = [a for a in rest if a in EXPERIMENTS]
    if rest and rest[0] in EXPERIMENTS:
        if env_flag_given(rest):
            raise UsageError("--env", f"give a built-in experiment ({rest[0]}) or --env ID, not both")
        return "train", experiment_config(rest[0]), rest[1:], f"ntrl train {rest[0]}"
    if env_flag_given(rest):
        if names:
            raise UsageError("--env", f"give a built-in experiment ({names[0]}) or --env ID, not both")
        return "train", load_class(GYM_CONFIG), rest, "ntrl train --env ID"
    if names:
        first = next(a for a in rest if a.startswith("-"))
        raise UsageError(first.split("=", 1)[0], f"flags go after the experiment (ntrl train {names[0]} "
                                                 f"{first} ...); a flag before it would not be read")
    if rest and not rest[0].startswith("-"):
        raise UsageError("", f"unknown experiment {rest[0]!r}; choose {', '.join(EXPERIMENTS)} or --env ID")
    raise UsageError("", f"give a built-in experiment ({', '.join(EXPERIMENTS)}) or --env ID (see ntrl train --help)")


def to_config(cls: type, flags: Any) -> Any:
    """The config of a parsed command line: its flag values, and W&B's mode from the environment
    when ``--wandb`` was not given."""
    from ntrl.wandb_sink import mode_from_environment

    values = {f.name: getattr(flags, f.name) for f in flag_fields(cls)}
    values["wandb"] = mode_from_environment(values.get("wandb"))
    return cls(**values)


def reject_unused_for_algo(config: Any, args: Sequence[str]) -> None:
    """With ``--algo ppo|a2c``, the flags of ntrl's REINFORCE loop are errors, never ignored."""
    from ntrl.experiments.gym_env import REINFORCE_ONLY

    if getattr(config, "algo", "reinforce") == "reinforce":
        return
    unused = [n for n in given_flags(args) if n in REINFORCE_ONLY]
    if unused:
        used = ["--lr", "--steps", "--seed", "--n-steps", "--n-envs", "--gamma", "--width", "--depth",
                "--activation", "--track-every", "--target", "--property", "--probe-states", "--n-probe"]
        raise UsageError("--" + unused[0].replace("_", "-"),
                         f"applies to --algo reinforce only; --algo {config.algo} uses {', '.join(used)}")


# ---------------------------------------------------------------------- running
class Interrupted(KeyboardInterrupt):
    """Ctrl-C with the line to print."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


_TERMINATED: list[int] = []


def _quiet_from_now() -> None:
    """Once ntrl is asked to stop, no more warnings: an interrupt that lands inside a module's
    import makes some print one as they unwind (Cython's "failed to patch module with custom
    type", seen on SIGTERM while Ray imports), and the user is owed one line, ntrl's own."""
    import warnings

    warnings.simplefilter("ignore")


def _raise_terminated(signum, frame) -> None:
    _TERMINATED.append(signum)
    _quiet_from_now()
    if _IN_UNRAISABLE_HOOK:  # raised here it would be lost too: sent again in a moment
        _send_again(signum)
        return
    note_raised(signum)
    raise Terminated()


def _raise_interrupt(signum, frame) -> None:
    """Ctrl-C as Python's own handler raises it, after :func:`_quiet_from_now`."""
    _quiet_from_now()
    if _IN_UNRAISABLE_HOOK:
        _send_again(signum)
        return
    note_raised(signum)
    raise KeyboardInterrupt


_IN_UNRAISABLE_HOOK = False  # the handlers above send a signal that lands inside the hook again


def _redeliver_lost_interrupt(unraisable) -> None:
    """``sys.unraisablehook``: an interrupt (Ctrl-C, or SIGTERM/SIGHUP as :class:`Terminated`) that
    arrived while Python ran code whose exceptions it can only print (a weakref callback inside an
    import, a ``__del__``) would be lost, and the command run on; the same signal is sent again,
    to be raised where the command can stop: a moment later, from another thread, as a signal
    raised now, inside this hook, would be lost the same way. On a busy machine that moment can
    come while this hook still runs (a CI run lost a SIGTERM so): the handlers then send it once
    more rather than raise it here. A ``SystemExit(SIGTERM)`` is SIGTERM turned into an exit by a
    library's handler (``ray.init`` installs one that calls ``sys.exit(signum)``, where
    :func:`ntrl.study.ray_executor.require_ray` cannot keep it out: a Ray whose modules moved; a
    CI run lost a SIGTERM to it inside logging's lock release): it is sent again too, for ntrl's
    handler, once restored, to raise. (Not SIGHUP's 1, which is also the plain ``sys.exit(1)`` of a failure.)
    Anything else goes to the previous hook."""
    import signal

    global _IN_UNRAISABLE_HOOK
    _IN_UNRAISABLE_HOOK = True
    try:
        exc = unraisable.exc_value
        if isinstance(exc, KeyboardInterrupt):
            forget_raised()  # lost here, and sent again: raised once more when it arrives
            terminated = isinstance(exc, Terminated) and _TERMINATED
            _send_again(_TERMINATED[-1] if terminated else signal.SIGINT)
        elif isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
            _send_again(signal.SIGTERM)
        else:
            _previous_unraisablehook(unraisable)
    finally:
        _IN_UNRAISABLE_HOOK = False  # the last statement: no call after it where a handler could run


_previous_unraisablehook = sys.unraisablehook


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP like Ctrl-C (records kept, one line), and no interrupt lost where Python
    could only print it (:func:`_redeliver_lost_interrupt`). From the main thread only."""
    import signal

    global _previous_unraisablehook
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_terminated)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where Ctrl-C is ignored
        signal.signal(signal.SIGINT, _raise_interrupt)
    if sys.unraisablehook is not _redeliver_lost_interrupt:
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _redeliver_lost_interrupt


def report_errors(run: Callable[[], str]) -> int:
    """Run ``run()`` and print what it returns (exit 0); bad input is one line and exit 2, a
    training run that had to stop is one line and exit 1, Ctrl-C is one line and exit 130."""
    try:
        text = run()
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the run said what it kept
        forget_raised()
        print(f"ntrl: {getattr(e, 'message', None) or 'interrupted'}", file=sys.stderr)
        return 128 + _TERMINATED[-1] if _TERMINATED else 130
    except Exception as e:
        from ntrl.config import ConfigError  # imported here: a Ctrl-C during start-up meets no import
        from ntrl.train import TrainingError

        if isinstance(e, (UsageError, ConfigError)):
            print(f"ntrl: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, TrainingError):
            print(f"ntrl: training stopped: {e}", file=sys.stderr)
            return 1
        if isinstance(e, OSError):  # the disk, the filesystem or permissions: one line, not a traceback
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            print(f"ntrl: stopped: {e.strerror or e}{where}; the records written so far are kept", file=sys.stderr)
            return 1
        raise
    print(text)
    return 0


def run_train(cls: type, flags: Any, args: list[str]) -> str:
    config = to_config(cls, flags).validate()
    if {"track_every", "track_per_decade"} <= set(given_flags(args)):  # one schedule; never one ignored
        raise UsageError("--track-per-decade", "tracks log-spaced, --track-every every k-th update; give one of them")
    if flags.verbose:
        from ntrl.verbose import enable_verbose

        enable_verbose()
    progress = not flags.quiet
    if hasattr(config, "algo"):  # any Gymnasium env
        reject_unused_for_algo(config, args)
        if config.algo != "reinforce" and flags.device != "cpu":
            raise UsageError("--device", f"applies to ntrl's REINFORCE loop; --algo {config.algo} trains on SB3's "
                                         f"own device")
        if config.algo != "reinforce":
            from ntrl.experiments.sb3_train import describe_sb3, train_sb3

            raise_if_swallowed()
            return describe_sb3(train_sb3(config, progress=progress), config)
        config.prebuild()
    from ntrl.train import describe, train

    if flags.device != "cpu":
        from ntrl.population.trainer import resolve_device, unsupported_reason

        if resolve_device(flags.device).type != "cpu":  # --device cuda without a GPU: one line, from here
            reason = unsupported_reason(config)
            if reason:
                raise UsageError("--device", f"a {flags.device} run trains as a population of one, and {reason}")
            from ntrl.population import train_population

            raise_if_swallowed()
            result = train_population([config], device=flags.device, progress=progress, wandb_parent=config.out)
            return describe(result.results[0], config)
    raise_if_swallowed()  # an interrupt swallowed in an import above: nothing is written yet
    return describe(train(config, progress=progress), config)


def run_rarity(flags: RarityArgs) -> str:
    from pathlib import Path

    from ntrl.study.grid import StudyConfig
    from ntrl.study.rarity import rarity
    from ntrl.wandb_sink import mode_from_environment

    presets = [name for name in ("quick", "full", "config") if getattr(flags, name)]
    if len(presets) > 1:
        raise UsageError(f"--{presets[1]}", f"give one of --quick, --full or --config, not {' and '.join('--' + p for p in presets)}")
    if flags.workers < 1:
        raise UsageError("--workers", f"must be >= 1, got {flags.workers}")
    if flags.ray_address is not None and flags.executor != "ray":
        raise UsageError("--ray-address", "is for --executor ray; add --executor ray to run the study on that cluster")
    if flags.executor == "ray":
        if flags.analyse_only:
            raise UsageError("--executor", "ray trains runs, and --analyse-only trains none; drop --executor")
        from ntrl.study.ray_executor import check_ray_address, require_ray

        require_ray()  # one line before anything is written
        if flags.ray_address is not None:
            check_ray_address(flags.ray_address)
    if flags.study_dir is not None and not flags.analyse_only:
        raise UsageError("--study-dir", "is for --analyse-only; to run a study, give --out (its parent directory)")
    wandb_mode = mode_from_environment(flags.wandb)
    # the study's workers and its summary run read W&B's own variables: the flags set them
    for name, value in (("WANDB_PROJECT", flags.wandb_project), ("WANDB_ENTITY", flags.wandb_entity),
                        ("WANDB_TAGS", ",".join(flags.tags) if flags.tags else None)):
        if value:
            os.environ[name] = value
    if flags.verbose:
        from ntrl.verbose import enable_verbose

        enable_verbose()
    if flags.study_dir is not None:
        from ntrl.study.executor import read_study_file

        study_dir = Path(flags.study_dir)
        study = read_study_file(study_dir, "--study-dir")
    else:
        study = (StudyConfig.from_file(flags.config) if flags.config else
                 StudyConfig.full() if flags.full else StudyConfig.quick())
        if flags.seed is not None:
            study = dataclasses.replace(study, seed=flags.seed).validate()
        study_dir = Path(flags.out) / study.name
        if flags.analyse_only:
            from ntrl.study.executor import read_study_file

            read_study_file(study_dir, "--out")
    if flags.population and not flags.analyse_only and flags.executor == "local":
        from ntrl.population.trainer import resolve_device

        # --device cuda without a GPU: one line now, not from every worker (Ray: the cluster's GPUs count)
        resolve_device(flags.device)
    raise_if_swallowed()  # an interrupt swallowed in an import above (Ray's, say): nothing is written yet
    return rarity(study, study_dir, workers=flags.workers, wandb_mode=wandb_mode, force=flags.force,
                  progress=not flags.quiet, analyse_only=flags.analyse_only, verbose=flags.verbose,
                  population=flags.population, device=flags.device, executor=flags.executor,
                  ray_address=flags.ray_address)


def main(argv: Sequence[str] | None = None) -> int:
    import threading

    _TERMINATED.clear()  # this command's, not an earlier one's in the same process
    if threading.current_thread() is threading.main_thread():
        install_signal_handlers()
    argv = normalise(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in HELP_FLAGS:
        print(TOP_HELP, end="")
        return 0 if argv else 2
    if argv[0] == "train" and (len(argv) == 1 or argv[1] in HELP_FLAGS):
        print(TRAIN_HELP, end="")
        return 0 if len(argv) > 1 else 2

    def run() -> str:
        try:
            command, cls, args, prog = dispatch(argv)
            flags = parse_flags(cls, args, prog, extra=() if command == "rarity" else RUN_FLAGS)
            return run_rarity(flags) if command == "rarity" else run_train(cls, flags, args)
        except KeyboardInterrupt as e:
            if getattr(e, "message", None):  # the run or the study said what it kept
                raise
            # still starting up (imports, checks, building): nothing is written before that ends
            what = "study" if argv[0] == "rarity" else "run"
            raise Interrupted(f"interrupted before the {what} started; nothing was written, re-run the same "
                              f"command to start it") from None

    # noted on the main thread only, where the handlers run: a command on another thread would
    # take the main thread's interrupts for its own (and clear the notes of one running there)
    noting = noting_raised() if threading.current_thread() is threading.main_thread() else contextlib.nullcontext()
    try:
        with noting:
            return report_errors(run)
    except SystemExit as e:  # --help
        return int(e.code or 0)


if __name__ == "__main__":
    sys.exit(main())
