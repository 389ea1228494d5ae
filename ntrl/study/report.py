"""The rarity report: PNG plots, CSV tables, report.md, a self-contained report.html, and a
W&B summary run carrying the verdict table and the key charts.
"""

from __future__ import annotations

import base64
import csv
import html
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ntrl.study.analysis import LAW_MARGIN, MIN_DELTA_AIC, SMALL_P0, CellResult, RunData, escape_data, kappa_of

OPT_COLORS = {"sgd": "#1f77b4", "npg": "#d62728", "sign": "#2ca02c", "adam": "#9467bd"}


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
        out.setdefault((s.env, s.mode), {}).setdefault(s.policy, {}).setdefault(s.optimizer, []).append(r)
    return out


def _grid(plt, n_rows: int, n_cols: int, title: str):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.6 * n_cols, 3.6 * n_rows), squeeze=False)
    fig.suptitle(title)
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
            for opt, rs in sorted(by_policy[pol].items()):
                p = [rec["P/value"] for r in rs if r.spec.direction == "rewarded" for rec in r.records if key in rec]
                y = [rec[key] for r in rs if r.spec.direction == "rewarded" for rec in r.records if key in rec]
                ax.loglog(p, y, ".", ms=2.5, alpha=0.6, color=OPT_COLORS.get(opt), label=opt)
                allp += p
                ally += y
            if allp:
                grid = np.logspace(np.log10(min(allp)), np.log10(max(allp)), 50)
                k = int(np.argmin(np.abs(np.log(allp) - np.median(np.log(allp)))))
                p_ref, y_ref = allp[k], ally[k]
                for law, f, style in (("∝ p²(1−p)²", lambda q: (q * (1 - q)) ** 2, "k--"),
                                      ("∝ p(1−p)", lambda q: q * (1 - q), "k:")):
                    ax.loglog(grid, y_ref * f(grid) / f(p_ref), style, lw=1, label=law)
            ax.set_title(f"{pol}: {label}")
            ax.set_xlabel("p")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
        ax.set_yscale("log" if "y" in log else "linear")
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
        ax.plot(np.abs(real[ok]), np.abs(pred[ok]), ".", ms=2.5, alpha=0.6, color=OPT_COLORS.get(opt), label=opt)
        if ok.any():
            lo, hi = min(lo, np.abs(real[ok]).min()), max(hi, np.abs(real[ok]).max())
    if np.isfinite(lo):
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="predicted = realised")


def draw_escape(cells: dict, env: str, mode: str):
    """T(p₀) per optimizer with the fitted winning model."""

    def draw(ax, pol, by_opt) -> None:
        for opt, rs in sorted(by_opt.items()):
            p0, T = escape_data([r for r in rs if r.spec.direction == "rewarded"])
            if not len(p0):
                continue
            color = OPT_COLORS.get(opt)
            ax.plot(p0, T, "o", ms=4, alpha=0.7, color=color)
            c = cells.get((env, pol, opt, mode))
            if c is not None and c.escape.n:
                grid = np.logspace(np.log10(p0.min()), np.log10(p0.max()), 40)
                pr = c.escape.params
                if c.escape.winner == "power law":
                    ok = np.isfinite(T)
                    fit = np.exp(np.polyfit(np.log(p0[ok]), np.log(T[ok]), 1)[1]) * grid ** pr["slope"]
                else:
                    fit = pr["A"] + pr["B"] * np.log(1 / grid)
                ax.plot(grid, fit, "-", color=color, lw=1, label=f"{opt}: {c.escape.winner}")

    return draw


def draw_extinction(ax, pol, by_opt) -> None:
    """P(t) of every punished run."""
    for opt, rs in sorted(by_opt.items()):
        first = True
        for r in rs:
            if r.spec.direction != "punished":
                continue
            ax.plot([rec["update"] for rec in r.records], [rec["P/value"] for rec in r.records], "-", lw=1,
                    alpha=0.7, color=OPT_COLORS.get(opt), label=opt if first else None)
            first = False


