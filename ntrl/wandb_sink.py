"""W&B logging for the record stream: offline by default, online on request, or off.

Charts use ``update`` (the optimizer step) as their x-axis via ``define_metric``. Batched
properties are logged as their mean; the local record file keeps every entry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

WANDB_MODES = ("offline", "online", "disabled")
# W&B's own spellings of the same modes, as WANDB_MODE may hold them.
WANDB_ALIASES = {"dryrun": "offline", "run": "online"}
DEFAULT_PROJECT = "ntrl"
# How long wandb.init may wait: online it contacts the server, offline only its local service.
INIT_TIMEOUT_S = {"online": 5.0, "offline": 60.0}


def warn(message: str) -> None:
    """One line on stderr; W&B trouble never stops a run."""
    import sys

    print(f"ntrl: warning: {message}", file=sys.stderr)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def mode_from_environment(flag: str | None) -> str:
    """The W&B mode of a run: the ``--wandb`` flag when given; else ``WANDB_MODE`` from the
    environment when it names a mode (offline, online, disabled, or W&B's dryrun/run); else
    offline. A ``WANDB_MODE`` that names no mode is reported in one line and ignored."""
    if flag is not None:
        return flag
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if not env:
        return "offline"
    env = WANDB_ALIASES.get(env, env)
    if env in WANDB_MODES:
        return env
    warn(f"WANDB_MODE={os.environ['WANDB_MODE']!r} is not one of {', '.join(WANDB_MODES)}; ignoring it and "
         f"logging offline (set --wandb to choose)")
    return "offline"


def project_from_environment(project: str | None = None) -> str:
    """The W&B project: ``project`` when given, else ``WANDB_PROJECT``, else "ntrl"."""
    return project or os.environ.get("WANDB_PROJECT", "").strip() or DEFAULT_PROJECT


def entity_from_environment(entity: str | None = None) -> str | None:
    """The W&B entity (user or team): ``entity`` when given, else ``WANDB_ENTITY``, else W&B's default."""
    return entity or os.environ.get("WANDB_ENTITY", "").strip() or None


def tags_from_environment(tags: list[str] | None = None) -> list[str]:
    """The W&B tags: ``tags`` when given (non-empty), else ``WANDB_TAGS`` (comma-separated), else none."""
    if tags:
        return list(tags)
    return [t.strip() for t in os.environ.get("WANDB_TAGS", "").split(",") if t.strip()]


def unique_run_id(name: str | None) -> str:
    """A W&B run id that is unique (a random suffix) and readable (the run's name, as W&B allows
    ids: letters, digits, - and _, at most 64 characters): ``w`` gives ``w-1a2b3c4d``."""
    import re
    import secrets

    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", name or "run").strip("_-") or "run"
    if len(stem) > 50:  # the start (what it is) and the end (seed and settings hash) of a long name
        stem = f"{stem[:25]}-{stem[-24:]}"
    return f"{stem}-{secrets.token_hex(4)}"


def online_login_or_offline() -> str:
    """"online" when W&B has a login (key or netrc), else one line and "offline" (never a prompt)."""
    try:
        import wandb

        if wandb.login(prompt=False, verify=False):
            return "online"
        reason = "no W&B login; run `wandb login` or set WANDB_API_KEY"
    except Exception as e:
        reason = f"{type(e).__name__}: {_first_line(e)}"
    warn(f"W&B cannot log online ({reason}); logging offline instead")
    return "offline"


class WandbSink:
    """One W&B run. ``mode="disabled"`` makes every call a no-op without importing wandb.

    W&B never costs a run: if it cannot start online (no login, no network: the wait is
    bounded by :data:`INIT_TIMEOUT_S`), the sink says so in one line and logs offline; if it
    cannot start offline either (for example an unwritable directory), it turns itself off.
    An error while logging or finishing (W&B's service process died) also turns it off, with
    one line; the local records never depend on it.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: dict[str, Any],
        mode: str = "offline",
        project: str | None = None,
        name: str | None = None,
        group: str | None = None,
        job_type: str = "train",
        step_metric: str = "update",
        entity: str | None = None,
        tags: list[str] | None = None,
        system_metrics: bool = True,
    ):
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
        self.requested_mode = mode
        self.mode = mode
        self.run = None
        self.step_metric = step_metric
        if mode == "disabled":
            return
        from ntrl import __version__

        run_id = unique_run_id(name)
        # the id is unique per run, and so is the name: a re-run (--force) is a run of its own
        kwargs = dict(project=project_from_environment(project), entity=entity_from_environment(entity),
                      tags=tags_from_environment(tags) or None, dir=str(run_dir), id=run_id,
                      name=f"{name}-{run_id[-8:]}" if name else run_id, group=group, job_type=job_type,
                      config={**config, "ntrl_version": __version__})
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        for attempt in (("online", "offline") if mode == "online" else ("offline",)):
            try:
                self.run = self._start(attempt, kwargs, system_metrics)
                self.mode = attempt
                break
            except Exception as e:
                then = "logging offline instead" if attempt == "online" else "W&B is off for this run; local records are kept"
                warn(f"W&B could not start {attempt} ({type(e).__name__}: {_first_line(e)}); {then}")
        else:
            self.mode = "disabled"
            return
        self.run.define_metric(step_metric)
        self.run.define_metric("*", step_metric=step_metric)

    @staticmethod
    def _start(mode: str, kwargs: dict[str, Any], system_metrics: bool = True):
        import wandb

        # W&B reads WANDB_MODE itself and rejects a value it does not know even when the mode
        # is given here; the flag (or mode_from_environment) has already decided.
        os.environ["WANDB_MODE"] = mode
        if mode == "online" and not wandb.login(prompt=False, verify=False):
            # without this check W&B asks at its login prompt on a terminal, and waits there
            raise RuntimeError("no W&B login; run `wandb login` or set WANDB_API_KEY")
        return wandb.init(
            mode=mode,
            reinit="create_new",
            # login_timeout: on a terminal without a login W&B would otherwise wait at its prompt forever
            # system metrics and the git state are recorded as W&B users expect (a study's many short
            # runs leave system metrics to the study's summary run: one sampler per run would cost)
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=not system_metrics, disable_git=False,
                                    init_timeout=INIT_TIMEOUT_S[mode], login_timeout=INIT_TIMEOUT_S["online"]),
            **kwargs,
        )

    def lost(self, what: str, e: BaseException) -> None:
        """W&B failed while ``what``: say so in one line and turn the sink off."""
        warn(f"W&B failed while {what} ({type(e).__name__}: {_first_line(e)}); W&B is off for the rest of this "
             f"run, local records are kept")
        self.run = None
        self.mode = "disabled"

    @property
    def directory(self) -> str | None:
        """The W&B run directory (what ``wandb leet`` and ``wandb sync`` take), if any."""
        return None if self.run is None else str(Path(self.run.dir).parent)

    def log(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        from ntrl.records import scalar_items

        try:
            self.run.log(dict(scalar_items(record)))
        except Exception as e:
            self.lost("logging", e)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Log a wandb.Table (for example a population's members and their summaries)."""
        if self.run is None:
            return
        try:
            self.run.log({key: table(columns, rows)})
        except Exception as e:
            self.lost(f"logging the table {key}", e)

    def log_artifact(self, name: str, kind: str, paths: list[str | os.PathLike]) -> None:
        """Log files (records.jsonl, report.html, ...) as one W&B artifact ``name`` of type ``kind``;
        paths that do not exist are skipped. The files are referenced where they are (W&B's
        ``policy="immutable"``): the default would copy each into W&B's staging folder under
        ``~/.local/share/wandb``, outside --out, where offline copies stay until a sync."""
        if self.run is None:
            return
        try:
            import re

            import wandb

            art = wandb.Artifact(re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:120], type=kind)
            files = [Path(p) for p in paths if Path(p).is_file()]
            if not files:
                return
            for path in files:
                art.add_file(str(path), name=path.name, policy="immutable")
            self.run.log_artifact(art)
        except Exception as e:
            self.lost(f"logging the artifact {name}", e)

    def finish(self, summary: dict[str, Any] | None = None, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            for k, v in (summary or {}).items():
                if isinstance(v, (int, float, str, bool)) or v is None:
                    self.run.summary[k] = v
            self.run.finish(exit_code=exit_code)
        except Exception as e:
            self.lost("finishing", e)
        self.run = None


def read_offline_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read an offline W&B run back with ``wandb leet inspect --json``.

    Returns {"history": [logged dicts, in order], "summary": {...}, "config": {...}, "run": {project,
    entity, tags, display_name, run_id}, "artifacts": [{name, type}, ...]}, i.e. what W&B really stored.
    """
    import json
    import shutil
    import subprocess
    import sys

    exe = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    out = subprocess.run([exe, "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    history, summary, config, run, artifacts = [], {}, {}, {}, []
    for line in out.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        kind = rec.get("type")
        if kind == "history":
            history.append(rec["history"]["item"])
        elif kind == "summary":
            summary.update(rec["summary"].get("update", {}))
        elif kind == "run":
            config.update(rec["run"].get("config", {}).get("update", {}))
            run = {k: rec["run"].get(k) for k in ("project", "entity", "tags", "display_name", "run_id")}
        elif kind == "artifact":
            artifacts.append({"name": rec["artifact"].get("name"), "type": rec["artifact"].get("type")})
    return {"history": history, "summary": summary, "config": config, "run": run, "artifacts": artifacts}


def table(columns: list[str], rows: list[list[Any]]) -> Any:
    """A wandb.Table of ``rows``. Where every column holds values of one plain type (str, int or
    float; no None, no bool), the column types are declared (``dtype``; ``optional`` only for a
    column with a NaN, which W&B types as None): W&B then checks each row against them instead of
    inferring them row by row (3.0–3.1× for 4,000 rows of ten in two runs of `benchmarks/bench_study.py`; a
    population's curves table has up to 200,000 rows), and the logged table is the same but for
    its column types, "String" where they were "None or String". Any other rows: W&B infers the
    types, as it does by default."""
    import wandb

    kinds = [type(v) for v in rows[0]] if rows else []
    plain = bool(rows) and len(kinds) == len(columns) and all(k in (str, int, float) for k in kinds) and \
        all(len(r) == len(kinds) and all(type(v) is k for v, k in zip(r, kinds)) for r in rows)
    if not plain:
        return wandb.Table(columns=columns, data=rows)
    optional = [k is float and any(r[j] != r[j] for r in rows) for j, k in enumerate(kinds)]
    return wandb.Table(columns=columns, data=rows, dtype=kinds, optional=optional)
