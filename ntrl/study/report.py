"""The rarity report: PNG plots, CSV tables, report.md and a self-contained report.html, and the
rows of the W&B summary run's tables (:mod:`ntrl.study.wandb_summary` logs that run).
"""

from __future__ import annotations

import base64
import csv
import html
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ntrl.study.analysis import (
    LAW_MARGIN, MIN_DELTA_AIC, MIN_P0S, SMALL_P0, CellResult, RunData, escape_data, kappa_of, waiting_time,
)
from ntrl.study.extinction import ADAM_LATE_MEMORIES, FLOOR_FRACTION, WINDOW_DECADES, curve
from ntrl.study.price import probe_points, standardized
from ntrl.study.well import (
    WELL_COLUMNS, WELL_FACTOR, WELL_TITLE, WELL_VERDICT_COLUMNS, WellCell, plot_well, well_rows,
    well_verdicts,
)
from ntrl.tracker import FIRST_ORDER_TOLERANCE

OPT_COLORS = {"sgd": "#1f77b4", "npg": "#d62728", "sign": "#2ca02c", "adam": "#9467bd"}
ADAM_SHADES = ("#9467bd", "#e377c2", "#8c564b", "#bcbd22")  # Adam variants (β₂ = 0.99, ...), in label order


def color_of(label: str, labels: Sequence[str] = ()) -> str | None:
    """The plot colour of an optimizer label (adam(b2=0.99) and the other Adam variants get shades)."""
    if label.startswith("adam(") and labels:
        variants = sorted(x for x in labels if x.startswith("adam"))
        return ADAM_SHADES[variants.index(label) % len(ADAM_SHADES)]
    return OPT_COLORS.get(label.split("(")[0])


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _groups(runs: Sequence[RunData]) -> dict[tuple[str, str], dict[str, dict[str, list[RunData]]]]:
    """(env, mode) → policy → optimizer → runs."""
    out: dict = {}
    for r in runs:
        s = r.spec
        if s.direction == "well":  # the gravity well has its own section (ntrl.study.well)
            continue
        out.setdefault((s.env, s.mode), {}).setdefault(s.policy, {}).setdefault(s.optimizer_label, []).append(r)
    return out


def _grid(plt, n_rows: int, n_cols: int, title: str):
    import textwrap

    width = max(4.6 * n_cols, 7.0)  # a one-panel figure is still wide enough for its title
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(width, 3.6 * n_rows + 0.4), squeeze=False)
    fig.suptitle(textwrap.fill(title, int(width * 13)), fontsize=10)
    return fig, axes


def plot_static_law(path: Path, env: str, mode: str, by_policy) -> None:
    """NTVar(P) against p, log–log, Euclidean and Fisher metrics, with p² and p(1 − p) guides."""
    plt = _plt()
    policies = sorted(by_policy)
    fig, axes = _grid(plt, len(policies), 2, f"Static law: NTVar(P) against p ({env}, {mode} gradients)")
    for i, pol in enumerate(policies):
        for j, (key, label) in enumerate((("P/ntvar_euc", "Euclidean NTVar(P)"), ("P/ntvar_fisher", "Fisher NTVar(P)"))):
            ax = axes[i][j]
            allp, ally = [], []
            by_opt = by_policy[pol]
            for opt, rs in sorted(by_opt.items()):
                p = [rec["P/value"] for r in rs if r.spec.direction == "rewarded" for rec in r.records if key in rec]
                y = [rec[key] for r in rs if r.spec.direction == "rewarded" for rec in r.records if key in rec]
                ax.loglog(p, y, ".", ms=2.5, alpha=0.6, color=color_of(opt, list(by_opt)), label=opt)
                allp += p
                ally += y
            guide = law_guide_anchor(allp, ally)
            if guide is not None:
                grid, p_ref, y_ref = guide
                for law, f, style in (("∝ p²(1−p)²", lambda q: (q * (1 - q)) ** 2, "k--"),
                                      ("∝ p(1−p)", lambda q: q * (1 - q), "k:")):
                    ax.loglog(grid, y_ref * f(grid) / f(p_ref), style, lw=1, label=law)
            ax.set_title(f"{pol}: {label}")
            ax.set_xlabel("p")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


GUIDE_BAND = 0.25  # decades of p either side of the guides' anchor whose points set its height


