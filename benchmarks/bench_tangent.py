"""Benchmark: how much does tangent tracking cost, per backend, relative to one forward+backward?

What is timed, for a per-state property X_i = π(a | s_i) of a depth-2 tanh MLP at N probe states
(float32, CPU), in one run:

  floor       one plain forward and backward of Σ_i X_i (loss.backward-style parameter gradient)
  vmap_grad   torch.func vmap(grad): every per-state gradient ∇X_i (N × P), then ‖∇X_i‖², ∇X_i·U
  loop        a per-state autograd loop (timed on a subset of states, scaled to N)
  reference   TangentEngine(backend="reference").stats: jacrev, then NTVar and NTCov(·, U)
  structured  TangentEngine(backend="structured").stats: NTVar and NTCov(·, U) per layer

and, for the full Gram matrix K = J Jᵀ, the structured tiles against J Jᵀ from vmap(grad).
Every time is the median of repeated calls; ratios are to the floor of the same (N, width,
threads) cell. Peak memory is the growth of the process's peak RSS (ru_maxrss) during one call,
measured in a fresh subprocess per cell so that earlier calls cannot hide it.

Also: tracker overhead, the wall time of REINFORCE on the bandit with an MLP policy, tracking
every 10th update against no tracking at all.

    python benchmarks/bench_tangent.py            # full run, several minutes
    python benchmarks/bench_tangent.py --quick    # smoke test, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch.func import functional_call, grad, vmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ntrl.agents.policies import MLPPolicy  # noqa: E402
from ntrl.metrics import Euclidean  # noqa: E402
from ntrl.properties import ActionProbability  # noqa: E402
from ntrl.tangent import TangentEngine  # noqa: E402

OBS_DIM, N_ACTIONS, ACTION = 8, 4, 1
MAX_JAC_BYTES = 3 * 2**30  # skip methods that would hold an N × P Jacobian above this
LOOP_SUBSET = 64


# ------------------------------------------------------------------------------ setup
class Case:
    """A 2-layer tanh MLP policy, N probe states, the property π(a|s_i) and a direction U."""

    def __init__(self, n: int, width: int, seed: int = 0):
        torch.manual_seed(seed)
        self.policy = MLPPolicy(OBS_DIM, N_ACTIONS, width=width, depth=2, activation="tanh", dtype=torch.float32)
        self.obs = torch.randn(n, OBS_DIM)
        self.X = ActionProbability(self.obs, ACTION)
        self.params = {k: v.detach() for k, v in self.policy.named_parameters()}
        self.n_params = sum(p.numel() for p in self.params.values())
        self.U = torch.randn(self.n_params)
        self.ref = TangentEngine(self.policy, backend="reference")
        self.struct = TangentEngine(self.policy, backend="structured")
        self.n = n

    def jac_bytes(self) -> int:
        return self.n * self.n_params * 4


def x_of_logits(z: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(z, dim=-1)[..., ACTION].exp()


def method_floor(c: Case) -> Callable[[], object]:
    params = [p for p in c.policy.parameters()]

    def run():
        loss = x_of_logits(c.policy(c.obs)).sum()
        return torch.autograd.grad(loss, params)

    return run


def _flat_per_state_grads(c: Case) -> torch.Tensor:
    def single(p, o):
        return x_of_logits(functional_call(c.policy, p, (o[None],)))[0]

    g = vmap(grad(single), in_dims=(None, 0))(c.params, c.obs)
    return torch.cat([g[k].reshape(c.n, -1) for k in c.params], dim=1)


def method_vmap(c: Case) -> Callable[[], object]:
    def run():
        J = _flat_per_state_grads(c)
        return (J * J).sum(1), J @ c.U

    return run


def method_loop(c: Case) -> Callable[[], object]:
    """Per-state autograd on the first LOOP_SUBSET states (the caller scales by N / subset)."""
    params = [p for p in c.policy.parameters()]
    k = min(LOOP_SUBSET, c.n)

    def run():
        out = []
        for i in range(k):
            gi = torch.autograd.grad(x_of_logits(c.policy(c.obs[i : i + 1]))[0], params)
            flat = torch.cat([t.reshape(-1) for t in gi])
            out.append((flat @ flat, flat @ c.U))
        return out

    return run


def method_engine(c: Case, which: str) -> Callable[[], object]:
    eng = c.ref if which == "reference" else c.struct
    metrics = {"euc": Euclidean()}

    def run():
        return eng.stats(c.X, metrics, {"U": c.U})

    return run


def method_gram_vmap(c: Case) -> Callable[[], object]:
    def run():
        J = _flat_per_state_grads(c)
        return J @ J.T

    return run


def method_gram_structured(c: Case) -> Callable[[], object]:
    def run():
        return c.struct.ntcov_matrix([c.X], Euclidean())

    return run


METHODS = {
    "floor": method_floor,
    "vmap_grad": method_vmap,
    "loop": method_loop,
    "reference": lambda c: method_engine(c, "reference"),
    "structured": lambda c: method_engine(c, "structured"),
    "gram_vmap_JJt": method_gram_vmap,
    "gram_structured": method_gram_structured,
}
JACOBIAN_METHODS = {"vmap_grad", "reference", "gram_vmap_JJt"}


def median_time(fn: Callable[[], object], min_total: float, max_reps: int) -> float:
    """Median wall time of ``fn()`` over repeats (one warm-up call first)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_total and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def skip_reason(method: str, c: Case, n: int) -> str | None:
    if method in JACOBIAN_METHODS and c.jac_bytes() > MAX_JAC_BYTES:
        return f"skipped: N×P Jacobian would need {c.jac_bytes() / 2**30:.1f} GiB"
    if method.startswith("gram") and n > 8192:
        return "skipped: N×N Gram above 8192 states"
    return None


