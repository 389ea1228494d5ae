"""Structured tangent backend: NTVar, NTCov and Gram matrices without per-state gradients.

For a Linear layer y = W a + b inside the network and a *per-state* property (X_i depends only
on the network output at state i), write a_i for the layer's input at state i and
δ_i = ∂X_i/∂y_i for the gradient at its output. Then the per-state parameter gradient is the
outer product

    ∇_W X_i = δ_i a_iᵀ,          ∇_b X_i = δ_i,

and every tangent quantity follows from a_i and δ_i alone, layer by layer (Σ_l over layers):

    NTVar(X_i)      = Σ_l (‖a_i‖² + 1) ‖δ_i‖²                                (M = I)
    NTVar_M(X_i)    = Σ_l [ (δ_i²)ᵀ D_W (a_i²) + (δ_i²)ᵀ d_b ]               (M = diag(d))
    ∇X_i · v        = Σ_l [ δ_iᵀ G_W a_i + δ_iᵀ g_b ]                        (v = direction)
    K = J M Jᵀ      = Σ_l (A Aᵀ + 1) ∘ (Δ Δᵀ)                                (M = I)

Here D_W, d_b (G_W, g_b) are the entries of d (of v) belonging to W and b, reshaped like them,
δ² and a² are elementwise squares and ∘ is the elementwise product. The diagonal-metric form
follows from ‖∇_W X_i‖²_M = Σ_jk d_jk (δ_ij a_ik)² = Σ_jk δ_ij² d_jk a_ik² = (δ_i²)ᵀ D_W (a_i²),
one (N, out) × (out, in) matmul for all states at once — the cost of one forward pass.
This covers Adam and RMSprop (d = 1/(√v̂ + ε)) and sign descent (d = 1/|g|), whose d varies
within a layer.

One forward pass and one backward pass of Σ_i X_i give every δ_i: because the states do not
interact (no batch norm, no attention across the batch), ∂(Σ_j X_j)/∂y_i = ∂X_i/∂y_i. The
backward stops at the layer outputs; no weight gradient is ever formed.

Supported modules (anything else makes the engine fall back to the torch.func reference):

* ``nn.Sequential`` (nested ones too) of ``nn.Linear`` and stateless elementwise activations;
* ntrl's ``MLPPolicy`` (its ``.net`` is such a Sequential);
* ``SingleLogitPolicy`` (z_target = b: one "bias" with δ_i = ∂X_i/∂z_target);
* ``TabularSoftmaxPolicy`` (z_i = θ[s_i]: a Linear layer on the one-hot a_i = e_{s_i}, W = θᵀ).

Per-state properties declare themselves with the attribute ``per_state``: a :class:`PerState`
``(obs, fn)``, or any 2-tuple, where ``fn(logits (N, K)) -> (N,)`` maps the network output at
the N states ``obs`` to X, row by row. The engine then evaluates X(θ) = fn(module(obs; θ)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntrl.engine.metrics import Euclidean, Metric

ParamDict = dict[str, Tensor]

#: Stateless elementwise activations the structured backend may pass through.
ELEMENTWISE = (
    nn.Identity, nn.Tanh, nn.ReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus, nn.Sigmoid,
    nn.LeakyReLU, nn.Mish, nn.Softsign, nn.Hardtanh, nn.ReLU6, nn.SELU, nn.CELU, nn.Tanhshrink,
    nn.LogSigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Softshrink, nn.Hardshrink,
)


class PerState(NamedTuple):
    """A per-state property: X_i = fn(z)_i with z = module(obs) of shape (N, K).

    ``fn`` must act row by row (X_i depends on z_i only); that is what makes one backward pass
    of Σ_i X_i deliver every per-state gradient δ_i = ∂X_i/∂z_i.
    """

    obs: Tensor
    fn: Callable[[Tensor], Tensor]


class StructuredUnsupported(ValueError):
    """The structured backend cannot compute this query; the message says why."""


def per_state_of(X: object) -> PerState | None:
    """The property's ``per_state`` declaration as a :class:`PerState`, or None if it has none."""
    spec = getattr(X, "per_state", None)
    if spec is None:
        return None
    if isinstance(spec, tuple) and len(spec) == 2 and callable(spec[1]):
        return PerState(*spec)
    return None