def draw_kappa(ax, pol, by_opt) -> None:
    """κ(t)/κ(0) of every run."""
    for opt, rs in sorted(by_opt.items()):
        first = True
        for r in rs:
            k = [kappa_of(rec) for rec in r.records if "kappa" in rec]
            t = [rec["update"] for rec in r.records if "kappa" in rec]
            if k and k[0] > 0:
                ax.plot(t, np.array(k) / k[0], "-", lw=0.8, alpha=0.6, color=OPT_COLORS.get(opt),
                        label=opt if first else None)
                first = False


def make_plots(runs: Sequence[RunData], cells: Sequence[CellResult], out: Path) -> list[tuple[str, Path]]:
    """Every plot of the report; returns (caption, path) pairs in report order."""
    by_cell = {c.cell: c for c in cells}
    plots = []
    for (env, mode), by_policy in sorted(_groups(runs).items()):
        tag = f"{env}_{mode}"
        items = [
            (f"Static law ({env}, {mode})", out / f"static_law_{tag}.png",
             lambda p: plot_static_law(p, env, mode, by_policy)),
            (f"Price check ({env}, {mode})", out / f"price_check_{tag}.png",
             lambda p: policy_panels(p, f"Price check: predicted vs realised ΔP ({env}, {mode})", by_policy,
                                     draw_price_check, "|realised ΔP|", "|predicted ΔP| = η·|NTCov_M(P, U)|", "xy")),
            (f"Escape times ({env}, {mode})", out / f"escape_{tag}.png",
             lambda p: policy_panels(p, f"Escape time T(p₀) to P = ½ ({env}, {mode})", by_policy,
                                     draw_escape(by_cell, env, mode), "p₀", "updates to reach P = ½", "xy")),
            (f"Extinction ({env}, {mode})", out / f"extinction_{tag}.png",
             lambda p: policy_panels(p, f"Extinction: P(t) when the behaviour is punished ({env}, {mode}); "
                                        "exponential decay is a straight line here", by_policy,
                                     draw_extinction, "update t", "P", "y")),
            (f"Scale factor κ(t) ({env}, {mode})", out / f"kappa_{tag}.png",
             lambda p: policy_panels(p, f"Scale factor κ(t)/κ(0) = ‖∇z‖² over training ({env}, {mode})",
                                     by_policy, draw_kappa, "update t", "κ(t)/κ(0)")),
        ]
        from ntrl.run_dirs import record_written_files, refuse_foreign_targets

        refuse_foreign_targets(out, [path.name for _, path, _ in items])
        record_written_files(out, [path for _, path, _ in items])  # recorded before written (see write_report)
        for caption, path, draw in items:
            try:
                draw(path)
            except ValueError as e:  # e.g. nothing positive to put on a log axis in a degenerate grid
                import matplotlib.pyplot as plt

                plt.close("all")
                print(f"ntrl: warning: the plot {path.name} was left out: {e}", file=sys.stderr)
                continue
            plots.append((caption, path))
    return plots


# ---------------------------------------------------------------------------- tables
VERDICT_COLUMNS = ["env", "policy", "optimizer", "mode", "verdict", "drift exponent", "escape", "extinction",
                   "static a (Euclid)", "static a (Fisher)", "Price R²", "κ drift"]


def verdict_rows(cells: Sequence[CellResult]) -> list[list[str]]:
    rows = []
    for c in sorted(cells, key=lambda c: c.cell):
        env, pol, opt, mode = c.cell
        rows.append([env, pol, opt, mode, c.verdict, c.drift.fmt(2), c.escape.fmt(), c.extinction.fmt(),
                     c.static_euc.fmt(2), c.static_fisher.fmt(2), f"{c.price['r2']:.4f}",
                     f"{c.kappa['median_drift']:.0%}" if math.isfinite(c.kappa["median_drift"]) else "n/a"])
    return rows


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        path.write_text("")
        return
    keys = list(rows[0].keys())
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