def law_guide_anchor(p: list[float], y: list[float]) -> tuple[np.ndarray, float, float] | None:
    """Where the static-law guides go on a log–log panel of points (p, y): 50 log-spaced p over
    the points' range, and the point (p_ref, y_ref) both guides pass through, p_ref at the median
    log p and y_ref the median y of the points within :data:`GUIDE_BAND` decades of it, or of the
    nearest ones where none is that near (not one point's: a few runs' dips, NPG's on the juice
    MLP, would carry the guides with them). From the points a log–log axis can show, p and y
    positive and finite (a run whose P fell to exactly 0 has none); None where there are none."""
    p_arr, y_arr = np.asarray(p, dtype=float), np.asarray(y, dtype=float)
    shown = np.isfinite(p_arr) & np.isfinite(y_arr) & (p_arr > 0) & (y_arr > 0)
    if not shown.any():
        return None
    log_p, log_y = np.log10(p_arr[shown]), np.log10(y_arr[shown])
    centre = float(np.median(log_p))
    distance = np.abs(log_p - centre)
    near = distance <= max(GUIDE_BAND, float(distance.min()))
    return np.logspace(log_p.min(), log_p.max(), 50), 10.0**centre, 10.0 ** float(np.median(log_y[near]))


def policy_panels(path: Path, title: str, by_policy, draw, xlabel: str, ylabel: str,
                  log: str = "") -> None:
    """One panel per policy, side by side: ``draw(ax, policy, runs_by_optimizer)`` fills each;
    ``log`` names the log axes ("x", "y" or "xy")."""
    plt = _plt()
    policies = sorted(by_policy)
    fig, axes = _grid(plt, 1, len(policies), title)
    for i, pol in enumerate(policies):
        ax = axes[0][i]
        draw(ax, pol, by_policy[pol])
        ax.set_xscale("log" if "x" in log else "linear")
        if "y" in log:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(pol)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_price_check(ax, pol, by_opt) -> None:
    """Predicted against realised |ΔP|, with predicted = realised for reference."""
    lo, hi = np.inf, -np.inf
    for opt, rs in sorted(by_opt.items()):
        pred = np.array([rec["P/pred_delta"] for r in rs for rec in r.records if "P/real_delta" in rec])
        real = np.array([rec["P/real_delta"] for r in rs for rec in r.records if "P/real_delta" in rec])
        ok = (pred != 0) & (real != 0)
        ax.plot(np.abs(real[ok]), np.abs(pred[ok]), ".", ms=2.5, alpha=0.6, color=color_of(opt, list(by_opt)), label=opt)
        if ok.any():
            lo, hi = min(lo, np.abs(real[ok]).min()), max(hi, np.abs(real[ok]).max())
    if np.isfinite(lo):
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="predicted = realised")


RESIDUAL_POINTS = 4000  # per optimizer and policy panel; beyond that, a uniform random subsample (seed 0)


