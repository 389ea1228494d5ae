"""The study's fixed costs (issue 12, run 11): each new path against the one it replaced, in one
run, as ratios of the medians of interleaved rounds.

1. A power-law exponent's bootstrap (``exponent_estimate``: every resample fitted at once from
   the runs' least-squares moments) against the per-resample fit (``small_p_exponent`` without
   ``moments``, the named baseline), on 20 synthetic runs of 200 records (5 p0 × 4 seeds).
2. The η-slope of every record (``record_slopes``, one vectorized fit) against ``record_slope``
   per record (``np.polyfit``), 5,000 records of six probe scales.
3. A W&B table of 4,000 rows of ten plain values (``ntrl.wandb_sink.table``, column types
   declared) against ``wandb.Table`` inferring them.

    .venv/bin/python benchmarks/bench_study.py      # under a minute

Each pair is also checked to give the same numbers (the fits to 1e-10, the tables' rows equal)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians  # noqa: E402


def compare(name: str, new, old, rounds: int = 5) -> None:
    """Medians of interleaved rounds after a warm-up call each (benchmarks/timing.py)."""
    t = interleaved_medians({"new": new, "old": old}, rounds)
    print(f"{name}: {t['new'] * 1e3:.2f} ms against {t['old'] * 1e3:.2f} ms, {t['old'] / t['new']:.1f}×")


def synthetic_runs():
    from ntrl.study import RunSpec
    from ntrl.study.stats import RunData

    rng = np.random.default_rng(0)
    runs = []
    for p0 in (1e-5, 1e-4, 1e-3, 1e-2, 5e-2):
        for s in range(4):
            p = np.geomspace(p0, 0.5, 200)
            y = np.exp(rng.normal(0, 0.3)) * p**2 * (1 - p) ** 2 * np.exp(0.2 * rng.normal(size=p.size))
            recs = [{"update": i, "P/value": float(a), "P/ntvar_euc": float(b)} for i, (a, b) in enumerate(zip(p, y))]
            runs.append(RunData(RunSpec("bandit", "mlp", "sgd", "exact", p0, "rewarded", s), {}, recs))
    return runs


def main() -> None:
    from ntrl.study.analysis import exponent_estimate, law_points, small_p_exponent
    from ntrl.tracker import record_slope, record_slopes
    from ntrl.wandb_sink import table

    runs = synthetic_runs()
    new = exponent_estimate(runs, "P/ntvar_euc")
    old = small_p_exponent(runs, lambda items: law_points(items, "P/ntvar_euc"), min_points=4)
    assert np.allclose([new.value, new.lo, new.hi], [old.value, old.lo, old.hi], rtol=1e-10)
    compare("1. exponent bootstrap, 999 resamples", lambda: exponent_estimate(runs, "P/ntvar_euc"),
            lambda: small_p_exponent(runs, lambda items: law_points(items, "P/ntvar_euc"), min_points=4), rounds=3)

    rng = np.random.default_rng(1)
    scales = np.array([4.0, 2.0, 1.0, 0.5, 0.25, 0.125])
    records = []
    for _ in range(5000):
        lr, real = 10.0 ** rng.uniform(-3, 0), rng.normal(0, 1, 6) * 1e-4
        records.append({"lr": lr, "P/probe_lr": list(lr * scales), "P/probe_real": list(real),
                        "P/probe_pred": list(real * (1 + rng.normal(0, 1e-3, 6) * scales))})
    assert np.allclose(record_slopes(records), [record_slope(r) for r in records], rtol=1e-10)
    compare("2. η-slopes of 5,000 records", lambda: record_slopes(records), lambda: [record_slope(r) for r in records])

    import wandb

    cols = ["env", "mode", "policy", "optimizer", "run", "update", "P", "predicted", "realised", "relative_residual"]
    rows = [["bandit", "exact", "mlp", "sgd", f"run-{i % 25}", i, float(p), float(r), float(r) * 1.01, 0.01]
            for i, (p, r) in enumerate(rng.random((4000, 2)))]
    assert table(cols, rows).data == wandb.Table(columns=cols, data=rows).data
    compare("3. W&B table of 4,000 rows", lambda: table(cols, rows), lambda: wandb.Table(columns=cols, data=rows))


if __name__ == "__main__":
    main()
