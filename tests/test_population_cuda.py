"""Populations on a CUDA device (issue 12): a member trained on the GPU has its run's records, as
on the CPU. Skipped where torch sees no CUDA device (CI has none), but for the check that the GPU
benchmark skips cleanly there; run on a GPU machine with

    python -m pytest -q tests/test_population_cuda.py

Tolerances: the GPU computes the same float64 expressions with other kernels (cuBLAS and cuSOLVER
reduce in another order; geqrf and ormqr are cuSOLVER's or MAGMA's), so each value differs from the
CPU's by a few ulps, as the CPU population's differs from the per-run path's, and the trajectories
by the sum of those over the updates: the CPU tests' 1e-12 relative (``assert_records_equal``)
holds here for the same reason. Sampling draws from each member's numpy stream on the host, so
sampled members take their runs' episodes on the GPU too.
"""

from __future__ import annotations

import pytest
import torch

from ntrl.experiments.bandit import BanditConfig
from ntrl.population import train_population
from ntrl.records import read_records
from ntrl.train import train
from test_population import (assert_records_equal, juice_configs, juice_sampled_configs, kbandit_configs,
                             member_configs)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_the_gpu_benchmark_skips_cleanly_without_a_gpu(tmp_path):
    """benchmarks/bench_population_gpu.py says in one line that there is no CUDA device, writes
    nothing and exits 0 (the issue: "without a GPU it skips cleanly")."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_population_gpu.py"
    proc = subprocess.run([sys.executable, str(script), "--json", str(tmp_path / "gpu.json")], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "bench_population_gpu: no CUDA device here; skipped" and not proc.stderr.strip()
    assert not any(tmp_path.iterdir())


def assert_population_equals_runs(per, pop, **tol) -> None:
    assert not pop.failures, pop.failures
    for i, (r1, r2) in enumerate(zip(per, pop.results)):
        assert_records_equal(read_records(r1.run_dir), read_records(r2.run_dir), **tol)
        for key in ("status", "updates", "crossed_half_at", "episodes"):
            assert r1.summary[key] == r2.summary[key], (i, key)
        assert r2.summary["p_end"] == pytest.approx(r1.summary["p_end"], rel=1e-12, abs=1e-300), i


@needs_cuda
@pytest.mark.parametrize("mode", ["exact", "sampled"])
@pytest.mark.parametrize("optimizer", ["sgd", "npg", "sign", "adam"])
@pytest.mark.parametrize("policy", ["single_logit", "tabular", "mlp", "escort"])
def test_bandit_members_on_the_gpu_equal_their_cpu_runs(tmp_path, policy, optimizer, mode):
    per = [train(c, progress=False) for c in member_configs(tmp_path / "per", policy, optimizer, mode)]
    torch.cuda.reset_peak_memory_stats()
    pop = train_population(member_configs(tmp_path / "pop", policy, optimizer, mode), device="cuda", progress=False)
    assert torch.cuda.max_memory_allocated() > 0  # it trained on the GPU
    assert_population_equals_runs(per, pop)


@needs_cuda
@pytest.mark.parametrize("optimizer, mode", [("sgd", "exact"), ("npg", "exact"), ("adam", "exact"), ("sgd", "sampled")])
@pytest.mark.parametrize("policy", ["tabular", "mlp"])
def test_kbandit_members_on_the_gpu_equal_their_cpu_runs(tmp_path, policy, optimizer, mode):
    per = [train(c, progress=False) for c in kbandit_configs(tmp_path / "per", policy, optimizer, mode)]
    pop = train_population(kbandit_configs(tmp_path / "pop", policy, optimizer, mode), device="cuda", progress=False)
    assert_population_equals_runs(per, pop, atol=1e-15 if mode == "sampled" else 0.0)


@needs_cuda
@pytest.mark.parametrize("optimizer", ["sgd", "npg", "sign", "adam"])
@pytest.mark.parametrize("policy", ["tabular", "mlp"])
def test_exact_juice_members_on_the_gpu_equal_their_cpu_runs(tmp_path, policy, optimizer):
    """NTCov of F (and P) with U is an inner product over the MLP's 4741 parameters whose terms
    cancel: its rounding is relative to Σ_k |∂_k F ∂_k U|, not to the sum. On the CPU the population
    and the per-run path already part by up to 5·10⁻¹³ of the value there (F/ntcov_euc, by hand);
    cuBLAS sums in other blocks, and one GPU run parted by 2.2·10⁻¹² (Adam's F/ntcov_opt at update
    9). Rounding is about √P·u ≈ 8·10⁻¹⁵ of Σ_k |∂_k F ∂_k U|, so 1e-10 of the value holds a sum
    that cancels down to 10⁻⁴ of its terms' size; every other field is held to 1e-12."""
    per = [train(c, progress=False) for c in juice_configs(tmp_path / "per", policy, optimizer)]
    pop = train_population(juice_configs(tmp_path / "pop", policy, optimizer), device="cuda", progress=False)
    assert_population_equals_runs(per, pop, sign=optimizer == "sign", inner=1e-10)