def subsample(n: int, k: int = RESIDUAL_POINTS) -> np.ndarray:
    """Indices of at most ``k`` of ``n`` points: all of them, or a uniform random sample (seed 0,
    so that the plot is the same on every re-analysis), sorted."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=k, replace=False))


def residual_points(runs: Sequence[RunData]) -> list[list[Any]]:
    """[run, update, P, predicted, realised, (realised − predicted)/|predicted|] of every record
    with a realised ΔP and a nonzero prediction."""
    return [[r.spec.run_id, rec["update"], rec["P/value"], rec["P/pred_delta"], rec["P/real_delta"],
             (rec["P/real_delta"] - rec["P/pred_delta"]) / abs(rec["P/pred_delta"])]
            for r in runs for rec in r.records if "P/real_delta" in rec and rec.get("P/pred_delta")]


def draw_price_residual(ax, pol, by_opt) -> None:
    """The Price check's relative residual (realised − predicted)/|predicted| against P before the
    update, on a symmetric log axis: 0 is a perfect prediction, ±0.5 the first-order bound, and the
    points an R² hides (a few updates far outside) stand apart."""
    for opt, rs in sorted(by_opt.items()):
        pts = residual_points(rs)
        if not pts:
            continue
        keep = subsample(len(pts))
        x = np.array([pts[i][2] for i in keep], dtype=float)
        y = np.array([pts[i][5] for i in keep], dtype=float)
        ax.plot(x, y, ".", ms=2.5, alpha=0.5, color=color_of(opt, list(by_opt)),
                label=f"{opt} ({len(keep)} of {len(pts)})" if len(keep) < len(pts) else opt)
    ax.axhline(0.0, color="k", lw=0.8)
    for bound in (FIRST_ORDER_TOLERANCE, -FIRST_ORDER_TOLERANCE):
        ax.axhline(bound, color="#888", lw=0.8, ls="--")
    ax.set_yscale("symlog", linthresh=1e-3)


def draw_escape(cells: dict, env: str, mode: str):
    """T(p₀) per optimizer with the fitted winning model."""

    def draw(ax, pol, by_opt) -> None:
        for opt, rs in sorted(by_opt.items()):
            p0, T = escape_data([r for r in rs if r.spec.direction == "rewarded"])
            if not len(p0):
                continue
            color = color_of(opt, list(by_opt))
            ax.plot(p0, T, "o", ms=4, alpha=0.7, color=color)
            c = cells.get((env, pol, opt, mode))
            if c is not None and c.escape.n:
                grid = np.logspace(np.log10(p0.min()), np.log10(p0.max()), 40)
                pr = c.escape.params
                if c.escape.winner == "power law":
                    fit = np.exp(pr["intercept"]) * grid ** pr["slope"]
                elif c.escape.winner == "waiting time":
                    fit = pr["c"] * waiting_time(grid, pr["batch_size"])
                else:
                    fit = pr["A"] + pr["B"] * np.log(1 / grid)
                ax.plot(grid, fit, "-", color=color, lw=1, label=f"{opt}: {c.escape.winner}")

    return draw


def draw_extinction(ax, pol, by_opt) -> None:
    """P(t) of every punished run, log–log (1/t decay is a line of slope −1; exponential decay
    bends down), with a guide of slope −1."""
    t_max, p_ref = 0.0, None
    for opt, rs in sorted(by_opt.items()):
        first = True
        for r in rs:
            if r.spec.direction != "punished":
                continue
            t, P, _ = curve(r)
            ok = (t > 0) & (P > 0)
            ax.plot(t[ok], P[ok], "-", lw=1, alpha=0.7, color=color_of(opt, list(by_opt)), label=opt if first else None)
            first = False
            if ok.any():
                t_max, p_ref = max(t_max, float(t[ok].max())), p_ref or float(P[ok][0])
    if p_ref is not None and t_max > 1:
        grid = np.geomspace(1, t_max, 20)
        ax.plot(grid, p_ref / grid, "k:", lw=1, label="∝ 1/t")


def draw_kappa(ax, pol, by_opt) -> None:
    """κ(t)/κ(0) of every run."""
    for opt, rs in sorted(by_opt.items()):
        first = True
        for r in rs:
            k = [kappa_of(rec) for rec in r.records if "kappa" in rec]
            t = [rec["update"] for rec in r.records if "kappa" in rec]
            if k and k[0] > 0:
                ax.plot(t, np.array(k) / k[0], "-", lw=0.8, alpha=0.6, color=color_of(opt, list(by_opt)),
                        label=opt if first else None)
                first = False


def draw_eta_slope(ax, pol, by_opt) -> None:
    """The η-slope of every probed update against P: 1 where the prediction is first-order."""
    for opt, rs in sorted(by_opt.items()):
        P = np.concatenate([probe_points(r)[0] for r in rs])
        S = np.concatenate([probe_points(r)[1] for r in rs])
        ok = np.isfinite(S) & (P > 0)
        ax.plot(P[ok], S[ok], ".", ms=2.5, alpha=0.5, color=color_of(opt, list(by_opt)), label=opt)
    ax.axhline(1.0, color="k", lw=0.8, ls=":", label="first order: 1")


def draw_noise(ax, pol, by_opt) -> None:
    """Per decade of P: the realised spread of ΔP − E[ΔP] (dots) against the minibatch model's
    predicted spread (solid) and the isotropic model's (dashed)."""
    from ntrl.study.price import noise_rows

    for opt, rs in sorted(by_opt.items()):
        rows = [noise_rows(r) for r in rs]
        rows = [x for x in rows if len(x)]
        if not rows:
            continue
        bins = standardized(np.concatenate(rows))["bins"]
        if not bins:
            continue
        color = color_of(opt, list(by_opt))
        p = [b["p"] for b in bins]
        ax.plot(p, [b["realised"] for b in bins], "o", ms=4, color=color, label=f"{opt}: realised")
        ax.plot(p, [b["predicted"] for b in bins], "-", lw=1.2, color=color, label=f"{opt}: minibatch Σ")
        ax.plot(p, [b["predicted_iso"] for b in bins], "--", lw=1, color=color, label=f"{opt}: isotropic Σ")


def make_plots(runs: Sequence[RunData], cells: Sequence[CellResult], out: Path,
               well_cells: Sequence[WellCell] = ()) -> list[tuple[str, Path]]:
    """Every plot of the report; returns (caption, path) pairs in report order."""
    by_cell = {c.cell: c for c in cells}
    items: list[tuple[str, Path, Any]] = []
    for (env, mode), by_policy in sorted(_groups(runs).items()):
        items += group_plot_items(out, env, mode, by_policy, by_cell)
    if well_cells:
        items.append((WELL_TITLE, out / "gravity_well.png", lambda p: plot_well(p, runs, well_cells)))
    return draw_items(out, items)