EXPLANATION = f"""\
**How to read the verdicts.** A cell is *consistent with p²* when every available piece of
evidence points to the Euclidean law dP/dt ∝ p²(1 − p)²·κ: the 95 % interval of the drift
exponent (E[ΔP]/η against p) lies within ±{LAW_MARGIN} of 2; the escape time T(p₀) is better
described by a power law than by a logarithm, by ΔAIC ≥ {MIN_DELTA_AIC:g}, with a log–log slope
whose interval lies within −1 ± {LAW_MARGIN} (both fitted on p₀ ≤ {SMALL_P0:g} when the grid has
three such values, since both laws are asymptotic in p₀ → 0); and a punished behaviour fades like 1/t rather
than exponentially (AIC, in at least 2/3 of the runs). It is *consistent with p(1 − p)* when the
exponent is within ±{LAW_MARGIN} of 1, T(p₀) is logarithmic and extinction is exponential. A
ΔAIC below {MIN_DELTA_AIC:g} is no evidence either way; rewarded runs that never reached ½ within
the run length make the escape evidence "neither". Anything else is *neither*, and the evidence
table says which pieces disagree: such a finding is a result, not a bug. Intervals are
bootstraps over seeds within each p₀; a deterministic cell (one seed) gets the regression's
t-interval instead. Static exponents are the small-p exponent a of NTVar(P) ≈ c·p^a(1 − p)^b in
the Euclidean and the Fisher metric (theory: 2 and 1 for every network, since
NTVar(p) = p²(1 − p)²·κ and NTVar_F⁻¹(p) = p(1 − p)). "Price R²" is the fraction of the variance
of the realised ΔP explained by the predicted η·NTCov_M(P, U); "κ drift" is the median over runs
of the largest relative change of κ = ‖∇z‖² (below 10 %: the network stayed lazy).
"""


REPORT_FILES = ("verdicts.csv", "runs.csv", "report.md", "report.html")


