"""Writing a population's record lines (issue 12): ``ntrl.records.record_lines`` (orjson, one call
per field, the numbers split per member) against the formatter it replaced, each float written
with ``float.__repr__`` as the standard library's ``json`` writes it (the named baseline,
reproduced here as it was), for one tracked update of 256 bandit members' 26 fields, in one run.

    .venv/bin/python benchmarks/bench_records.py      # a few seconds

Both give the same numbers (checked below: every line reads back to the same record); the
ratio is of the medians of interleaved rounds."""

from __future__ import annotations

import json
import statistics
import time

import numpy as np

from ntrl.records import record_lines


def repr_lines(fields: dict, rows: list[int]) -> list[str]:
    """The replaced formatter: per field, each member's float by ``float.__repr__``, joined."""
    columns = []
    for key, value in fields.items():
        prefix = json.dumps(key) + ": "
        if isinstance(value, list):
            columns.append([prefix + (value[r].__repr__() if isinstance(value[r], float) else json.dumps(value[r]))
                            for r in rows])
        else:
            columns.append([prefix + json.dumps(value)] * len(rows))
    return ["{" + ", ".join(parts) + "}" for parts in zip(*columns)]


def main(members: int = 256, n_fields: int = 24, rounds: int = 30) -> None:
    rng = np.random.default_rng(0)
    arrays = {f"P/field{i}": rng.standard_normal(members) * 10.0 ** rng.integers(-12, 3, members) for i in range(n_fields)}
    fields = {"update": 10, **arrays, "backend": "population"}
    as_lists = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in fields.items()}
    rows = list(range(members))
    new, old = record_lines(fields, rows), repr_lines(as_lists, rows)
    assert [json.loads(a) for a in new] == [json.loads(b) for b in old]
    times: dict[str, list[float]] = {"orjson": [], "repr": []}
    for _ in range(rounds):
        for name, fn, arg in (("orjson", record_lines, fields), ("repr", repr_lines, as_lists)):
            t = time.perf_counter()
            fn(arg, rows)
            times[name].append(time.perf_counter() - t)
    a, b = statistics.median(times["orjson"]), statistics.median(times["repr"])
    print(f"{members} members × {len(fields)} fields: record_lines {a * 1e3:.3f} ms, float.__repr__ formatter "
          f"{b * 1e3:.3f} ms (medians of {rounds} interleaved rounds): {b / a:.1f}× faster")


if __name__ == "__main__":
    main()
