"""The rarity study on a small grid: the expected outcomes of SCIENCE.md §3 (issue 4).

Single-logit policy with exact gradients: every quantity follows from the closed forms, so
the tolerances come from the math. The escape time of the p² law is T(p₀) = (u₀ + 2 ln u₀ − 1/u₀)/(ηκΔ)
with u₀ = (1 − p₀)/p₀; over the grid's five p₀ its log–log slope is −0.957 (it tends to −1 as
p₀ → 0), and a discrete run is within a step of it: at η = 0.5 the shortest escape is 25 updates,
so the measured slope is within 0.02 of the closed form's.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ntrl.study.analysis import analyse, load_study
from ntrl.config import ConfigError
from ntrl.study.rarity import analyse_and_report
from ntrl.study import StudyConfig, enumerate_runs, run_study
from ntrl.study.grid import DEFAULT_LRS
from ntrl.wandb_sink import read_offline_run

P0S = [5e-2, 1e-2, 5e-3, 1e-3, 5e-4]
GRID = dict(name="t", envs=["bandit"], policies=["single_logit"], optimizers=["sgd", "npg", "sign"],
            modes=["exact"], p0s=P0S, seeds=5, extinction_decades=3.0, extinction_steps=20_000, track_every=5,
            lrs={**DEFAULT_LRS, "bandit": {**DEFAULT_LRS["bandit"],
                                           "single_logit": {**DEFAULT_LRS["bandit"]["single_logit"], "sgd": 0.5}}})


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    study = StudyConfig(**GRID).validate()
    run_study(study, out, workers=2, wandb_mode="disabled", progress=False)
    return out


@pytest.fixture(scope="module")
def cells(study_dir):
    _, runs = load_study(study_dir)
    return {c.cell[2]: c for c in analyse(runs, 32)}


def test_deterministic_cells_run_one_seed(study_dir):
    study, runs = load_study(study_dir)
    assert len(runs) == len(enumerate_runs(study)) == 3 * (5 + 1)


def test_static_law_exponents(cells):
    sgd = cells["sgd"]
    assert sgd.static_euc.value == pytest.approx(2.0, abs=0.05)
    assert sgd.static_fisher.value == pytest.approx(1.0, abs=0.05)
    assert sgd.drift.value == pytest.approx(2.0, abs=0.05)
    for opt in ("npg", "sign"):
        assert cells[opt].drift.value == pytest.approx(1.0, abs=0.05)


def test_escape_time_laws(cells):
    sgd = cells["sgd"]
    assert sgd.escape.winner == "power law" and sgd.escape.n == 5 and sgd.escape.params["p0s"] == 5
    p0 = np.array(P0S)
    u0 = (1 - p0) / p0
    closed_form = np.polyfit(np.log(p0), np.log(u0 + 2 * np.log(u0) - 1 / u0), 1)[0]
    assert closed_form == pytest.approx(-0.957, abs=1e-3)
    assert sgd.escape_slope.value == pytest.approx(closed_form, abs=0.02)
    for opt in ("npg", "sign"):
        assert cells[opt].escape.winner == "logarithmic"


def test_extinction_laws(cells):
    sgd = cells["sgd"].extinction
    assert sgd.comparison.winner == "1/t" and sgd.decades >= 3.0
    assert sgd.exponent.value == pytest.approx(-1.0, abs=0.01)  # the window's local slopes lie in [−1, −0.99]
    assert sgd.B_ratio.value == pytest.approx(1.0, abs=0.01)  # B = κΔη
    assert sgd.floor_verdict.startswith("no equilibrium rarity")
    assert cells["npg"].extinction.comparison.winner == "exponential"
    assert cells["sign"].extinction.comparison.winner == "exponential"


def test_verdicts(cells):
    assert cells["sgd"].verdict == "consistent with p²"
    assert cells["npg"].verdict == "consistent with p(1 − p)"
    assert cells["sign"].verdict == "consistent with p(1 − p)"


def test_price_error_scales_with_eta(cells):
    # the first-order prediction's relative error is O(η): slope 1 in log–log, along the trajectories
    for c in cells.values():
        assert c.price.eta_slope.value == pytest.approx(1.0, abs=0.1)
        assert c.price.n > 0 and np.isfinite(c.price.r2)
        assert len(c.price.slope_by_p) >= 3  # read per decade of P, over the whole trajectory


def test_report_files(study_dir, capsys):
    paths = analyse_and_report(study_dir, wandb_mode="disabled")
    assert capsys.readouterr().err == ""  # quiet unless asked
    analyse_and_report(study_dir, wandb_mode="disabled", progress=True)
    said = capsys.readouterr().err  # what it is doing, after the runs' progress bar, step by step
    assert said.index("reading the runs") < said.index(" runs (fits and bootstrap") < said.index("writing the report")
    assert "W&B" not in said  # no summary run with W&B disabled
    html = (study_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 5 and "src='http" not in html and 'src="http' not in html
    md = (study_dir / "report.md").read_text()
    assert md.index("## Verdicts") < md.index("![")  # the verdict table comes first
    assert "consistent with p²" in md
    for name in ("static_law", "price_check", "escape", "extinction", "eta_slope", "kappa"):
        assert (study_dir / f"{name}_bandit_exact.png").stat().st_size > 10_000
    rows = (study_dir / "verdicts.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("env,policy,optimizer,mode,verdict")
    assert "consistent with p²" in paths["table"]


def test_resume_skips_completed_runs(study_dir):
    study = StudyConfig(**GRID)
    runs = study_dir / "runs"
    victim = enumerate_runs(study)[0].run_id
    (runs / victim / "summary.json").unlink()
    before = {p.name: (p / "records.jsonl").stat().st_mtime_ns for p in runs.iterdir() if p.name != victim}
    run_study(study, study_dir, workers=1, wandb_mode="disabled", progress=False)
    after = {p.name: (p / "records.jsonl").stat().st_mtime_ns for p in runs.iterdir() if p.name != victim}
    assert before == after
    assert json.loads((runs / victim / "summary.json").read_text())["status"] in ("finished", "stopped_at_p",
                                                                                  "stopped_below_p")


def test_different_config_is_refused_without_force(study_dir, tmp_path):
    other = StudyConfig(**{**GRID, "seeds": 2})
    snapshot = (study_dir / "study.json").read_text()
    n_runs = len(list((study_dir / "runs").iterdir()))
    with pytest.raises(ConfigError, match="--force"):
        run_study(other, study_dir, workers=1, wandb_mode="disabled", progress=False)
    assert (study_dir / "study.json").read_text() == snapshot
    assert len(list((study_dir / "runs").iterdir())) == n_runs


@pytest.mark.parametrize(
    "text, match",
    [
        ('seeds = 5\ncolour = "red"\n', "unknown key"),
        ("p0s = [0.7]\n", "p0"),
        ('optimizers = ["lbfgs"]\n', "optimizers"),
        ("seeds = 0\n", "seeds"),
        ("lrs = { bandit = { mlp = { sgd = -1.0 } } }\n", "lrs"),
    ],
)
def test_bad_config_file_fails_before_any_run(tmp_path, text, match):
    cfg = tmp_path / "grid.toml"
    cfg.write_text(text)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "ntrl.cli", "rarity", "--config", str(cfg), "--out", str(out),
                        "--no-wandb"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert match in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_wandb_summary_run_holds_the_verdict_table(tmp_path):
    grid = {**GRID, "optimizers": ["npg"], "p0s": [1e-2, 1e-3, 1e-4], "extinction_steps": 60}
    cfg = tmp_path / "grid.json"
    cfg.write_text(json.dumps(grid))
    out = tmp_path / "study"
    r = subprocess.run([sys.executable, "-m", "ntrl.cli", "rarity", "--config", str(cfg), "--out", str(out),
                        "--quiet", "--workers", "1", "--wandb-project", "rarity-test", "--tags", "t1"],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "WANDB_MODE": "offline", "WANDB_TAGS": "from-env"})
    assert r.returncode == 0, r.stderr
    assert "consistent with p(1 − p)" in r.stdout and "report.html" in r.stdout
    out = out / "t"  # --out is the parent: the study directory is OUT/<study name>
    w_runs = {d: read_offline_run(d) for d in (out / "wandb").iterdir() if d.name.startswith("offline-run")}
    summary_dirs = [d for d, r in w_runs.items() if "members" not in r["config"]]
    assert len(summary_dirs) == 1
    logged = w_runs[summary_dirs[0]]
    item = next(h for h in logged["history"] if "verdicts._type" in h)
    assert item["verdicts._type"] == "table-file" and item["verdicts.nrows"] == 1
    table = json.loads(next(summary_dirs[0].glob("files/media/table/verdicts_[0-9]*.table.json")).read_text())
    assert table["columns"][:5] == ["env", "policy", "optimizer", "mode", "verdict"]
    assert table["data"][0][:5] == ["bandit", "single_logit", "npg", "exact", "consistent with p(1 − p)"]
    # numbers as numbers: each estimate with its bounds, sortable and plottable
    row = dict(zip(table["columns"], table["data"][0]))
    assert all(isinstance(row[k], float) for k in ("drift", "drift_lo", "drift_hi", "static_fisher"))
    assert row["drift_lo"] <= row["drift"] <= row["drift_hi"] and abs(row["drift"] - 1) < 0.25
    text = json.loads(next(summary_dirs[0].glob("files/media/table/verdicts_text_*.table.json")).read_text())
    assert text["data"][0][4] == "consistent with p(1 − p)"
    # the Price residual of every record, with the optimizer as a column
    residual = json.loads(next(summary_dirs[0].glob("files/media/table/price_residual_[0-9]*.table.json")).read_text())
    n_records = sum(1 for p in (out / "runs").glob("*/records.jsonl") for line in p.read_text().splitlines()
                    if '"P/real_delta"' in line)
    assert len(residual["data"]) == n_records and "optimizer" in residual["columns"]
    # the report and the verdict CSVs as an artifact; every W&B run in the project and with the tags
    assert {"name": "t-report", "type": "report"} in logged["artifacts"]
    assert all(w["run"]["project"] == "rarity-test" and w["run"]["tags"] == ["t1"] for w in w_runs.values())
    assert all(w["config"]["ntrl_version"] for w in w_runs.values())
    # a re-analysis without the flags logs its summary run to the project the study ran in
    before = set((out / "wandb").iterdir())
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    r = subprocess.run([sys.executable, "-m", "ntrl.cli", "rarity", "--analyse-only", "--study-dir", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=600, env={**env, "WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr
    (new,) = [d for d in set((out / "wandb").iterdir()) - before if d.name.startswith("offline-run")]
    assert read_offline_run(new)["run"]["project"] == "rarity-test"
    assert logged["summary"]["verdict/bandit/single_logit/npg/exact"] == "consistent with p(1 − p)"
    for key in ("extinction", "price_across_training"):  # the report's other tables, for the dashboard
        assert any(h.get(f"{key}._type") == "table-file" and h.get(f"{key}.nrows") == 1 for h in logged["history"])
    # the cell's four runs trained as one population chunk: one W&B run, with the cell in its config,
    # the members' median P along the updates and the members' summaries as a table
    chunks = [r for r in w_runs.values() if "members" in r["config"]]
    assert len(chunks) == 1 and chunks[0]["config"]["members"] == 4
    assert chunks[0]["config"]["optimizer"] == "npg" and len(chunks[0]["config"]["runs"]) == 4
    assert any("P/median" in h for h in chunks[0]["history"])
    assert any(h.get("members._type") == "table-file" and h.get("members.nrows") == 4 for h in chunks[0]["history"])
    assert any(h.get("curves._type") == "table-file" and h.get("curves.nrows", 0) >= 4 for h in chunks[0]["history"])
    assert not list((out / "runs").glob("*/wandb"))  # no W&B run per member


def test_example_grid_file_is_valid():
    from pathlib import Path

    study = StudyConfig.from_file(Path(__file__).resolve().parents[1] / "examples" / "rarity_grid.toml")
    assert study.envs == ["bandit", "juice"] and study.lrs["juice"]["tabular"]["sgd"] == 4.0
    assert study.adam_beta2 == [0.99, 0.999] and len(study.price_scales) == 6
    assert study.lrs["bandit"]["mlp"]["sgd"] > 0  # defaults merged in
    assert all(s.env in ("bandit", "juice") for s in enumerate_runs(study))