def group_plot_items(out: Path, env: str, mode: str, by_policy: dict, by_cell: dict) -> list[tuple[str, Path, Any]]:
    """The (caption, path, draw) items of one environment and gradient mode's plots."""
    tag = f"{env}_{mode}"
    items = [
        (f"Static law ({env}, {mode})", out / f"static_law_{tag}.png",
         lambda p: plot_static_law(p, env, mode, by_policy)),
        (f"Price check ({env}, {mode})", out / f"price_check_{tag}.png",
         lambda p: policy_panels(p, f"Price check: predicted vs realised ΔP ({env}, {mode})", by_policy,
                                 draw_price_check, "|realised ΔP|", "|predicted ΔP| = η·|NTCov_M(P, U)|", "xy")),
        (f"Price check residuals ({env}, {mode})", out / f"price_residual_{tag}.png",
         lambda p: policy_panels(p, f"Price check: relative residual (realised − predicted)/|predicted| of ΔP "
                                    f"({env}, {mode}); dashed: the first-order bound ±{FIRST_ORDER_TOLERANCE:g}",
                                 by_policy, draw_price_residual, "P before the update",
                                 "(realised − predicted)/|predicted|", "x")),
        (f"Escape times ({env}, {mode})", out / f"escape_{tag}.png",
         lambda p: policy_panels(p, f"Escape time T(p₀) to P = ½ ({env}, {mode})", by_policy,
                                 draw_escape(by_cell, env, mode), "p₀", "updates to reach P = ½", "xy")),
        (f"Extinction ({env}, {mode})", out / f"extinction_{tag}.png",
         lambda p: policy_panels(p, f"Extinction: P(t) when the behaviour is punished ({env}, {mode}); "
                                    "1/t decay is a line of slope −1 here, exponential decay bends down",
                                 by_policy, draw_extinction, "update t", "P", "xy")),
        (f"Price check across training ({env}, {mode})", out / f"eta_slope_{tag}.png",
         lambda p: policy_panels(p, f"Slope of the Price error against η at every probed update ({env}, "
                                    f"{mode}); 1 for a first-order prediction", by_policy, draw_eta_slope,
                                 "P before the update", "d log|error| / d log η", "x")),
        (f"Scale factor κ(t) ({env}, {mode})", out / f"kappa_{tag}.png",
         lambda p: policy_panels(p, f"Scale factor κ(t)/κ(0) = ‖∇z‖² over training ({env}, {mode})",
                                 by_policy, draw_kappa, "update t", "κ(t)/κ(0)")),
    ]
    if mode == "sampled":
        items.append((f"Gradient noise ({env}, {mode})", out / f"noise_{tag}.png",
                      lambda p: policy_panels(p, f"Spread of ΔP − E[ΔP] per decade of P ({env}, {mode}): realised "
                                                 "against the minibatch and the isotropic noise model", by_policy,
                                              draw_noise, "P", "spread of ΔP", "xy")))
    return items


def draw_items(out: Path, items: Sequence[tuple[str, Path, Any]]) -> list[tuple[str, Path]]:
    """Draw each (caption, path, draw) item into ``out``, each path refused if ntrl did not write it
    and recorded before it is written (see write_report); a plot that cannot be drawn is left out
    with a warning. Returns the (caption, path) pairs drawn, in the items' order. Where this
    machine has a second core, a forked helper process draws every other item meanwhile
    (:func:`draw_with_helper`)."""
    from ntrl.run_dirs import record_written_files, refuse_foreign_targets

    refuse_foreign_targets(out, [path.name for _, path, _ in items])
    record_written_files(out, [path for _, path, _ in items])
    parallel = len(items) >= 2 and (os.cpu_count() or 1) >= 2 and hasattr(os, "fork")
    errors = draw_with_helper(items) if parallel else {i: draw_item(*items[i]) for i in range(len(items))}
    plots = []
    for i, (caption, path, _) in enumerate(items):
        if errors[i] is not None:  # e.g. nothing positive to put on a log axis in a degenerate grid
            print(f"ntrl: warning: the plot {path.name} was left out: {errors[i]}", file=sys.stderr)
            continue
        plots.append((caption, path))
    return plots


def draw_item(caption: str, path: Path, draw: Any) -> str | None:
    """Draw one plot: None, or why it could not be drawn (a ValueError's message)."""
    try:
        draw(path)
    except ValueError as e:
        import matplotlib.pyplot as plt

        plt.close("all")
        return str(e)
    return None


HELPER_GRACE_S = 60.0  # the least time the plotting helper gets beyond this process's share


