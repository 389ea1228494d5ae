"""The record stream: one JSON object per tracked update, appended and flushed as it goes.

A run killed at any moment leaves every completed line readable; ``read_records`` drops
only a final line that was cut off mid-write. Lines are compact JSON written by orjson, whose
floats are the shortest text that reads back as the same float (what ``repr`` gives, though
spelled ``0.00001`` where ``repr`` says ``1e-05``), so the same seed and config give
byte-identical files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import orjson

RECORDS_FILE = "records.jsonl"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"


class RecordWriter:
    """Append-only JSONL writer that flushes after every record."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self.count = 0  # records written by this writer

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (see :func:`record_line`)."""
        self._f.write(record_line(record) + "\n")
        self._f.flush()
        self.count += 1

    def close(self) -> None:
        if not self._f.closed:
            os.fsync(self._f.fileno())
            self._f.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _plain(obj: Any) -> Any:
    """What orjson cannot write by itself, as the JSON value :func:`json.dumps` would give it:
    float and int subclasses as their values, numpy scalars and other ``tolist``-ables as Python
    values."""
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, int):
        return int(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def json_bytes(obj: Any) -> bytes:
    """``obj`` as compact JSON, with orjson: floats in the shortest form that reads back as the
    same float (so the same seed and config give byte-identical files), NaN and ±inf as null,
    numpy arrays as nested lists."""
    return orjson.dumps(obj, default=_plain, option=_ORJSON_OPTIONS)


def record_line(record: dict[str, Any]) -> str:
    """One record as its line of records.jsonl (:func:`json_bytes`): NaN and ±inf become null,
    so every line is standard JSON, and every float reads back as itself."""
    return json_bytes(record).decode()


def _column_values(value: Any, rows: list[int], index: np.ndarray) -> list[bytes]:
    """The JSON of each member ``rows`` (``index``: the same as an index array) of one field: a
    numpy array of one row per member (its rows' values, written by one orjson call and split), a
    list of one value per member, or one value for all."""
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":  # numbers: no comma inside a value
        encoded = json_bytes(value[index])  # indexing by an array gives the C-contiguous copy orjson needs
        if value.ndim == 1:
            return encoded[1:-1].split(b",")
        if value.ndim == 2:  # [[a,b],[c,d]] → [a,b], [c,d]
            return [b"[" + part + b"]" for part in encoded[2:-2].split(b"],[")]
        return [json_bytes(value[r]) for r in rows]
    if isinstance(value, (list, np.ndarray)):
        return [json_bytes(value[r]) for r in rows]
    return [json_bytes(value)] * len(rows)


def record_lines(fields: dict[str, Any], rows: Iterable[int]) -> list[str]:
    """The :func:`record_line` of each member ``rows`` of a population's record ``fields`` (per
    key a numpy array whose first axis runs over members, a list over members, or one value for
    all), written field by field rather than record by record. Every number must be finite
    (:func:`finite_rows`): for such records the lines are those :func:`record_line` writes,
    character for character (tested)."""
    rows = list(rows)
    if not rows:
        return []
    template = ("{" + ",".join(json_bytes(key).decode().replace("%", "%%") + ":%s" for key in fields) + "}").encode()
    index = np.asarray(rows, dtype=np.intp)
    columns = [_column_values(value, rows, index) for value in fields.values()]
    return [(template % parts).decode() for parts in zip(*columns)]


def finite_rows(fields: dict[str, Any], n: int) -> list[bool]:
    """For each of ``n`` members, whether every float of its record (``fields`` as
    :func:`record_lines` takes them) is finite."""
    ok = np.ones(n, dtype=bool)
    columns = []  # the float arrays of one value per member, checked at once
    for value in fields.values():
        if isinstance(value, np.ndarray):
            if value.dtype.kind == "f":
                if value.shape == (n,):
                    columns.append(value)
                else:
                    ok &= np.isfinite(value).reshape(n, -1).all(axis=1)
            elif value.dtype.kind not in "biu":  # not numbers: the caller checks these rows itself
                return [False] * n
        elif isinstance(value, list):
            if value and isinstance(value[0], (float, list)):
                try:
                    arr = np.asarray(value, dtype=float)
                except (TypeError, ValueError):  # ragged or not numbers: the caller checks these rows itself
                    return [False] * n
                ok &= np.isfinite(arr).reshape(n, -1).all(axis=1)
        elif isinstance(value, float) and not math.isfinite(value):
            ok[:] = False
    if columns:
        ok &= np.isfinite(np.stack(columns)).all(axis=0)
    return ok.tolist()


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a run (a file path or a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS_FILE
    lines = path.read_text(encoding="utf-8").split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(orjson.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the last line was being written when the run died
                break
            raise ValueError(f"{path}:{i + 1}: corrupt record") from None
    return out


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to a temporary file and rename it into place (never half-written)."""
    write_bytes_atomic(path, json_file_bytes(obj))