def metric_diagonal(metric: Metric, n_params: int) -> tuple[str, Tensor | None]:
    """("euclidean", None) for M = I, ("diagonal", d) for M = diag(d); raise otherwise."""
    if isinstance(metric, Euclidean):
        return "euclidean", None
    d = metric.diagonal
    if d is None:
        raise StructuredUnsupported(f"metric {type(metric).__name__} is neither Euclidean nor diagonal")
    if d.shape != (n_params,):
        raise StructuredUnsupported(f"diagonal metric has shape {tuple(d.shape)}, expected ({n_params},)")
    return "diagonal", d


# ------------------------------------------------------------------------------ layer traces
@dataclass
class Factor:
    """One parameter's per-state gradient ∇_θ X_i = δ_i a_iᵀ (a_i = 1 for a bias: ``a is None``).

    ``layout`` says how a flat parameter-shaped vector becomes the (out, in) matrix (or (out,)
    vector) that multiplies δ and a: "linear" (the parameter is (out, in)), "transposed" (the
    parameter is (in, out), as the tabular θ), "bias" (the parameter holds ``out`` entries).
    """

    name: str
    a: Tensor | None
    layout: str

    def matrix(self, v: Tensor, out: int) -> Tensor:
        """The parameter-shaped block v_θ as an (out, in) matrix, or an (out,) vector for a bias."""
        if self.layout == "bias":
            return v.reshape(out)
        if self.layout == "transposed":
            return v.reshape(-1, out).T
        return v.reshape(out, -1)


@dataclass
class LayerGrads:
    """The backpropagated δ (N, out) at one layer output and the parameters it feeds."""

    delta: Tensor
    factors: list[Factor]


@dataclass
class Trace:
    """X at N states plus, per layer, δ and the inputs a: everything tangent quantities need."""

    value: Tensor
    layers: list[LayerGrads]

    @staticmethod
    def cat(traces: Sequence["Trace"]) -> "Trace":
        """Stack the states of several traces of the same module (same layers, same order)."""
        if len(traces) == 1:
            return traces[0]
        layers = []
        for group in zip(*(t.layers for t in traces)):
            factors = []
            for fs in zip(*(g.factors for g in group)):
                a = None if fs[0].a is None else torch.cat([f.a for f in fs])
                factors.append(Factor(fs[0].name, a, fs[0].layout))
            layers.append(LayerGrads(torch.cat([g.delta for g in group]), factors))
        return Trace(torch.cat([t.value for t in traces]), layers)

    def select(self, idx: slice) -> "Trace":
        """The trace restricted to the states ``idx``."""
        return Trace(self.value[idx], [
            LayerGrads(L.delta[idx], [Factor(f.name, None if f.a is None else f.a[idx], f.layout)
                                      for f in L.factors])
            for L in self.layers
        ])


def _grad_rows(spec: PerState, z: Tensor) -> tuple[Tensor, Tensor]:
    """X = fn(z) and δ = ∂(Σ_i X_i)/∂z (row i is ∂X_i/∂z_i for a per-state fn)."""
    value = spec.fn(z).reshape(-1)
    if value.shape[0] != z.shape[0]:
        raise StructuredUnsupported(f"per_state fn returned {value.shape[0]} values for {z.shape[0]} states")
    delta = torch.autograd.grad(value.sum(), z, allow_unused=True)[0] if value.requires_grad else None
    return value, torch.zeros_like(z) if delta is None else delta


def _augmented(L: LayerGrads) -> Tensor:
    """Ã = [a_f for each parameter f of the layer], with a column of ones for a bias: (N, Σ in_f)."""
    cols = [torch.ones_like(L.delta[:, :1]) if f.a is None else f.a for f in L.factors]
    return cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)


# ------------------------------------------------------------------------------ module plans
@dataclass
class _Linear:
    weight: str
    bias: str | None


@dataclass
class _Act:
    module: nn.Module