def draw_with_helper(items: Sequence[tuple[str, Path, Any]]) -> dict[int, str | None]:
    """:func:`draw_item` of every item, the odd-numbered ones in a forked child process (it shares
    this process's data as it stands, so nothing is pickled) while this one draws the others: the
    plots take about half the time on two cores. The child answers through a pipe with what it
    drew; whatever it did not draw (it died, could not fork, or took more than five times as long
    as this process and at least :data:`HELPER_GRACE_S`, and was stopped) is drawn here after it.
    A Ctrl-C here stops the child before it is raised."""
    import json
    import select
    import signal
    import time

    mine, theirs = list(range(0, len(items), 2)), list(range(1, len(items), 2))
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        return {i: draw_item(*items[i]) for i in range(len(items))}
    if pid == 0:  # the child: draw, answer, and leave without running anything of the parent's
        code = 1
        try:
            os.close(read_end)
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a Ctrl-C ends it; the parent reports it
            answer = {i: draw_item(*items[i]) for i in theirs}
            with os.fdopen(write_end, "w", encoding="utf-8") as f:
                json.dump(answer, f)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    answers = os.fdopen(read_end, "rb")
    errors: dict[int, str | None] = {}
    try:
        start = time.monotonic()
        errors.update({i: draw_item(*items[i]) for i in mine})
        # the child draws as many plots as this process: one that takes far longer is stuck (a
        # lock some other thread held when it was forked); its plots are then drawn here
        deadline = time.monotonic() + max(HELPER_GRACE_S, 5 * (time.monotonic() - start))
        chunks = []
        while (left := deadline - time.monotonic()) > 0 and select.select([answers], [], [], left)[0]:
            chunk = os.read(answers.fileno(), 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        text = b"".join(chunks).decode("utf-8", "replace")
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pid = 0
    except BaseException:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raise
    finally:
        answers.close()
    try:
        errors.update({int(i): e for i, e in json.loads(text).items()})
    except ValueError:
        pass  # the child died before it answered: its plots are drawn below
    for i in theirs:
        if i not in errors:
            errors[i] = draw_item(*items[i])
    return errors


# ---------------------------------------------------------------------------- tables
VERDICT_COLUMNS = ["env", "policy", "optimizer", "mode", "verdict", "drift exponent", "escape", "extinction",
                   "static a (Euclid)", "static a (Fisher)", "Price R²", "η-slope", "first-order", "κ drift"]


def pct(x: float) -> str:
    return f"{x:.0%}" if math.isfinite(x) else "n/a"


def verdict_rows(cells: Sequence[CellResult]) -> list[list[str]]:
    """The verdict table: one row per cell (its first eight columns are what ``ntrl rarity`` prints)."""
    rows = []
    for c in sorted(cells, key=lambda c: c.cell):
        env, pol, opt, mode = c.cell
        rows.append([env, pol, opt, mode, c.verdict, c.drift.fmt(2), c.escape.fmt(), c.extinction.comparison.fmt(),
                     c.static_euc.fmt(2), c.static_fisher.fmt(2), f"{c.price.r2:.4f}", c.price.eta_slope.fmt(2),
                     f"{pct(c.price.outside)} outside; 95 % inside {c.price.first_order_text()}",
                     pct(c.kappa["median_drift"])])
    return rows


EXTINCTION_COLUMNS = ["cell", "decades fallen", "window (points)", "log–log exponent", "B / κΔη", "models (AICc)",
                      "floor P∞", "late rate of log P (Adam)", "derived −½ ln β₂"]


def extinction_rows(cells: Sequence[CellResult]) -> list[list[str]]:
    rows = []
    for c in sorted(cells, key=lambda c: c.cell):
        e = c.extinction
        if not e.runs:
            continue
        rows.append([" / ".join(c.cell), f"{e.decades:.1f}", f"{e.window} ({e.points})", e.exponent.fmt(3),
                     e.B_ratio.fmt(3), e.comparison.fmt(), e.floor_verdict, e.rate.fmt_g(4),
                     f"{e.rate_derived:.4g}" if math.isfinite(e.rate_derived) else "—"])
    return rows


PRICE_COLUMNS = ["cell", "tracked updates", "R²", "median rel. error", "η-slope [95 %]", "η-slope by decade of P",
                 "outside first order", "95 % of probed updates first-order"]


def price_rows(cells: Sequence[CellResult]) -> list[list[str]]:
    rows = []
    for c in sorted(cells, key=lambda c: c.cell):
        p = c.price
        rows.append([" / ".join(c.cell), str(p.n), f"{p.r2:.4f}", f"{p.rel_err_median:.3g}", p.eta_slope.fmt(3),
                     ", ".join(f"{k}: {v:.2f}" for k, v in p.slope_by_p.items()), pct(p.outside),
                     p.first_order_text()])
    return rows


NOISE_TABLE_COLUMNS = ["cell", "a test?", "records", "sd(z), minibatch Σ", "skewness of z", "sd(z), isotropic Σ",
                       "corr(ΔP, ΔY)", "realised", "predicted (minibatch)", "predicted (isotropic)"]


def noise_rows_table(cells: Sequence[CellResult]) -> list[list[str]]:
    rows = []
    for c in sorted(cells, key=lambda c: c.cell):
        nz = c.price.noise
        if nz is None:
            continue
        rows.append([" / ".join(c.cell), "yes (SGD)" if nz.exact_in_distribution else "no: M depends on the batch",
                     str(nz.n), nz.z_sd.fmt(2), f"{nz.z_skew:.2f}", nz.z_sd_iso.fmt_g(3), f"Y = {nz.partner}",
                     f"{nz.corr_real:.3f}", f"{nz.corr_pred:.3f}", f"{nz.corr_pred_iso:.3f}"])
    return rows


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        path.write_text("")
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))  # every row's columns, in order of appearance
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table for the terminal."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(x).replace("|", "\\|") for x in r) + " |" for r in rows]
    return "\n".join(out)