def json_file_bytes(obj: Any) -> bytes:
    """A JSON file's contents as ntrl writes them: indented, keys sorted, NaN and ±inf as null."""
    return (json.dumps(_finite_or_null(obj), indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def write_json_many_atomic(items: Iterable[tuple[str | os.PathLike, Any]],
                           sync_also: Iterable[str | os.PathLike] = ()) -> None:
    """:func:`write_json_atomic` for many files at once, with one sync for all: every file is
    written to its temporary name, then it and the files ``sync_also`` (which must be on disk
    before any of them appears: a summary's records) are synced (:func:`sync_file_systems`), then
    each is renamed into place. Never half-written, as one by one, at the cost of one sync instead
    of one per file."""
    write_bytes_many_atomic([(p, json_file_bytes(obj)) for p, obj in items], sync_also)


def write_bytes_many_atomic(items: Iterable[tuple[str | os.PathLike, bytes]],
                            sync_also: Iterable[str | os.PathLike] = (),
                            written: Callable[[], None] | None = None) -> None:
    """:func:`write_json_many_atomic` for files given as bytes: each written to a temporary name,
    all synced at once (with ``sync_also``), then each renamed into place in the order given.
    ``written``: called after each file's temporary copy is written (a progress bar)."""
    sync_also = [p for p in sync_also if os.path.exists(p)]
    _replace_atomically(list(items), lambda temps: sync_file_systems(temps + sync_also), written)


def sync_file_systems(paths: Iterable[str | os.PathLike]) -> None:
    """Flush to disk everything written to the file systems that hold ``paths``: Linux's
    ``syncfs`` once per file system, elsewhere (or if it fails) an fsync of each path."""
    import ctypes
    import ctypes.util

    paths = list(paths)
    syncfs = None
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError, TypeError):
            syncfs = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).syncfs
    done: set[int] = set()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            dev = os.fstat(fd).st_dev
            if syncfs is not None and dev in done:
                continue
            if syncfs is not None and syncfs(fd) == 0:
                done.add(dev)
            else:
                os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_each(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file, fsync it and rename it into place (never half-written)."""
    _replace_atomically([(path, data)], _fsync_each)


def _replace_atomically(items: list[tuple[str | os.PathLike, bytes]], sync: Callable[[list[str]], None],
                        written: Callable[[], None] | None = None) -> None:
    """Write each (path, data) to a fresh temporary file beside it (calling ``written`` after each),
    ``sync`` the temporary files, then rename each into place; on any error remove the temporary
    files, and leave every path as it was that was not renamed yet."""
    import tempfile

    temps: list[tuple[str, Path]] = []
    try:
        for path, data in items:
            path = Path(path)
            # a fresh temporary name (O_EXCL): never an existing file or a symbolic link planted there
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if written is not None:
                written()
        sync([tmp for tmp, _ in temps])
        for tmp, path in temps:
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def _finite_or_null(obj: Any) -> Any:
    """A copy of a JSON-able object with NaN and ±inf floats replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def nonfinite_field(record: dict[str, Any]) -> str | None:
    """The first key of ``record`` whose number (or any entry of whose list) is NaN or ±inf."""
    for k, v in record.items():
        values = v if isinstance(v, (list, tuple)) else [v]
        if any(isinstance(x, float) and not math.isfinite(x) for x in values):
            return k
    return None


def scalar_items(record: dict[str, Any]) -> Iterable[tuple[str, float]]:
    """(key, value) pairs of a record as scalars: lists (batched properties) become their mean."""
    for k, v in record.items():
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            yield k, v
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            yield k, sum(v) / len(v)


def _run_dirs(path: Path) -> list[Path]:
    """The run directories at ``path``: itself (a run), or ``path/runs/*`` (a study), or
    ``path/*`` (a parent of runs), those holding a records file."""
    if (path / RECORDS_FILE).is_file():
        return [path]
    for parent in (path / "runs", path):
        found = sorted(p for p in parent.glob("*") if (p / RECORDS_FILE).is_file())
        if found:
            return found
    return []


def _run_columns(run_dir: Path) -> dict[str, Any]:
    """The axes of a run, from its config.json and (a study's run) its summary's spec."""
    cols: dict[str, Any] = {"run": run_dir.name}
    try:
        config = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    for key in ("env", "algo", "policy", "optimizer", "mode", "p0", "seed", "adam_beta1", "adam_beta2", "adam_eps"):
        if key in config:
            cols[key] = config[key]
    try:
        spec = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8")).get("spec") or {}
    except (OSError, ValueError):
        spec = {}
    if "direction" in spec:
        cols["direction"] = spec["direction"]
    return cols


def record_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One record in long form: a row per property X (the prefix of its ``X/field`` keys) and entry
    i of X (a batched property's probe state; 0 for a scalar), with X's fields of entry i as
    columns, beside the record's own scalars (update, lr, U, kappa, return, ...). Lists of another
    length than X's value (the η-probe's one entry per scale, a κ per probe observation) are left
    out; :func:`read_records` keeps them."""
    common = {k: v for k, v in record.items() if "/" not in k and not isinstance(v, (list, dict))}
    groups: dict[str, dict[str, Any]] = {}
    for k, v in record.items():
        if "/" in k:
            name, field = k.split("/", 1)
            groups.setdefault(name, {})[field] = v
    for name in [n for n, fields in groups.items() if "value" not in fields]:  # not a property: SB3's
        common.update({f"{name}/{f}": v for f, v in groups.pop(name).items()   # train/*, rollout/*, noise/*
                       if not isinstance(v, (list, dict))})
    rows = []
    for name, fields in groups.items():
        value = fields.get("value")
        n = len(value) if isinstance(value, list) else 1
        for i in range(n):
            row = dict(common, property=name, entry=i)
            for field, v in fields.items():
                if isinstance(v, list):
                    # one entry per probe state; the η-probe's lists have one per scale instead
                    if len(v) == n and isinstance(value, list) and not field.startswith("probe_"):
                        row[field] = v[i]
                elif not isinstance(v, dict):
                    row[field] = v
            rows.append(row)
    return rows


def to_dataframe(path: str | os.PathLike):
    """The records of a run directory, or of every run of a study directory (or of a parent of run
    directories), as a long-format pandas DataFrame: one row per record × property × probe entry
    (:func:`record_rows`), with the run's name and axes (env, policy, optimizer, mode, p0, seed,
    and a study run's direction) as columns."""
    import pandas as pd

    path = Path(path)
    runs = _run_dirs(path)
    if not runs:
        raise FileNotFoundError(f"{path} holds no run: no {RECORDS_FILE} in it, in {path}/runs/*, or in {path}/*")
    rows = []
    for run_dir in runs:
        cols = _run_columns(run_dir)
        for record in read_records(run_dir):
            rows.extend(dict(cols, **row) for row in record_rows(record))
    if not rows:  # runs without records yet: the columns every frame has, and no rows
        return pd.DataFrame(columns=["run", "update", "property", "entry", "value"])
    return pd.DataFrame(rows)
