"""The softmax gravity well (SCIENCE.md §3; Mei et al., NeurIPS 2020): one verdict per optimizer.

The study's *well* runs train the three-armed bandit with rewards (1, 0.9, 0) from
π₀ = (p₀, 0.95 − p₀, 0.05) with exact gradients until the rare best arm's probability P reaches ½.
Under vanilla policy gradient on softmax logits,

    d log P/dt = P (1 − J) − Σ_b π_b² (r_b − J),

which is negative while P is small and the common second-best arm still gains: P first falls
below p₀ and escapes only after the second arm has taken over. NPG (d log P/dt = 1 − J) and the
escort policy at q = 2 (d log P/dt = (4/‖θ‖²)(1 − J)) never fall.

Per run, from its summary: the least P, the update at which it occurred, the update at which P was
back at p₀, and the escape time. Per cell (policy, optimizer):

* **gravity well**: at the grid's smallest p₀, P fell at least :data:`WELL_FACTOR` times below
  p₀ before it escaped (or before the run ended);
* **no well**: it escaped without such a dip (a dip of less than WELL_FACTOR is reported as its
  depth);
* **inconclusive**: the run from the grid's smallest p₀ is missing (not complete), or it ended
  without escaping and without such a dip: P might still fall further.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ntrl.study.stats import RunData

WELL_FACTOR = 2.0  # a "gravity well" is a dip of P to at most p₀ / 2 before the escape
WELL_TITLE = "The softmax gravity well (three-armed bandit)"
WELL_VERDICT_COLUMNS = ["policy", "optimizer", "verdict", "evidence"]
WELL_COLUMNS = ["policy", "optimizer", "lr", "verdict", "p₀", "min P", "depth p₀/min P", "min at update",
                "below p₀ until", "escape at update"]


@dataclass
class WellRun:
    """One gravity-well run's numbers (from its summary)."""

    p0: float
    p_min: float
    p_min_at: int
    p_back_at: int | None
    escape: int | None
    updates: int
    lr: float

    @property
    def depth(self) -> float:
        """p₀ / min P (1: no dip)."""
        return self.p0 / self.p_min if self.p_min > 0 else math.inf


@dataclass
class WellCell:
    """The verdict of one (policy, optimizer) cell on the gravity-well start."""

    policy: str
    optimizer: str
    runs: list[WellRun] = field(default_factory=list)
    verdict: str = "inconclusive"
    reason: str = "no complete run"

    @property
    def label(self) -> str:
        return "escort (vanilla PG)" if self.policy == "escort" else self.optimizer

    def row(self) -> dict[str, Any]:
        """The cell for well.csv: one column per p₀ of depth, escape and min P."""
        out: dict[str, Any] = {"policy": self.policy, "optimizer": self.optimizer, "verdict": self.verdict,
                               "well_factor": WELL_FACTOR}
        for r in self.runs:
            out[f"p_min@{r.p0:g}"] = r.p_min
            out[f"depth@{r.p0:g}"] = r.depth
            out[f"p_min_at@{r.p0:g}"] = r.p_min_at
            out[f"p_back_at@{r.p0:g}"] = r.p_back_at
            out[f"escape@{r.p0:g}"] = r.escape
        return out


def well_run(r: RunData) -> WellRun:
    s = r.summary
    return WellRun(p0=r.spec.p0, p_min=float(s.get("p_min", s["p_start"])), p_min_at=int(s.get("p_min_at", 0)),
                   p_back_at=s.get("p_back_at"), escape=s.get("crossed_half_at"), updates=int(s["updates"]),
                   lr=float(r.config.get("lr", math.nan)))


def trajectory_text(w: WellRun) -> str:
    """What P did from p₀, in words."""
    if w.p_min_at == 0 or w.depth <= 1.0:
        dip = f"from p₀ = {w.p0:g} P never fell below it"
    else:
        back = (f", was back at p₀ at update {w.p_back_at}" if w.p_back_at is not None else ", never returned to p₀")
        dip = f"from p₀ = {w.p0:g} P fell to {w.p_min:.3g} ({w.depth:.3g}× lower) at update {w.p_min_at}{back}"
    end = f" and escaped at update {w.escape}" if w.escape is not None else f" and had not escaped after {w.updates} updates"
    return dip + end


