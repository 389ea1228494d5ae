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
threads) cell. Peak memory is measured with the torch profiler (``profile_memory=True``): the
maximum, over one call, of the running total of bytes allocated by torch's CPU allocator since the
call began (its "Total Allocated" counter), so it counts tensors, not Python objects or the
allocator's cached pages. Methods whose cost would explode are skipped and say so: jacrev (the
reference) costs O(N² P), vmap holds an N × P Jacobian and J Jᵀ costs N² P flops.

The tracker's overhead on training has its own harness, ``bench_tracker_overhead.py``.

    python benchmarks/bench_tangent.py            # full run, several minutes
    python benchmarks/bench_tangent.py --quick    # smoke test, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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
from ntrl.engine.metrics import Euclidean  # noqa: E402
from ntrl.properties import ActionProbability  # noqa: E402
from ntrl.engine.tangent import TangentEngine  # noqa: E402

OBS_DIM, N_ACTIONS, ACTION = 8, 4, 1
MAX_JAC_BYTES = 3 * 2**30  # skip methods that would hold an N × P Jacobian above this
MAX_REFERENCE_N = 1024  # jacrev of N outputs runs N backward passes over all N states: O(N² P)
MAX_GRAM_FLOPS = 2e11  # skip J Jᵀ from vmap(grad) above N² P flops
MAX_GRAM_N = 8192  # the N × N result itself
LOOP_SUBSET = 64
SLOW_CALL_S = 3.0  # a method whose warm-up call takes longer is timed by that one call
PRIMER_S = 0.1  # methods faster than this get an untimed call right before each timed call


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


def interleaved_times(fns: dict[str, Callable[[], object]], min_total: float, max_rounds: int
                      ) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall time and median process CPU time of each ``fns[m]()``, in interleaved rounds.

    Every round calls every method once, so load from other processes on the machine hits all
    methods alike. One warm-up call first; a method whose warm-up alone takes more than
    SLOW_CALL_S is timed by that one call. A method faster than PRIMER_S gets an untimed call
    right before each timed one: the first call after a large method (jacrev frees hundreds of
    MiB) pays 1–3 ms of cold-allocator and cache cost, which would otherwise be charged to
    whichever method happens to come next in the round.
    """
    wall: dict[str, list[float]] = {m: [] for m in fns}
    cpu: dict[str, list[float]] = {m: [] for m in fns}
    primed: set[str] = set()

    def once(m: str) -> None:
        if m in primed:
            fns[m]()
        c0, t0 = time.process_time(), time.perf_counter()
        fns[m]()
        wall[m].append(time.perf_counter() - t0)
        cpu[m].append(time.process_time() - c0)

    for m in fns:
        once(m)
    primed.update(m for m in fns if wall[m][0] < PRIMER_S)
    slow = {m for m in fns if wall[m][0] > SLOW_CALL_S}
    fast = [m for m in fns if m not in slow]
    for m in fast:
        wall[m].clear()
        cpu[m].clear()
    start, rounds = time.perf_counter(), 0
    while fast and (rounds < 3 or (time.perf_counter() - start < min_total and rounds < max_rounds)):
        for m in fast:
            once(m)
        rounds += 1
    return ({m: statistics.median(v) for m, v in wall.items()},
            {m: statistics.median(v) for m, v in cpu.items()})


def skip_reason(method: str, c: Case, n: int) -> str | None:
    if method in JACOBIAN_METHODS and c.jac_bytes() > MAX_JAC_BYTES:
        return f"skipped: the N×P Jacobian would need {c.jac_bytes() / 2**30:.1f} GiB"
    if method == "reference" and n > MAX_REFERENCE_N:
        return f"skipped: jacrev is O(N² P), N > {MAX_REFERENCE_N}"
    if method == "gram_vmap_JJt" and n * n * c.n_params > MAX_GRAM_FLOPS:
        return f"skipped: J Jᵀ needs {n * n * c.n_params:.1e} flops"
    if method.startswith("gram") and n > MAX_GRAM_N:
        return f"skipped: N×N Gram above {MAX_GRAM_N} states"
    return None


# ------------------------------------------------------------------------------ memory
def peak_memory(fn: Callable[[], object]) -> float:
    """MiB: the peak of torch's CPU allocations during one call of ``fn`` (torch profiler)."""
    with tempfile.TemporaryDirectory() as tmp:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    if not mem:
        return 0.0
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] - start for e in mem) / 2**20