WELL_EXPLANATION = f"""How to read the gravity well: each cell trains the three-armed bandit with rewards (1, 0.9, 0)
from π₀ = (p₀, 0.95 − p₀, 0.05) with exact gradients until the rare best arm reaches ½. A cell is
a "gravity well" when, at the grid's smallest p₀, P fell to p₀/{WELL_FACTOR:g} or lower before it
escaped (Mei et al., NeurIPS 2020: vanilla PG on softmax logits, d log P/dt = P(1 − J) − Σ_b π_b²(r_b − J) < 0
while P is small); "no well" when it escaped without such a dip; "inconclusive" when that run is
missing, or ended before escaping without such a dip. NPG and the escort policy (π_a ∝ θ_a², vanilla
PG on θ) are predicted never to fall."""

EXPLANATION = f"""\
**How to read the verdicts.** Each piece of evidence votes for one law, for neither, or is
inconclusive. The *drift exponent* (E[ΔP]/η against p) votes p² when its 95 % interval lies within
2 ± {LAW_MARGIN}, p(1 − p) within 1 ± {LAW_MARGIN}, neither when the interval meets neither window, and
is inconclusive when it is too wide to tell. The *escape time* T(p₀) is judged on at least {MIN_P0S}
values of p₀ (on p₀ ≤ {SMALL_P0:g} when the grid has that many there: both laws are asymptotic in
p₀ → 0): a power law against a logarithm, and in sampled cells also the wait for sampled
successes, T = c/(1 − (1 − p₀)^B), all fitted to log T and compared by AICc with the number of
points n shown. A power law of slope −1 ± {LAW_MARGIN} votes p², a logarithm p(1 − p); a waiting-time
win casts no vote (it is the sampling that sets T, and it says so); a ΔAICc below {MIN_DELTA_AIC:g} is
inconclusive, and so do rewarded runs that never reached ½ within the run length. *Extinction* is fitted in the
punished runs' asymptotic window (P ≤ P(0)·10^-{WINDOW_DECADES:g}; for Adam also
t ≥ {ADAM_LATE_MEMORIES:g}/(1 − β₂)): 1/(A + Bt) votes p², an exponential p(1 − p), a floor
P∞ + 1/(A + Bt) neither, by AICc in at least 2/3 of the runs (else inconclusive).

A cell is **consistent with** a law when its votes name that law only, and either nothing is
inconclusive or at least two pieces agree. It is **neither** when a piece disagrees with both laws
or the pieces name different laws: the evidence table says which; such a finding is a result, not
a bug. It is **inconclusive** when there is not enough evidence to decide (too few p₀ values,
intervals too wide, ΔAICc below {MIN_DELTA_AIC:g}, one agreeing piece against inconclusive ones).

Intervals are bootstraps over seeds within each p₀; a deterministic cell (one seed) gets its
fit's t-interval instead. Static exponents are the small-p exponent a of NTVar(P) ≈ c·p^a(1 − p)^b
in the Euclidean and the Fisher metric (theory: 2 and 1 for every network, since
NTVar(p) = p²(1 − p)²·κ and NTVar_F⁻¹(p) = p(1 − p)). "Price R²" is the fraction of the variance
of the realised ΔP explained by the predicted η·NTCov_M(P, U). The "η-slope" is the median, over
every probed update of the cell, of the slope of log |relative error| against log η when the
update is replayed at η·s (1 for a first-order prediction); "first-order" gives the share of
tracked updates whose |realised − predicted| exceeded {FIRST_ORDER_TOLERANCE:g}·|predicted| and the largest
multiple of η at which every probed update stays inside that bound. "κ drift" is the median over
runs of the largest relative change of κ = ‖∇z‖² (below 10 %: the network stayed lazy).

**Extinction table.** The log–log exponent of P(t) in the window (−1 for the p² law), B of the
1/t law against κΔη from the tracked κ and the reward gap Δ, the three models' AICc differences,
and the floor: *no equilibrium rarity* when every run's 95 % profile-likelihood interval of P∞
includes 0 and lies below {FLOOR_FRACTION:g}·P_final. For Adam, the late-time rate of log P against the
derived −½ ln β₂ (README, "Adam's late-time decay").

**Noise table** (sampled cells). z = (ΔP − E[ΔP])/s with E[ΔP] = η∇P·M∇J from the exact gradient
and s the predicted spread of ΔP from the batch's per-episode gradients (RMS per decade of P): sd(z)
≈ 1 when the minibatch noise model holds; the same with the isotropic model Σ = (tr Σ/P)·I; and
the correlation of the changes of P and of the second tracked property Y over the rewarded runs
(R on the bandit, where it is 1 under every model since R is affine in P; F on the juice
gridworld). Only the SGD rows
are a test: for sign descent, Adam (which steps along m̂) and NPG the metric depends on the batch.
"""