def no_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has no forward or backward hooks (so that its layers may be evaluated one by one)."""
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _flatten_sequential(seq: nn.Sequential, prefix: str) -> Iterator[_Linear | _Act]:
    for key, m in seq._modules.items():
        if m is None:
            continue
        if not no_hooks(m):
            raise StructuredUnsupported(f"module {prefix}{key} has hooks")
        if type(m).forward is nn.Sequential.forward and isinstance(m, nn.Sequential):
            yield from _flatten_sequential(m, f"{prefix}{key}.")
        elif type(m).forward is nn.Linear.forward and isinstance(m, nn.Linear):
            yield _Linear(f"{prefix}{key}.weight", f"{prefix}{key}.bias" if m.bias is not None else None)
        elif type(m) in ELEMENTWISE:
            yield _Act(m)
        else:
            raise StructuredUnsupported(f"module {prefix}{key} ({type(m).__name__}) is not Linear or an elementwise activation")


class StructuredBackend:
    """Layer-structured NTVar / NTCov / Gram for one module (built by the engine).

    ``kind`` is "sequential", "single_logit" or "tabular". Raises :class:`StructuredUnsupported`
    with the reason when the module is of none of these forms.
    """

    def __init__(self, module: nn.Module, names: Sequence[str]):
        self.module = module
        self.names = set(names)
        self.kind, self.steps, self.prefix = self._plan(module)

    @staticmethod
    def _plan(module: nn.Module) -> tuple[str, list, str]:
        if not no_hooks(module):
            raise StructuredUnsupported("the module has hooks")
        from ntrl.agents.policies import MLPPolicy, SingleLogitPolicy, TabularSoftmaxPolicy

        t = type(module)
        if isinstance(module, MLPPolicy) and t.forward is MLPPolicy.forward:
            if not no_hooks(module.net):
                raise StructuredUnsupported("module net has hooks")
            return "sequential", list(_flatten_sequential(module.net, "net.")), "mlp"
        if isinstance(module, nn.Sequential) and t.forward is nn.Sequential.forward:
            return "sequential", list(_flatten_sequential(module, "")), ""
        if isinstance(module, SingleLogitPolicy) and t.forward is SingleLogitPolicy.forward:
            return "single_logit", [], ""
        if isinstance(module, TabularSoftmaxPolicy) and t.forward is TabularSoftmaxPolicy.forward:
            return "tabular", [], ""
        raise StructuredUnsupported(f"module {t.__name__} is not a Sequential of Linear + elementwise layers "
                                    "nor an ntrl MLP / single-logit / tabular policy")

    # -------------------------------------------------------------- checks
    def check(self, X: object, metrics: Mapping[str, Metric] = (), n_params: int | None = None) -> PerState:
        """The property's :class:`PerState`, after checking that every metric is supported."""
        spec = per_state_of(X)
        if spec is None:
            raise StructuredUnsupported(f"property {getattr(X, 'name', X)!r} does not declare per_state")
        if self.kind == "sequential" and torch.as_tensor(spec.obs).ndim != 2:
            raise StructuredUnsupported("a Sequential policy needs observations of shape (N, d)")
        for m in dict(metrics).values():
            metric_diagonal(m, n_params if n_params is not None else -1)
        return spec

    # -------------------------------------------------------------- the trace
    def _value(self, params: ParamDict, name: str, dtype: torch.dtype) -> Tensor:
        if name in params:
            return params[name]
        p = self.module.get_parameter(name).detach()
        return p.to(dtype) if p.is_floating_point() else p

    def trace(self, spec: PerState, params: ParamDict) -> Trace:
        """One forward and one backward pass of Σ_i X_i: X and, per layer, (δ, a)."""
        first = next(iter(params.values()))
        dtype, device = first.dtype, first.device
        obs = torch.as_tensor(spec.obs, device=device)
        obs = obs.to(dtype) if obs.is_floating_point() else obs
        with torch.enable_grad():
            if self.kind == "sequential":
                return self._trace_sequential(spec, params, obs, dtype)
            return self._trace_table(spec, params, obs, dtype)

    def _trace_sequential(self, spec: PerState, params: ParamDict, obs: Tensor, dtype) -> Trace:
        if self.prefix == "mlp":  # as MLPPolicy.forward: its encoding of the observations
            x = self.module.encode(obs, dtype)
        else:
            x = obs
        outputs, records = [], []
        for step in self.steps:
            if isinstance(step, _Act):
                x = step.module(x)
                continue
            W = self._value(params, step.weight, dtype).detach()
            b = None if step.bias is None else self._value(params, step.bias, dtype).detach()
            a = x.detach()
            y = F.linear(x, W, b)
            if not y.requires_grad:  # the first layer: make its output the root of the graph
                y.requires_grad_(True)
            outputs.append(y)
            records.append((a, step))
            x = y
        value = spec.fn(x).reshape(-1)
        if value.shape[0] != x.shape[0]:
            raise StructuredUnsupported(f"per_state fn returned {value.shape[0]} values for {x.shape[0]} states")
        deltas = (torch.autograd.grad(value.sum(), outputs, allow_unused=True)
                  if outputs and value.requires_grad else (None,) * len(outputs))
        layers = []
        for (a, step), y, delta in zip(records, outputs, deltas):
            delta = torch.zeros_like(y) if delta is None else delta
            factors = []
            if step.weight in self.names:
                factors.append(Factor(step.weight, a, "linear"))
            if step.bias is not None and step.bias in self.names:
                factors.append(Factor(step.bias, None, "bias"))
            if factors:
                layers.append(LayerGrads(delta.detach(), factors))
        return Trace(value.detach(), layers)

    def _trace_table(self, spec: PerState, params: ParamDict, obs: Tensor, dtype) -> Trace:
        n = obs.shape[0] if obs.ndim > 0 else 1
        m = self.module
        if self.kind == "single_logit":
            b = self._value(params, "bias", dtype).detach()
            zero = torch.zeros((), dtype=b.dtype)
            z = torch.stack([b, zero] if m.target == 0 else [zero, b]).expand(n, 2)
            z = z.detach().requires_grad_(True)
            value, delta = _grad_rows(spec, z)
            t = m.target
            layers = [LayerGrads(delta[:, t:t + 1].detach(), [Factor("bias", None, "bias")])] if "bias" in self.names else []
            return Trace(value.detach(), layers)
        theta = self._value(params, "logits", dtype).detach()
        if m.n_states == 1:
            idx = torch.zeros(n, dtype=torch.long, device=theta.device)
        else:
            idx = obs.reshape(n, -1)[:, 0].long()
        z = theta[idx].detach().requires_grad_(True)
        value, delta = _grad_rows(spec, z)
        a = F.one_hot(idx, m.n_states).to(theta.dtype)
        layers = [LayerGrads(delta.detach(), [Factor("logits", a, "transposed")])] if "logits" in self.names else []
        return Trace(value.detach(), layers)

    # -------------------------------------------------------------- tangent quantities
    def ntvar(self, tr: Trace, kind: str, d: ParamDict | None) -> Tensor:
        """NTVar_M(X_i) = Σ_l (‖a_i‖² + 1)‖δ_i‖² (M = I) or Σ_l (δ_i²)ᵀ D_W (a_i²) + (δ_i²)ᵀ d_b (M = diag(d))."""
        out = torch.zeros_like(tr.value)
        for L in tr.layers:
            if kind == "euclidean":
                scale = None
                for f in L.factors:
                    t = 1.0 if f.a is None else torch.linalg.vector_norm(f.a, dim=1).square_()
                    scale = t if scale is None else scale + t
                out += torch.linalg.vector_norm(L.delta, dim=1).square_() * scale
                continue
            d2 = L.delta.square()
            for f in L.factors:
                D = f.matrix(d[f.name], L.delta.shape[1])
                out += d2 @ D if f.a is None else (d2 @ D).mul_(f.a.square()).sum(1)
        return out

    def ntcov(self, tr: Trace, v: ParamDict) -> Tensor:
        """∇X_i · v = Σ_l δ_iᵀ G_W a_i + δ_iᵀ g_b, with G_W, g_b the blocks of the direction v."""
        out = torch.zeros_like(tr.value)
        for L in tr.layers:
            for f in L.factors:
                G = f.matrix(v[f.name], L.delta.shape[1])
                out += L.delta @ G if f.a is None else (L.delta @ G).mul_(f.a).sum(1)
        return out

    def ntcov_many(self, tr: Trace, V: ParamDict) -> Tensor:
        """∇X_i · v_k for r directions at once, shape (N, r): as :meth:`ntcov`, with the blocks
        of V holding the r directions stacked, (r, *shape) per parameter."""
        out = tr.value.new_zeros(tr.value.shape[0], next(iter(V.values())).shape[0])
        for L in tr.layers:
            n_out = L.delta.shape[1]
            for f in L.factors:
                G = V[f.name]
                if f.a is None:
                    out += L.delta @ G.reshape(-1, n_out).T
                    continue
                r = G.shape[0]
                Gm = G.reshape(r, -1, n_out).transpose(1, 2) if f.layout == "transposed" else G.reshape(r, n_out, -1)
                # Σ_jk δ_ij G_kjl a_il = Σ_j δ_ij (a_i G_kᵀ)_j: one matmul for all r directions
                aG = f.a @ Gm.reshape(r * n_out, -1).T  # (N, r·out)
                out += (aG.reshape(-1, r, n_out) * L.delta[:, None, :]).sum(-1)
        return out

    def jacobian(self, tr: Trace, shapes: Mapping[str, torch.Size]) -> ParamDict:
        """The per-state gradients themselves, batched per parameter with shape (n, *shape):
        ∇_W X_i = δ_i a_iᵀ (a_i δ_iᵀ for a transposed layout), ∇_b X_i = δ_i, and zeros for a
        parameter the trace does not reach. Memory n × P: meant for few states (a Fisher's rows)."""
        n = tr.value.shape[0]
        out: ParamDict = {}
        for L in tr.layers:
            for f in L.factors:
                if f.a is None:
                    g = L.delta
                elif f.layout == "transposed":
                    g = f.a[:, :, None] * L.delta[:, None, :]
                else:
                    g = L.delta[:, :, None] * f.a[:, None, :]
                out[f.name] = g.reshape(n, *shapes[f.name])
        for name, shape in shapes.items():
            if name not in out:
                out[name] = tr.value.new_zeros(n, *shape)
        return out

    def gram_block(self, r: Trace, c: Trace, kind: str, d: ParamDict | None) -> Tensor:
        """K_rc = J_r M J_cᵀ for one tile of row states r and column states c.

        M = I:        K = Σ_l (Ã_r Ã_cᵀ) ∘ (Δ_r Δ_cᵀ), where Ã = [A, 1] stacks the inputs of every
                      parameter of the layer (a column of ones for a bias), so Ã_r Ã_cᵀ = A_r A_cᵀ + 1.
        M = diag(d):  K = Σ_l Σ_jk d_jk (δ_rj a_rk)(δ_cj a_ck), by forming the rows δ ⊗ a of this
                      tile only (memory: tile × parameters of one layer).
        """
        K: Tensor | None = None
        for Lr, Lc in zip(r.layers, c.layers):
            if kind == "euclidean":
                inner = _augmented(Lr) @ _augmented(Lc).T
                dd = Lr.delta @ Lc.delta.T
                K = dd.mul_(inner) if K is None else K.addcmul_(dd, inner)
                continue
            out = Lr.delta.shape[1]
            for fr, fc in zip(Lr.factors, Lc.factors):
                D = fr.matrix(d[fr.name], out)
                if fr.a is None:
                    part = (Lr.delta * D) @ Lc.delta.T
                else:
                    Rr = (Lr.delta[:, :, None] * fr.a[:, None, :]) * D
                    Rc = Lc.delta[:, :, None] * fc.a[:, None, :]
                    part = Rr.flatten(1) @ Rc.flatten(1).T
                K = part if K is None else K.add_(part)
        return r.value.new_zeros(r.value.shape[0], c.value.shape[0]) if K is None else K

    def gram(self, rows: Trace, cols: Trace | None, kind: str, d: ParamDict | None, block: int) -> Tensor:
        """The full NTCov_M matrix in (block × block) tiles; symmetric when ``cols`` is None."""
        if block < 1:
            raise ValueError(f"block size must be >= 1, got {block}")
        sym = cols is None
        cols = rows if sym else cols
        n, m = rows.value.shape[0], cols.value.shape[0]
        if n <= block and m <= block:
            return self.gram_block(rows, cols, kind, d)
        K = rows.value.new_empty(n, m)
        for i in range(0, n, block):
            ri = rows.select(slice(i, i + block))
            for j in range(i if sym else 0, m, block):
                Kij = self.gram_block(ri, cols.select(slice(j, j + block)), kind, d)
                K[i:i + block, j:j + block] = Kij
                if sym and j != i:
                    K[j:j + block, i:i + block] = Kij.T
        return K