@needs_cuda
@pytest.mark.parametrize("optimizer", ["sgd", "npg"])
@pytest.mark.parametrize("policy", ["tabular", "mlp"])
def test_sampled_juice_members_on_the_gpu_equal_their_cpu_runs(tmp_path, policy, optimizer):
    """Each member's episodes come from its own native vector env on the host; the surrogate and
    everything after it run on the GPU (sampled NPG on the MLP: 1e-6, as on the CPU)."""
    per = [train(c, progress=False) for c in juice_sampled_configs(tmp_path / "per", policy, optimizer)]
    pop = train_population(juice_sampled_configs(tmp_path / "pop", policy, optimizer), device="cuda", progress=False)
    rtol = 1e-6 if (policy, optimizer) == ("mlp", "npg") else 1e-12
    assert_population_equals_runs(per, pop, rtol=rtol, floor=1e-20)


@needs_cuda
def test_p_down_to_1e_minus_12_stays_finite_on_the_gpu(tmp_path):
    cfg = BanditConfig(policy="mlp", optimizer="npg", p0=1e-12, lr=0.1, steps=5, width=8, track_every=1,
                       wandb="disabled", out=str(tmp_path), run_name="x")
    pop = train_population([cfg], device="cuda", progress=False)
    recs = read_records(pop.results[0].run_dir)
    assert not pop.failures and len(recs) == 5
    assert recs[0]["P/ntvar_fisher"] == pytest.approx(1e-12 * (1 - 1e-12), rel=1e-6)  # p(1 − p), SCIENCE.md §1


@needs_cuda
def test_a_member_that_goes_non_finite_on_the_gpu_is_stopped_and_the_rest_continue(tmp_path):
    cfgs = [BanditConfig(policy="mlp", optimizer="sgd", p0=0.01, lr=lr, steps=20, track_every=1, width=8,
                         reward_do=r, wandb="disabled", out=str(tmp_path), run_name=f"m{i}")
            for i, (lr, r) in enumerate([(1.0, 1.0), (1e308, 1e10), (1.0, 1.0)])]
    pop = train_population(cfgs, device="cuda", progress=False)
    assert [i for i, _, _ in pop.failures] == [1] and "non-finite" in pop.failures[0][2]
    assert [pop.results[i].summary["status"] for i in (0, 2)] == ["finished", "finished"]


@needs_cuda
def test_a_population_larger_than_the_gpus_memory_is_refused_before_anything_is_written(tmp_path):
    """The limit on a GPU is half its free memory (``memory_limit``): ask for more members of a
    wide MLP than that holds."""
    from ntrl.config import ConfigError
    from ntrl.population.trainer import config_member_bytes, memory_limit

    cfg = BanditConfig(policy="mlp", optimizer="sgd", p0=0.01, lr=0.1, steps=2, width=1024, wandb="disabled",
                       out=str(tmp_path / "out"))
    _, per = config_member_bytes(cfg)
    members = memory_limit(torch.device("cuda"), None) // per + 1
    configs = [cfg.__class__(**{**cfg.to_dict(), "seed": i, "run_name": f"m{i}"}) for i in range(members)]
    with pytest.raises(ConfigError, match="above the limit"):
        train_population(configs, device="cuda", progress=False)
    assert not (tmp_path / "out").exists()


@needs_cuda
def test_ntrl_train_device_cuda_writes_the_runs_records(tmp_path):
    """``ntrl train bandit --device cuda`` trains a population of one on the GPU; its records are
    the CPU run's."""
    from ntrl.cli import main

    args = ["train", "bandit", "--policy", "mlp", "--optimizer", "npg", "--steps", "30", "--track-every", "3",
            "--no-wandb", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "cpu"), "--run-name", "r"]) == 0
    assert main(args + ["--out", str(tmp_path / "gpu"), "--run-name", "r", "--device", "cuda"]) == 0
    cpu, gpu = read_records(tmp_path / "cpu" / "r"), read_records(tmp_path / "gpu" / "r")
    assert len(cpu) == len(gpu) == 10
    assert_records_equal(cpu, gpu)


@needs_cuda
def test_study_verdicts_on_the_gpu_are_the_cpus(tmp_path):
    """The verdict table of a four-cell grid, by population chunks on the GPU and by single runs."""
    from ntrl.study.executor import run_study
    from ntrl.study.grid import StudyConfig
    from ntrl.study.rarity import analyse_and_report
    from ntrl.study.report import verdict_rows

    study = StudyConfig(name="v", policies=["single_logit", "mlp"], optimizers=["sgd", "npg"], p0s=[1e-2, 1e-3],
                        seeds=2, extinction_steps=40, max_steps=3000, track_every=5, width=8,
                        price_scales=[1.0, 0.5]).validate()
    tables = []
    for population, device in ((True, "cuda"), (False, "cpu")):
        out = tmp_path / device
        run_study(study, out, workers=2, wandb_mode="disabled", progress=False, population=population, device=device)
        cells = analyse_and_report(out, "disabled")["cells"]
        tables.append([row[:8] for row in verdict_rows(cells)])
    assert tables[0] == tables[1] and len(tables[0]) == 4