# ------------------------------------------------------------------------------ memory
def peak_rss_child(method: str, n: int, width: int, threads: int) -> float:
    """(child entry point) MiB of peak-RSS growth during one call of ``method``."""
    torch.set_num_threads(threads)
    c = Case(n, width)
    fn = METHODS[method](c)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - base) / 1024.0  # ru_maxrss is in KiB on Linux


def peak_rss(method: str, n: int, width: int) -> float | None:
    cmd = [sys.executable, __file__, "--memory-child", method, str(n), str(width)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        return None
    return float(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ tracker overhead
def tracker_overhead(steps: int, reps: int, fisher: bool, backend: str) -> dict:
    """Wall time of bandit REINFORCE (MLP policy) tracking every 10th update vs no tracking."""
    import ntrl.train as train_mod
    from ntrl.bandit_setup import BanditConfig

    original = train_mod.TangentEngine

    def engine(module, dtype=None, **kw):
        return original(module, dtype=dtype, backend=backend, **kw)

    train_mod.TangentEngine = engine
    try:
        times: dict[str, list[float]] = {"none": [], "every10": []}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(reps):
                for label, every in (("none", steps + 1), ("every10", 10)):
                    cfg = BanditConfig(policy="mlp", optimizer="sgd", mode="exact", steps=steps, lr=0.1,
                                       track_every=every, fisher=fisher, wandb="disabled", out=tmp,
                                       run_name=f"{label}-{r}-{fisher}-{backend}", force=True)
                    t0 = time.perf_counter()
                    train_mod.train(cfg, progress=False, echo=lambda *a, **k: None)
                    times[label].append(time.perf_counter() - t0)
    finally:
        train_mod.TangentEngine = original
    base, tracked = statistics.median(times["none"]), statistics.median(times["every10"])
    return {"fisher": fisher, "backend": backend, "steps": steps, "t_none": base, "t_every10": tracked,
            "overhead": tracked / base - 1.0}


# ------------------------------------------------------------------------------ main
def run(args) -> dict:
    ns = [256, 1024] if args.quick else [256, 1024, 4096, 16384]
    widths = [64] if args.quick else [64, 256]
    threads_list = [1, 2]
    min_total, max_reps = (0.05, 5) if args.quick else (0.5, 15)
    rows = []
    for width in widths:
        for n in ns:
            c = Case(n, width)
            for threads in threads_list:
                torch.set_num_threads(threads)
                row = {"width": width, "N": n, "threads": threads, "P": c.n_params, "t": {}, "note": {}}
                for method, make in METHODS.items():
                    why = skip_reason(method, c, n)
                    if why:
                        row["note"][method] = why
                        continue
                    t = median_time(make(c), min_total, max_reps)
                    if method == "loop":
                        k = min(LOOP_SUBSET, n)
                        t *= n / k
                        row["note"]["loop"] = f"timed on {k} states, scaled ×{n / k:g}"
                    row["t"][method] = t
                rows.append(row)
                print(fmt_row(row), flush=True)
    mem = []
    if not args.no_memory:
        for width in widths:
            for n in ns:
                entry = {"width": width, "N": n, "mib": {}}
                c = Case(n, width)
                for method in METHODS:
                    if skip_reason(method, c, n) is None:
                        entry["mib"][method] = peak_rss(method, n, width)
                mem.append(entry)
                print(f"memory width={width} N={n}: " + ", ".join(
                    f"{k}={v:.1f}MiB" if v is not None else f"{k}=?" for k, v in entry["mib"].items()), flush=True)
    torch.set_num_threads(1)
    steps, reps = (40, 1) if args.quick else (200, 3)
    tracker = []
    for fisher in (False, True):
        for backend in ("auto", "reference"):
            r = tracker_overhead(steps, reps, fisher, backend)
            tracker.append(r)
            print(f"tracker fisher={fisher} backend={backend}: none {r['t_none']:.2f}s, every10 "
                  f"{r['t_every10']:.2f}s, overhead {100 * r['overhead']:.1f}%", flush=True)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "command": " ".join(["python", "benchmarks/bench_tangent.py", *sys.argv[1:]]),
        "rows": rows, "memory": mem, "tracker": tracker,
    }


def fmt_row(row: dict) -> str:
    t = row["t"]
    f = t["floor"]
    parts = [f"width={row['width']} N={row['N']} threads={row['threads']} floor={1e3 * f:.2f}ms"]
    for k, v in t.items():
        if k != "floor":
            parts.append(f"{k}={v / f:.2f}x")
    return " ".join(parts)


def table(result: dict) -> str:
    """A Markdown table of ratios (to the floor and to the baselines) for RESULTS.md."""
    lines = ["| width | N | threads | floor (ms) | structured / floor | reference / floor | vmap / floor | "
             "loop / floor | vmap / structured | loop / structured | Gram: J Jᵀ(vmap) / structured |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def r(a, b):
        return f"{a / b:.2f}" if a is not None and b is not None else "—"

    for row in result["rows"]:
        t = row["t"]
        s, f = t.get("structured"), t["floor"]
        lines.append(f"| {row['width']} | {row['N']} | {row['threads']} | {1e3 * f:.2f} | {r(s, f)} | "
                     f"{r(t.get('reference'), f)} | {r(t.get('vmap_grad'), f)} | {r(t.get('loop'), f)} | "
                     f"{r(t.get('vmap_grad'), s)} | {r(t.get('loop'), s)} | "
                     f"{r(t.get('gram_vmap_JJt'), t.get('gram_structured'))} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: small N, width 64, short training")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", default=None, help="write the raw results to this JSON file")
    p.add_argument("--memory-child", nargs=3, metavar=("METHOD", "N", "WIDTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        method, n, width = args.memory_child
        print(peak_rss_child(method, int(n), int(width), threads=1))
        return
    result = run(args)
    print()
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