REPORT_FILES = ("verdicts.csv", "runs.csv", "well.csv", "report.md", "report.html")


# The report's style: tables and figures scroll inside their own box on a narrow screen, so the
# page itself never scrolls sideways; on a phone a figure keeps 900 px, so its text stays readable.
REPORT_CSS = """
body{font-family:system-ui,sans-serif;max-width:1400px;margin:1.5em auto;padding:0 1em;line-height:1.45;
     overflow-wrap:anywhere}
.scroll,.figure{overflow-x:auto;max-width:100%;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top;overflow-wrap:normal}
th{background:#eee;white-space:nowrap}
.figure img{max-width:100%;height:auto;display:block}
@media (max-width:700px){.figure img{max-width:none;width:900px}table{font-size:12px}}
table.verdicts td{white-space:nowrap}table.evidence td:last-child{min-width:24em}
td.verdict{font-weight:bold;white-space:nowrap}
td.v-p2{background:#ffe3c2}td.v-p1{background:#d6e9ff}td.v-neither{background:#f6cfcf}
td.v-inconclusive{background:#eeeeee}td.v-well{background:#ffe3c2}td.v-nowell{background:#d6e9ff}
"""


def verdict_class(verdict: str) -> str:
    """The CSS class that colours a verdict cell."""
    v = verdict.lower()
    if "gravity well" in v:
        return "v-well"
    if "no well" in v:
        return "v-nowell"
    if "p(1 − p)" in v:
        return "v-p1"
    if "p²" in v:
        return "v-p2"
    return "v-inconclusive" if "inconclusive" in v else "v-neither"


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "", verdict_col: int | None = None) -> str:
    """An HTML table in its own horizontally scrolling box; the ``verdict_col`` cells coloured by verdict."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)

    def cell(i: int, x: Any) -> str:
        if i == verdict_col:
            return f"<td class='verdict {verdict_class(str(x))}'>{html.escape(str(x))}</td>"
        return f"<td>{html.escape(str(x))}</td>"

    body = "".join("<tr>" + "".join(cell(i, x) for i, x in enumerate(r)) + "</tr>" for r in rows)
    return f"<div class='scroll'><table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def render_markdown(text: str) -> str:
    """Markdown to HTML with markdown-it-py (CommonMark; raw HTML in the text is escaped)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).render(text)


