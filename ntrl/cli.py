"""The ``ntrl`` command line.

    ntrl train bandit --optimizer sgd --p0 0.01 --lr 0.1 --steps 300

Bad input gets one line on stderr naming the flag and what is allowed, and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Sequence

import importlib

from ntrl.config import ConfigError, TrainConfig, flag_of

# ``ntrl train <name>``: the config class of each environment, imported when used.
EXPERIMENTS = {
    "bandit": ("ntrl.bandit_setup:BanditConfig", "REINFORCE on ntrl/TwoArmedBandit-v0"),
    "juice": ("ntrl.juice_setup:JuiceConfig", "REINFORCE on ntrl/JuiceGridworld-v0"),
}


def experiment_config(name: str) -> type[TrainConfig]:
    module, cls = EXPERIMENTS[name][0].split(":")
    return getattr(importlib.import_module(module), cls)

HELP = {
    "policy": "policy kind: single_logit (p = σ(b)), tabular (softmax over K logits) or mlp",
    "optimizer": "sgd, adam, npg (natural policy gradient) or sign (sign descent)",
    "mode": "exact (analytic ∇J) or sampled (REINFORCE on a batch of episodes)",
    "p0": "initial probability of the target action, in (0, 1)",
    "target": "the tracked action: 1 = do, 0 = dont",
    "lr": "learning rate η > 0",
    "steps": "number of updates",
    "seed": "seed for initialisation, sampling and reward noise",
    "batch_size": "episodes per update in sampled mode",
    "baseline": "sampled-mode baseline: loo (leave-one-out mean) or none",
    "track_every": "track every k-th update",
    "stop_at_p": "stop once P reaches this value",
    "reward_do": "reward for do",
    "reward_dont": "reward for dont",
    "noise_std": "standard deviation of Gaussian reward noise",
    "width": "MLP hidden width",
    "depth": "MLP hidden layers",
    "activation": "MLP activation",
    "dtype": "policy dtype (tracking always runs in float64)",
    "npg_damping": "λ in (F + λI)⁻¹ for npg (0: pseudo-inverse)",
    "fisher": "also record NTVar in the Fisher metric",
    "threads": "torch threads (1 is fastest for these small networks)",
    "size": "grid side N (>= 2)",
    "view_radius": "Manhattan view radius (>= 1)",
    "horizon": "episode length H",
    "reward": "reward for drinking visible juice",
    "hide_prob": "probability that the juice is hidden on a step",
    "f0": "solve hide_prob so that the initial F equals f0 (0: off)",
    "decomposition": "track the F·P decomposition",
    "out": "directory that holds run directories",
    "run_name": "name of the run directory (default: from the config)",
    "group": "W&B group",
    "wandb": "offline (default), online or disabled",
    "force": "replace an existing run directory",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        """``ntrl: error: --flag: what is wrong`` (argparse says ``argument --flag: ...``)."""
        match = re.match(r"argument ([^:]+): (.*)", message, re.DOTALL)
        if match:
            flag = match.group(1).split("/")[-1]
            message = f"{flag}: {match.group(2)}"
        where = self.prog.split()[1:]
        if where and not match:
            message = f"{' '.join(where)}: {message}"
        self.exit(2, f"ntrl: error: {' '.join(message.split())}\n")


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "") else float(text)


def add_config_flags(parser: argparse.ArgumentParser, cls: type[TrainConfig], skip: Sequence[str] = ("env",)) -> None:
    """One flag per config field, typed from the dataclass defaults."""
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in ("wandb", "force"):
            continue
        default = getattr(defaults, f.name)
        kind = {bool: parse_bool, int: int, float: float, str: str}.get(type(default), str)
        if f.name == "stop_at_p":
            kind = optional_float
        parser.add_argument(flag_of(f.name), dest=f.name, type=kind, default=default,
                            metavar=f.name.upper(), help=f"{HELP.get(f.name, f.name)} (default: {default})")
    parser.add_argument("--wandb", dest="wandb", default=None, choices=("offline", "online", "disabled"),
                        help="W&B mode (default: WANDB_MODE from the environment, else offline)")
    parser.add_argument("--no-wandb", dest="wandb", action="store_const", const="disabled",
                        help="turn W&B logging off")
    parser.add_argument("--force", action="store_true", help=HELP["force"])
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="say on stderr which tangent backend answers each property, and why")


def enable_verbose() -> None:
    """Show ntrl's INFO log lines (for example which tangent backend each property uses) on
    stderr, written through tqdm so that they do not break the progress bar. Idempotent."""
    import logging

    class TqdmHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)

    logger = logging.getLogger("ntrl")
    if not any(getattr(h, "ntrl_verbose", False) for h in logger.handlers):
        handler = TqdmHandler()
        handler.ntrl_verbose = True
        handler.setFormatter(logging.Formatter("ntrl: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ntrl", description="Price's equation for neural networks, measured in RL training.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    train = sub.add_parser("train", help="train an agent with Price tracking")
    envs = train.add_subparsers(dest="env", required=False, parser_class=OneLineParser)
    from ntrl.gym_setup import add_env_flags  # ``ntrl train --env ID``: any Gymnasium env

    add_env_flags(train)
    for name, (_, help_text) in EXPERIMENTS.items():
        add_config_flags(envs.add_parser(name, help=help_text), experiment_config(name))
    from ntrl.rarity import add_rarity_parser  # ``ntrl rarity``: the rarity study

    add_rarity_parser(sub)
    return parser


def config_from_args(args: argparse.Namespace, cls: type[TrainConfig]) -> TrainConfig:
    from ntrl.wandb_sink import mode_from_environment

    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["wandb"] = mode_from_environment(values.get("wandb"))
    return cls(**values)


# A flag value such as ``-1e3`` is a number, not an option; argparse only knows ``-1`` and ``-1.5``.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


def join_negative_numbers(argv: Sequence[str]) -> list[str]:
    """``--flag -1e3`` → ``--flag=-1e3`` for long flags followed by a negative number."""
    out: list[str] = []
    for token in argv:
        prev = out[-1] if out else ""
        if (NEGATIVE_NUMBER.match(token) and prev.startswith("--") and "=" not in prev and prev != "--"):
            out[-1] = f"{prev}={token}"
        else:
            out.append(token)
    return out


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (records kept, one line), with exit status 143."""