def analyse_well(runs: Sequence[RunData], grid_p0s: Sequence[float] | None = None) -> list[WellCell]:
    """One :class:`WellCell` per (policy, optimizer) among the complete well runs of ``runs``;
    ``grid_p0s``: the grid's well p₀ values (the verdict is taken at the smallest, and is
    inconclusive while that run is missing)."""
    cells: dict[tuple[str, str], WellCell] = {}
    for r in runs:
        if r.spec.direction != "well":
            continue
        key = (r.spec.policy, r.spec.optimizer_label)
        cells.setdefault(key, WellCell(*key)).runs.append(well_run(r))
    for cell in cells.values():
        cell.runs.sort(key=lambda w: w.p0)
        rarest = cell.runs[0]
        smallest = min(grid_p0s) if grid_p0s else rarest.p0
        depths = ("" if len(cell.runs) == 1 else
                  "; depth p₀/min P over p₀ = " + ", ".join(f"{w.p0:g}: {w.depth:.3g}" for w in cell.runs))
        rule = f"a well is a dip to p₀/{WELL_FACTOR:g} or lower"
        if rarest.p0 > smallest:
            cell.verdict = "inconclusive"
            cell.reason = f"the run from the smallest p₀ = {smallest:g} is not complete{depths}"
        elif rarest.depth >= WELL_FACTOR:
            cell.verdict, cell.reason = "gravity well", f"at the smallest p₀, {trajectory_text(rarest)}; {rule}{depths}"
        elif rarest.escape is None:
            cell.verdict = "inconclusive"
            cell.reason = (f"at the smallest p₀, {trajectory_text(rarest)}: P may still fall (raise well_steps); "
                           f"{rule}{depths}")
        else:
            cell.verdict, cell.reason = "no well", f"at the smallest p₀, {trajectory_text(rarest)}; {rule}{depths}"
    return sorted(cells.values(), key=lambda c: (c.policy != "tabular", c.policy, c.optimizer))


def well_verdicts(cells: Sequence[WellCell]) -> list[list[str]]:
    """One row of :data:`WELL_VERDICT_COLUMNS` per cell: its verdict and the evidence."""
    return [[c.policy, c.optimizer, c.verdict, c.reason] for c in cells]


def well_numbers(cells: Sequence[WellCell]) -> list[list[Any]]:
    """The table for W&B, numbers as numbers: one row per cell and p₀ (None where P never fell
    below p₀, or did not escape)."""
    return [[c.policy, c.optimizer, w.lr, c.verdict, w.p0, w.p_min, w.depth, w.p_min_at or None,
             w.p_back_at if w.p_min_at else None, w.escape] for c in cells for w in c.runs]


def well_rows(cells: Sequence[WellCell]) -> list[list[str]]:
    """The report's table: one row per cell and p₀ (the cell's verdict on its first row)."""
    rows = []
    for c in cells:
        for i, w in enumerate(c.runs):
            rows.append([c.policy, c.optimizer, f"{w.lr:g}", c.verdict if i == 0 else "", f"{w.p0:g}", f"{w.p_min:.3g}",
                         f"{w.depth:.3g}", str(w.p_min_at) if w.p_min_at else "—",
                         "—" if w.p_min_at == 0 else (str(w.p_back_at) if w.p_back_at is not None else "never"),
                         str(w.escape) if w.escape is not None else f"> {w.updates}"])
    return rows


WELL_COLORS = {"sgd": "#1f77b4", "npg": "#d62728", "sign": "#2ca02c", "adam": "#9467bd", "escort": "#ff7f0e"}


def _color(cell_key: tuple[str, str]) -> str:
    return WELL_COLORS["escort"] if cell_key[0] == "escort" else WELL_COLORS.get(cell_key[1].split("(")[0], "#333333")


def plot_well(path: Path, runs: Sequence[RunData], cells: Sequence[WellCell]) -> None:
    """Two panels: P(t)/p₀ of every cell at each p₀ (log-log; below 1 is the well), and min P
    against p₀ (the diagonal is no dip)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    fig.suptitle("The softmax gravity well: rewards (1, 0.9, 0) from π₀ = (p₀, 0.95 − p₀, 0.05), exact gradients")
    labels = {(c.policy, c.optimizer): c.label for c in cells}
    for r in runs:
        if r.spec.direction != "well":
            continue
        key = (r.spec.policy, r.spec.optimizer_label)
        pts = [(rec["update"] + 1, rec["P/value"] / r.spec.p0) for rec in r.records if "P/value" in rec]
        if not pts:
            continue
        t, y = np.array(pts).T
        first = r.spec.p0 == min(w.p0 for c in cells if (c.policy, c.optimizer) == key for w in c.runs)
        ax1.plot(t, y, color=_color(key), alpha=0.9 if first else 0.45, lw=1.4,
                 label=labels.get(key) if first else None)
    ax1.axhline(1.0, color="#888", lw=0.8, ls=":")
    ax1.axhline(1.0 / WELL_FACTOR, color="#888", lw=0.8, ls="--")
    ax1.set(xscale="log", yscale="log", xlabel="update t + 1", ylabel="P(t) / p₀  (below the dashed line: a well)",
            title="P(t) relative to its start, every p₀")
    ax1.legend(fontsize=9)
    markers = "os^Dvp*"
    for i, c in enumerate(cells):  # markers of decreasing size: cells that coincide stay visible
        p0 = np.array([w.p0 for w in c.runs])
        pm = np.array([w.p_min for w in c.runs])
        ax2.plot(p0, pm, "-", marker=markers[i % len(markers)], ms=max(3.0, 11.0 - 1.6 * i), mfc="none", mew=1.6,
                 color=_color((c.policy, c.optimizer)), label=f"{c.label}: {c.verdict}")
    all_p0 = [w.p0 for c in cells for w in c.runs]
    if all_p0:
        lo, hi = min(all_p0), max(all_p0)
        ax2.plot([lo, hi], [lo, hi], color="#888", lw=0.8, ls=":", label="min P = p₀ (no dip)")
    ax2.set(xscale="log", yscale="log", xlabel="p₀", ylabel="least P along the trajectory", title="min P against p₀")
    ax2.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