def write_report(study_dir: Path, study, runs: Sequence[RunData], cells: Sequence[CellResult],
                 well_cells: Sequence[WellCell] = ()) -> dict[str, Path]:
    """Write plots, CSVs, report.md and report.html into ``study_dir``; return their paths.
    ``well_cells``: the gravity well's verdicts (:func:`ntrl.study.well.analyse_well`)."""
    from ntrl.run_dirs import record_written_files, refuse_foreign_targets

    refuse_foreign_targets(study_dir, list(REPORT_FILES))  # and each plot, before it is drawn (make_plots)
    record_written_files(study_dir, [study_dir / n for n in REPORT_FILES])  # before writing: a report cut
    # short by Ctrl-C leaves only files the marker names
    plots = make_plots(runs, cells, study_dir, well_cells)
    write_csv(study_dir / "verdicts.csv", [c.row() for c in sorted(cells, key=lambda c: c.cell)])
    write_csv(study_dir / "runs.csv", [
        {**r.spec.__dict__, "run_id": r.spec.run_id, "updates": r.summary["updates"], "p_start": r.summary["p_start"],
         "p_end": r.summary["p_end"], "escape_time": r.summary.get("crossed_half_at"),
         "price_r2": r.summary["price_check_P"]["r2"]}
        for r in runs
    ])
    rows = verdict_rows(cells)
    reasons = [[" / ".join(c.cell), c.verdict, c.reason] for c in sorted(cells, key=lambda c: c.cell)]
    sections = [("Extinction", EXTINCTION_COLUMNS, extinction_rows(cells)),
                ("Price check across training", PRICE_COLUMNS, price_rows(cells)),
                ("Gradient noise (sampled cells)", NOISE_TABLE_COLUMNS, noise_rows_table(cells))]
    sections.append((WELL_TITLE, WELL_COLUMNS, well_rows(well_cells)))
    sections = [(title, cols, rs) for title, cols, rs in sections if rs]
    if well_cells:
        write_csv(study_dir / "well.csv", [c.row() for c in well_cells])
    md = [f"# Rarity study `{study.name}`", "",
          f"{len(runs)} runs; p₀ ∈ {study.p0s}; seeds {study.seeds}; extinction from P = {study.extinction_p0}"
          + (f"; gravity well from p₀ ∈ {study.well_p0s}" if study.well_p0s else "") + ".", "",
          "## Verdicts", "", md_table(VERDICT_COLUMNS, rows), "", EXPLANATION, "",
          "## Evidence behind each verdict", "", md_table(["cell", "verdict", "evidence"], reasons), ""]
    for title, cols, rs in sections:
        md += [f"## {title}", "", md_table(cols, rs), ""]
    for caption, path in plots:
        md += [f"## {caption}", "", f"![{caption}]({path.name})", ""]
    if well_cells:
        md += [f"## {WELL_TITLE}: verdicts", "", md_table(WELL_VERDICT_COLUMNS, well_verdicts(well_cells)), "",
               WELL_EXPLANATION, ""]
    md += ["## Files", "", "- `verdicts.csv`: every fitted number per cell, with interval bounds",
           *(["- `well.csv`: the gravity well's numbers per cell and p₀"] if well_cells else []),
           "- `runs.csv`: one line per run", "- `runs/<run>/records.jsonl`: every tracked update", ""]
    (study_dir / "report.md").write_text("\n".join(md), encoding="utf-8")

    imgs = "".join(
        f"<h2>{html.escape(c)}</h2><div class='figure'><img alt='{html.escape(c)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}'/></div>" for c, p in plots
    )
    well_html = "" if not well_cells else (
        f"<h2>{html.escape(WELL_TITLE)}: verdicts</h2>"
        + html_table(WELL_VERDICT_COLUMNS, well_verdicts(well_cells), "evidence", verdict_col=2)
        + render_markdown(WELL_EXPLANATION))
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ntrl rarity study {html.escape(study.name)}</title>
<style>{REPORT_CSS}</style></head><body>
<h1>Rarity study <code>{html.escape(study.name)}</code></h1>
<p>{len(runs)} runs; p₀ ∈ {html.escape(str(study.p0s))}; seeds {study.seeds}{html.escape(
    f"; gravity well from p₀ ∈ {study.well_p0s}" if study.well_p0s else "")}.</p>
<h2>Verdicts</h2>{html_table(VERDICT_COLUMNS, rows, "verdicts", verdict_col=4)}{render_markdown(EXPLANATION)}
<h2>Evidence behind each verdict</h2>{html_table(["cell", "verdict", "evidence"], reasons, "evidence", verdict_col=1)}
{"".join(f"<h2>{html.escape(title)}</h2>{html_table(cols, rs)}" for title, cols, rs in sections)}
{well_html}{imgs}</body></html>"""
    (study_dir / "report.html").write_text(page, encoding="utf-8")
    return {"md": study_dir / "report.md", "html": study_dir / "report.html", "csv": study_dir / "verdicts.csv",
            **{p.stem: p for _, p in plots}}


RESIDUAL_COLUMNS = ["env", "mode", "policy", "optimizer", "run", "update", "P", "predicted", "realised",
                    "relative_residual"]


def residual_rows(env: str, mode: str, policy: str, optimizer: str, runs: Sequence[RunData]) -> list[list[Any]]:
    """Every record of a cell with a realised ΔP (:func:`residual_points`), as rows of
    :data:`RESIDUAL_COLUMNS`; beyond :data:`RESIDUAL_POINTS`, the plot's uniform random subsample
    (seed 0, :func:`subsample`)."""
    pts = residual_points(runs)
    return [[env, mode, policy, optimizer, *pts[i]] for i in subsample(len(pts))]


def numeric_verdict_rows(cells: Sequence[CellResult]) -> tuple[list[str], list[list[Any]]]:
    """The verdict table with numbers as numbers (each estimate with its low and high bound, as in
    verdicts.csv) and the verdict as its own column; NaN and ±inf become empty cells."""
    rows = [c.row() for c in sorted(cells, key=lambda c: c.cell)]
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)

    return cols, [[clean(r.get(k)) for k in cols] for r in rows]