_TERMINATED = []


def _raise_terminated(signum, frame) -> None:
    _TERMINATED.append(signum)
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    parser = build_parser()
    try:
        args = parser.parse_args(join_negative_numbers(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help (0) or a one-line usage error (2)
        return int(e.code or 0)
    if args.command == "rarity":
        from ntrl.rarity import run_from_args as run_rarity

        return run_rarity(args)
    if args.command == "train" and (args.env is None) == (getattr(args, "gym_env", None) is None):
        print("ntrl: error: give a built-in experiment (" + ", ".join(EXPERIMENTS) + ") or --env ID, "
              "not both and not neither", file=sys.stderr)
        return 2
    if args.command == "train" and args.env is None:
        from ntrl.gym_setup import run_from_args

        return run_from_args(args)
    if args.command == "train":
        from ntrl.train import describe, train

        if args.verbose or getattr(args, "gym_verbose", False):
            enable_verbose()

        def run() -> str:
            config = config_from_args(args, experiment_config(args.env)).validate()
            return describe(train(config, progress=not args.quiet), config)

        return report_errors(run)
    return 0


def report_errors(run) -> int:
    """Run ``run()`` and print what it returns (exit 0); bad input is one line and exit 2, a
    training run that had to stop is one line and exit 1."""
    from ntrl.train import TrainingError

    try:
        text = run()
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the run said what it kept
        print(f"ntrl: {getattr(e, 'message', None) or 'interrupted'}", file=sys.stderr)
        return 143 if _TERMINATED else 130
    except ConfigError as e:
        print(f"ntrl: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"ntrl: training stopped: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