def write_report(study_dir: Path, study, runs: Sequence[RunData], cells: Sequence[CellResult]) -> dict[str, Path]:
    """Write plots, CSVs, report.md and report.html into ``study_dir``; return their paths."""
    from ntrl.run_dirs import record_written_files, refuse_foreign_targets

    refuse_foreign_targets(study_dir, list(REPORT_FILES))  # and each plot, before it is drawn (make_plots)
    record_written_files(study_dir, [study_dir / n for n in REPORT_FILES])  # before writing: a report cut
    # short by Ctrl-C leaves only files the marker names
    plots = make_plots(runs, cells, study_dir)
    write_csv(study_dir / "verdicts.csv", [c.row() for c in sorted(cells, key=lambda c: c.cell)])
    write_csv(study_dir / "runs.csv", [
        {**r.spec.__dict__, "run_id": r.spec.run_id, "updates": r.summary["updates"], "p_start": r.summary["p_start"],
         "p_end": r.summary["p_end"], "escape_time": r.summary.get("crossed_half_at"),
         "price_r2": r.summary["price_check_P"]["r2"]}
        for r in runs
    ])
    rows = verdict_rows(cells)
    reasons = [[" / ".join(c.cell), c.verdict, c.reason] for c in sorted(cells, key=lambda c: c.cell)]
    md = [f"# Rarity study `{study.name}`", "",
          f"{len(runs)} runs; p₀ ∈ {study.p0s}; seeds {study.seeds}; extinction from P = {study.extinction_p0}.", "",
          "## Verdicts", "", md_table(VERDICT_COLUMNS, rows), "", EXPLANATION, "",
          "## Evidence behind each verdict", "", md_table(["cell", "verdict", "evidence"], reasons), ""]
    for caption, path in plots:
        md += [f"## {caption}", "", f"![{caption}]({path.name})", ""]
    md += ["## Files", "", "- `verdicts.csv`: every fitted number per cell, with interval bounds",
           "- `runs.csv`: one line per run", "- `runs/<run>/records.jsonl`: every tracked update", ""]
    (study_dir / "report.md").write_text("\n".join(md), encoding="utf-8")

    def h_table(header, rows):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    imgs = "".join(
        f"<h2>{html.escape(c)}</h2><img alt='{html.escape(c)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}'/>" for c, p in plots
    )
    explanation = html.escape(EXPLANATION).replace("**", "")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>ntrl rarity study {html.escape(study.name)}</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}}th{{background:#eee}}img{{max-width:100%}}
td:nth-child(5){{font-weight:bold}}</style></head><body>
<h1>Rarity study <code>{html.escape(study.name)}</code></h1>
<p>{len(runs)} runs; p₀ ∈ {html.escape(str(study.p0s))}; seeds {study.seeds}.</p>
<h2>Verdicts</h2>{h_table(VERDICT_COLUMNS, rows)}<p>{explanation}</p>
<h2>Evidence behind each verdict</h2>{h_table(["cell", "verdict", "evidence"], reasons)}
{imgs}</body></html>"""
    (study_dir / "report.html").write_text(page, encoding="utf-8")
    from ntrl.run_dirs import record_written_files

    return {"md": study_dir / "report.md", "html": study_dir / "report.html", "csv": study_dir / "verdicts.csv",
            **{p.stem: p for _, p in plots}}


def log_summary_run(study_dir: Path, study, runs: Sequence[RunData], cells: Sequence[CellResult],
                    mode: str = "offline") -> str | None:
    """A W&B summary run in the study's group: the verdict table as a wandb.Table, T(p₀) as a
    line series, predicted-vs-realised ΔP as a scatter, and the report's PNGs as images."""
    if mode == "disabled":
        return None
    import wandb

    from ntrl.run_dirs import ntrl_wandb_dir
    from ntrl.wandb_sink import WandbSink

    if ntrl_wandb_dir(study_dir) is None:  # it has said why
        return None
    sink = WandbSink(study_dir, study.to_dict(), mode=mode, name=f"{study.name}-summary", group=study.name,
                     job_type="summary")
    run = sink.run
    if run is None:  # W&B could not start; it has said why
        return None
    table = wandb.Table(columns=VERDICT_COLUMNS, data=verdict_rows(cells))
    data: dict[str, Any] = {"verdicts": table}
    for (env, gmode), by_policy in sorted(_groups(runs).items()):
        for pol, by_opt in sorted(by_policy.items()):
            xs, ys, keys = [], [], []
            for opt, rs in sorted(by_opt.items()):
                p0, T = escape_data([r for r in rs if r.spec.direction == "rewarded"])
                if not len(p0):
                    continue
                uniq = sorted(set(p0.tolist()))
                xs.append(uniq)
                ys.append([float(np.nanmedian(T[p0 == u])) for u in uniq])
                keys.append(opt)
            if keys:
                data[f"escape/{env}_{gmode}_{pol}"] = wandb.plot.line_series(
                    xs=xs, ys=ys, keys=keys, title=f"T(p0), {env} {gmode} {pol} (median over seeds)", xname="p0")
            pts = [[rec["P/pred_delta"], rec["P/real_delta"], opt] for opt, rs in sorted(by_opt.items())
                   for r in rs for rec in r.records[:200] if "P/real_delta" in rec]
            if pts:
                t = wandb.Table(columns=["predicted", "realised", "optimizer"], data=pts)
                data[f"price_check/{env}_{gmode}_{pol}"] = wandb.plot.scatter(
                    t, "realised", "predicted", title=f"predicted vs realised ΔP, {env} {gmode} {pol}")
    for png in sorted(study_dir.glob("*.png")):
        data[f"plots/{png.stem}"] = wandb.Image(str(png))
    directory = sink.directory
    try:
        run.log(data)
        for c in cells:
            run.summary[f"verdict/{'/'.join(c.cell)}"] = c.verdict
    except Exception as e:
        sink.lost("logging the summary run", e)
        return None
    sink.finish()
    return directory