# ------------------------------------------------------------------------------ main
def run(args) -> dict:
    ns = [256, 1024] if args.quick else [256, 1024, 4096, 16384]
    widths = [64] if args.quick else [64, 256]
    threads_list = [1, 2]
    min_total, max_rounds = (0.3, 5) if args.quick else (4.0, 25)
    load_start = os.getloadavg()
    rows = []
    for width in widths:
        for n in ns:
            c = Case(n, width)
            for threads in threads_list:
                torch.set_num_threads(threads)
                row = {"width": width, "N": n, "threads": threads, "P": c.n_params, "t": {}, "cpu": {}, "note": {}}
                fns = {}
                for method, make in METHODS.items():
                    why = skip_reason(method, c, n)
                    if why:
                        row["note"][method] = why
                    else:
                        fns[method] = make(c)
                row["t"], row["cpu"] = interleaved_times(fns, min_total, max_rounds)
                if "loop" in row["t"]:
                    k = min(LOOP_SUBSET, n)
                    row["t"]["loop"] *= n / k
                    row["cpu"]["loop"] *= n / k
                    row["note"]["loop"] = f"timed on {k} states, scaled ×{n / k:g}"
                if threads == 1 and not args.no_memory:
                    row["mib"] = {m: peak_memory(fn) for m, fn in fns.items()}
                rows.append(row)
                print(fmt_row(row), flush=True)
    torch.set_num_threads(1)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "command": " ".join(["python", "benchmarks/bench_tangent.py", *sys.argv[1:]]),
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "rows": rows,
    }


def fmt_row(row: dict) -> str:
    t = row["t"]
    f = t["floor"]
    parts = [f"width={row['width']} N={row['N']} threads={row['threads']} floor={1e3 * f:.2f}ms"]
    for k, v in t.items():
        if k != "floor":
            parts.append(f"{k}={v / f:.2f}x")
    return " ".join(parts)


def table(result: dict, key: str = "t") -> str:
    """A Markdown table of ratios (to the floor and to the baselines) for RESULTS.md.

    ``key="t"``: median wall times; ``key="cpu"``: median process CPU times.
    """
    lines = ["| width | N | threads | floor (ms) | structured / floor | reference / floor | vmap / floor | "
             "loop / floor | vmap / structured | loop / structured | Gram: J Jᵀ(vmap) / structured |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def r(a, b):
        return f"{a / b:.2f}" if a is not None and b is not None else "—"

    for row in result["rows"]:
        t = row[key]
        s, f = t.get("structured"), t["floor"]
        lines.append(f"| {row['width']} | {row['N']} | {row['threads']} | {1e3 * f:.2f} | {r(s, f)} | "
                     f"{r(t.get('reference'), f)} | {r(t.get('vmap_grad'), f)} | {r(t.get('loop'), f)} | "
                     f"{r(t.get('vmap_grad'), s)} | {r(t.get('loop'), s)} | "
                     f"{r(t.get('gram_vmap_JJt'), t.get('gram_structured'))} |")
    return "\n".join(lines)


def memory_table(result: dict) -> str:
    """Peak torch CPU allocation (MiB) per method, single-thread cells."""
    methods = list(METHODS)
    lines = ["| width | N | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for row in result["rows"]:
        if "mib" not in row:
            continue
        cells = [f"{row['mib'][m]:.1f}" if m in row["mib"] else "—" for m in methods]
        lines.append(f"| {row['width']} | {row['N']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def combine(paths: list[str]) -> dict:
    """Several ``--json`` results as one: every time is the median over the runs, cell by cell.

    On a shared machine one run's ratios can be off by ±50 %; the median of a few runs is steadier.
    """
    runs = [json.loads(Path(p).read_text()) for p in paths]
    rows = []
    for row in runs[0]["rows"]:
        key = (row["width"], row["N"], row["threads"])
        same = [r for run in runs for r in run["rows"] if (r["width"], r["N"], r["threads"]) == key]
        out = dict(row)
        for field in ("t", "cpu"):
            # median of per-run ratios to that run's floor, times the median floor
            floor = statistics.median(r[field]["floor"] for r in same)
            out[field] = {m: floor * statistics.median(r[field][m] / r[field]["floor"] for r in same if m in r[field])
                          for m in row[field]}
        rows.append(out)
    return {**runs[-1], "rows": rows, "combined_from": paths}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: small N, width 64")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--json", default=None, help="write the raw results to this JSON file")
    p.add_argument("--combine", nargs="+", metavar="JSON", default=None,
                   help="no benchmark: print the tables for the cell-by-cell median of earlier --json runs")
    args = p.parse_args()
    result = combine(args.combine) if args.combine else run(args)
    print()
    print("Wall time ratios")
    print(table(result, "t"))
    print()
    print("Process CPU time ratios")
    print(table(result, "cpu"))
    print()
    print(memory_table(result))
    if args.json and not args.combine:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
