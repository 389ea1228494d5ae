"""The tangent-covariance engine: every tangent quantity in ntrl is computed here.

For scalar properties X(θ), Y(θ) of a policy's parameters θ and a symmetric metric M
(the optimizer's preconditioner),

    NTCov_M(X, Y) = ∇θX · M ∇θY,        NTVar_M(X) = NTCov_M(X, X),

and for the log-odds z_a = log π_a − log(1 − π_a) of an action, the logit kernel is
κ = NTVar(z_a) = ‖∇θ z_a‖², so that NTVar(π_a) = π_a²(1 − π_a)²·κ exactly.

A *property* is any callable ``X(view) -> Tensor`` that maps a :class:`PolicyView` (the policy
evaluated at explicit parameters) to a scalar or a 1-D batch of scalars.  The reference backend
materialises the Jacobian ∂X/∂θ with ``torch.func.jacrev``; faster backends must agree with it
in float64 (see tests/test_tangent_*.py).

Backends: ``TangentEngine(module, backend="auto")`` uses the layer-structured backend of
:mod:`ntrl.engine.structured` (no per-state gradients, no Jacobian) whenever the property
declares ``per_state``, the module is a Sequential of Linear + elementwise layers (or an ntrl
policy) and every metric is Euclidean or diagonal; otherwise it falls back, entirely, to the
reference (an InverseFisher metric needs the Jacobian, so a query that includes one runs on
the reference). ``backend="reference"`` always uses jacrev; ``backend="structured"`` raises
:class:`StructuredUnsupported` where the structured backend cannot apply. ``TangentStats.backend``
and the ``ntrl.engine.tangent`` logger say which backend answered: once per property and backend at
INFO (what ``ntrl train --verbose`` prints), and for every query at DEBUG.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from ntrl.engine.metrics import Euclidean, InverseFisher, Metric
from ntrl.engine.structured import (
    PerState,
    StructuredBackend,
    StructuredUnsupported,
    Trace,
    metric_diagonal,
)

log = logging.getLogger(__name__)
BACKENDS = ("auto", "reference", "structured")

ParamDict = dict[str, Tensor]


class PolicyView:
    """A policy module evaluated at explicit parameters (``torch.func.functional_call``).

    ``logits(obs)`` returns z(obs; θ) of shape (N, K); ``log_probs`` is log_softmax(z),
    computed in log space so that probabilities down to 1e-300 stay finite in float64.
    """

    def __init__(self, module: nn.Module, params: ParamDict):
        self.module = module
        self.params = params
        first = next(iter(params.values()))
        self.dtype = first.dtype
        self.device = first.device

    def as_obs(self, obs: Tensor) -> Tensor:
        """Cast observations to the view's floating dtype (integer obs are kept as they are)."""
        obs = torch.as_tensor(obs, device=self.device)
        return obs.to(self.dtype) if obs.is_floating_point() else obs

    def logits(self, obs: Tensor) -> Tensor:
        return functional_call(self.module, self.params, (self.as_obs(obs),))

    def log_probs(self, obs: Tensor) -> Tensor:
        """log π(·|obs) = log_softmax(z), shape (N, K)."""
        return torch.log_softmax(self.logits(obs), dim=-1)

    def probs(self, obs: Tensor) -> Tensor:
        return self.log_probs(obs).exp()


TangentFn = Callable[[PolicyView], Tensor]


def log_odds(log_probs: Tensor, action: int) -> Tensor:
    """z_a = log π_a − log(1 − π_a), with log(1 − π_a) = logsumexp_{b≠a} log π_b (stable)."""
    others = torch.cat([log_probs[..., :action], log_probs[..., action + 1 :]], dim=-1)
    return log_probs[..., action] - torch.logsumexp(others, dim=-1)


def log_odds_of_logits(logits: Tensor, action: int) -> Tensor:
    """z_a from logits (N, K): log_odds(log_softmax(logits), a), row by row (a per-state fn)."""
    return log_odds(torch.log_softmax(logits, dim=-1), action)


def set_log_odds(logits: Tensor, mask: Tensor) -> Tensor:
    """z = log π(A|o) − log π(not A|o) for the set of actions A that ``mask`` marks in each row
    (the juice gridworld's approach moves), in log space (logsumexp over A and over the others),
    from logits of shape (..., K) and a 0/1 mask broadcastable to them."""
    logp = torch.log_softmax(logits, dim=-1)
    m = mask.bool()
    inside = torch.logsumexp(logp.masked_fill(~m, float("-inf")), dim=-1)
    outside = torch.logsumexp(logp.masked_fill(m, float("-inf")), dim=-1)
    return inside - outside


class _KappaProperty:
    """X = z_a at ``obs``: the property behind :meth:`TangentEngine.kappa` (per-state)."""

    def __init__(self, obs: Tensor, action: int):
        self.obs, self.action = obs, action
        self.name = "kappa"
        self.per_state = PerState(obs, self.of_logits)

    def of_logits(self, logits: Tensor) -> Tensor:
        return log_odds_of_logits(logits, self.action)

    def __call__(self, v: "PolicyView") -> Tensor:
        return log_odds(v.log_probs(self.obs), self.action)


@dataclass
class TangentStats:
    """What one engine query returns for a property X with n entries.

    value:  X itself, shape (n,)
    ntvar:  metric name -> NTVar_M(X), shape (n,)
    ntcov:  direction name -> ∇X · M v (M already folded into v by the caller), shape (n,)
    backend: which implementation produced the numbers
    gradient: the Jacobian ∂X/∂θ, shape (n, P), when the backend formed it (the reverse-mode
        path does; the structured backend never forms it), else None
    """

    value: Tensor
    ntvar: dict[str, Tensor] = field(default_factory=dict)
    ntcov: dict[str, Tensor] = field(default_factory=dict)
    backend: str = "reference"
    gradient: Tensor | None = None


class TangentEngine:
    """Computes NTCov, NTVar, NTCov matrices and κ for properties of one policy module.

    ``dtype=torch.float64`` evaluates everything on float64 copies of the parameters, which is
    what the analysis of tiny probabilities (p down to 1e-12) needs.

    ``backend``: "auto" (structured where it applies, else reference), "reference" (always
    torch.func), or "structured" (raise :class:`StructuredUnsupported` where it cannot apply).
    ``gram_block`` bounds the tile size of structured NTCov matrices.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype | None = None, backend: str = "auto",
                 gram_block: int = 1024):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.module = module
        self.dtype = dtype
        # the module's own parameter tensors, held as torch.optim holds them: in-place updates
        # (optimizer steps, load_state_dict) are seen, and no module traversal is paid per query
        self._tracked = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in self._tracked]
        self.shapes = {n: p.shape for n, p in self._tracked}
        self.n_params = sum(int(torch.Size(s).numel()) for s in self.shapes.values())
        self.backend = backend
        self.gram_block = int(gram_block)
        self.structured: StructuredBackend | None = None
        self._announced: set[tuple[str, str, str]] = set()
        self._unsupported = "backend='reference' was requested"
        if backend != "reference":
            try:
                self.structured = StructuredBackend(module, self.names)
            except StructuredUnsupported as e:
                if backend == "structured":
                    raise StructuredUnsupported(f"backend='structured' cannot apply: {e}") from e
                self._unsupported = str(e)

    # ---------------------------------------------------------------- parameters
    def params(self) -> ParamDict:
        """The current parameters, detached and cast to the engine's dtype. Without a cast they
        share storage with the module's (an optimizer step changes them): clone to keep θ."""
        out = {}
        for n, p in self._tracked:
            q = p.detach()
            out[n] = q.to(self.dtype) if self.dtype is not None else q
        return out

    def view(self, params: ParamDict | None = None) -> PolicyView:
        return PolicyView(self.module, self.params() if params is None else params)

    def flatten(self, tensors: Mapping[str, Tensor], batch_dims: int = 0) -> Tensor:
        """Concatenate per-parameter tensors into flat vectors, in ``named_parameters`` order."""
        parts = []
        for n in self.names:
            t = tensors[n]
            lead = t.shape[:batch_dims]
            parts.append(t.reshape(*lead, -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor) -> ParamDict:
        """Split flat vectors (shape (..., P)) into per-parameter blocks of shape (..., *shape)."""
        if flat.shape[-1] != self.n_params:
            raise ValueError(f"vectors have {flat.shape[-1]} entries, expected {self.n_params}")
        out, i = {}, 0
        lead = flat.shape[:-1]
        for n in self.names:
            k = int(torch.Size(self.shapes[n]).numel())
            out[n] = flat[..., i : i + k].reshape(tuple(lead) + tuple(self.shapes[n]))
            i += k
        return out

    # ---------------------------------------------------------------- gradients
    def evaluate(self, X: TangentFn, params: ParamDict | None = None) -> Tensor:
        """X(θ) as a 1-D tensor."""
        with torch.no_grad():
            return X(self.view(params)).reshape(-1).clone()  # never a view of a parameter

    def jacobian(self, X: TangentFn, params: ParamDict | None = None) -> tuple[Tensor, Tensor]:
        """(X(θ), ∂X/∂θ): values of shape (n,) and the flat Jacobian of shape (n, P).

        Reference implementation: ``torch.func.jacrev`` over the parameter dict.
        """
        params = self.params() if params is None else params

        def f(p: ParamDict) -> tuple[Tensor, Tensor]:
            v = X(PolicyView(self.module, p)).reshape(-1)
            return v, v

        jac, value = jacrev(f, has_aux=True)(params)
        return value.detach().clone(), self.flatten(jac, batch_dims=1).detach()

    def dense_jacobian(self, X: TangentFn, params: ParamDict | None = None,
                       max_rows: int = 16) -> tuple[Tensor, Tensor]:
        """Like :meth:`jacobian` (same values, same (n, P) Jacobian), by the cheapest route:

        * a per-state X on the structured backend: one forward and one backward pass, and the
          rows ∇_W X_i = δ_i a_iᵀ, ∇_b X_i = δ_i assembled layer by layer;
        * an X of at most ``max_rows`` entries: one forward pass and one reverse-mode pass per
          entry (``torch.autograd.grad``), because for a handful of outputs vmap's machinery
          costs more than the gradients themselves;
        * otherwise the ``jacrev`` reference.

        Whatever the ``backend`` option (bar "reference", which never uses the structured
        backend), a property without a per-state form takes the reverse-mode route: a Jacobian
        always exists, and the utility gradient needs one.
        """
        spec = None
        if self.structured is not None and self.backend != "reference":
            try:
                spec = self.structured.check(X, {}, self.n_params)
            except StructuredUnsupported:
                spec = None
        if spec is not None:
            tr = self._trace(spec, params)
            return tr.value, self.flatten(self.structured.jacobian(tr, self.shapes), batch_dims=1)
        params = self.params() if params is None else params
        values, rows = self._reverse_rows([X], params, max_rows)
        if values is None:
            return self.jacobian(X, params)
        return values[0], rows[0]

    def _reverse_rows(self, fns: Sequence[TangentFn], params: ParamDict,
                      max_rows: int | None = None) -> tuple[list[Tensor] | None, list[Tensor]]:
        """One shared forward pass of several properties, then one reverse-mode pass per entry,
        taken from each property's own output (so a pass never walks another property's graph).
        Returns (values, Jacobians) per property, or (None, []) when there are more than
        ``max_rows`` entries in all."""
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        inputs = [leaves[n] for n in self.names]
        view = PolicyView(self.module, leaves)
        with torch.enable_grad():
            outs = [X(view).reshape(-1) for X in fns]
            if max_rows is not None and sum(o.numel() for o in outs) > max_rows:
                return None, []
            values, jacobians = [], []
            for out in outs:
                rows = []
                for i in range(out.numel()):
                    grads = (torch.autograd.grad(out[i], inputs, retain_graph=True, allow_unused=True)
                             if out.requires_grad else [None] * len(inputs))
                    rows.append(torch.cat([(g if g is not None else torch.zeros_like(x)).reshape(-1)
                                           for x, g in zip(inputs, grads)]))
                values.append(out.detach().clone())  # X may be a view of a parameter, which a step overwrites
                jacobians.append(torch.stack(rows) if rows else out.new_zeros(0, self.n_params))
        return values, jacobians

    def value_and_gradient(self, X: TangentFn, params: ParamDict | None = None) -> tuple[float, Tensor]:
        """(X(θ), ∇θX) for a scalar property; the gradient is flat, shape (P,).

        One reverse-mode pass (``torch.autograd.grad``): for the scalar utility this is several
        times cheaper than ``jacrev`` on small networks; tests check it against :meth:`jacobian`.
        """
        value, J = self.dense_jacobian(X, params)
        if J.shape[0] != 1:
            raise ValueError(f"value_and_gradient() needs a scalar property, got {J.shape[0]} values")
        return float(value[0]), J[0]

    def gradient(self, X: TangentFn, params: ParamDict | None = None) -> Tensor:
        """∇θX for a scalar property, as a flat vector of shape (P,)."""
        return self.value_and_gradient(X, params)[1]

    # ---------------------------------------------------------------- backend dispatch
    def _announce(self, X: object, backend: str, reason: str = "") -> None:
        """Say once per (property, backend, reason) at INFO which backend answers (``ntrl train
        --verbose`` shows it); every query is logged at DEBUG."""
        name = getattr(X, "name", None) or repr(X)
        log.debug("tangent engine: %s backend for %r", backend, name)
        if (name, backend, reason) not in self._announced:
            self._announced.add((name, backend, reason))
            log.info("tangent engine: %s backend for %r%s", backend, name, f" ({reason})" if reason else "")

    def _per_state(self, X: TangentFn, metrics: Mapping[str, Metric]) -> PerState | None:
        """X's per-state spec when the structured backend applies to (X, metrics), else None."""
        return self._dispatch(X, metrics)[0]

    def _dispatch(self, X: TangentFn, metrics: Mapping[str, Metric]) -> tuple[PerState | None, str]:
        """(X's per-state spec, "") when the structured backend applies to (X, metrics), else
        (None, why not); with ``backend="structured"`` the reason is raised instead."""
        reason = self._unsupported
        if self.structured is not None:
            try:
                return self.structured.check(X, metrics, self.n_params), ""
            except StructuredUnsupported as e:
                reason = str(e)
        if self.backend == "structured":
            raise StructuredUnsupported(f"backend='structured' cannot apply: {reason}")
        return None, reason

    def _trace(self, spec: PerState, params: ParamDict | None = None) -> Trace:
        assert self.structured is not None
        return self.structured.trace(spec, self.params() if params is None else params)

    def _blocks(self, v: Tensor, dtype: torch.dtype) -> ParamDict:
        if v.shape != (self.n_params,):
            raise ValueError(f"direction/metric vector has shape {tuple(v.shape)}, expected ({self.n_params},)")
        return self.unflatten(v.to(dtype))

    def _metric_blocks(self, metric: Metric, dtype: torch.dtype) -> tuple[str, ParamDict | None]:
        kind, d = metric_diagonal(metric, self.n_params)
        return kind, None if d is None else self._blocks(d, dtype)

    def _structured_gram(self, specs: Sequence[PerState], metric: Metric,
                         cols: Sequence[PerState] | None = None) -> Tensor:
        rows = Trace.cat([self._trace(s) for s in specs])
        col = None if cols is None else Trace.cat([self._trace(s) for s in cols])
        kind, d = self._metric_blocks(metric, rows.value.dtype)
        log.debug("tangent engine: structured backend for an NTCov matrix of %d states", rows.value.shape[0])
        return self.structured.gram(rows, col, kind, d, self.gram_block)

    # ---------------------------------------------------------------- tangent quantities
    def stats(
        self,
        X: TangentFn,
        metrics: Mapping[str, Metric] | None = None,
        directions: Mapping[str, Tensor] | None = None,
        params: ParamDict | None = None,
    ) -> TangentStats:
        """One query: X, NTVar_M(X) for each named metric, and ∇X·v for each named direction.

        NTVar_M(X)_i = ∇X_i · M ∇X_i;   ntcov[name]_i = ∇X_i · v_name.
        To get NTCov_M(X, U) pass v = M ∇U (the optimizer's actual step direction).
        """
        return self.stats_many([X], metrics, directions, params)[0]

    def stats_many(
        self,
        props: Sequence[TangentFn],
        metrics: Mapping[str, Metric] | None = None,
        directions: Mapping[str, Tensor] | None = None,
        params: ParamDict | None = None,
    ) -> list[TangentStats]:
        """:meth:`stats` for several properties. Those the structured backend takes go one by
        one; the others share one forward pass, take one reverse-mode pass per entry, and return
        their Jacobian rows in ``TangentStats.gradient``."""
        metrics = {"euc": Euclidean()} if metrics is None else metrics
        directions = {} if directions is None else directions
        # exact inverse-Fisher metrics are low rank: the structured backend gets them from
        # directional derivatives (see InverseFisher.low_rank)
        low_rank = {k: m.low_rank() for k, m in metrics.items() if isinstance(m, InverseFisher)}
        low_rank = {k: lr for k, lr in low_rank.items() if lr is not None}
        plain = {k: m for k, m in metrics.items() if k not in low_rank}
        out: list[TangentStats | None] = [None] * len(props)
        dense, why = [], {}
        for i, X in enumerate(props):
            spec, why[i] = self._dispatch(X, plain)
            if spec is None:
                dense.append(i)
            else:
                out[i] = self._structured_stats(spec, plain, low_rank, directions, params)
                self._announce(X, "structured")
        if dense:
            params = self.params() if params is None else params
            values, jacobians = self._reverse_rows([props[i] for i in dense], params, max_rows=16)
            if values is None:  # many entries: one jacrev of them all
                sizes: list[int] = []

                def stacked(view: PolicyView) -> Tensor:
                    parts = [props[i](view).reshape(-1) for i in dense]
                    sizes[:] = [int(x.numel()) for x in parts]
                    return torch.cat(parts)

                value, J = self.jacobian(stacked, params)
                values, jacobians = list(value.split(sizes)), list(J.split(sizes))
            for i, v, Ji in zip(dense, values, jacobians):
                self._announce(props[i], "reference", why[i])
                st = TangentStats(value=v, backend="reference", gradient=Ji)
                for name, metric in metrics.items():
                    st.ntvar[name] = (Ji * metric.apply(Ji)).sum(dim=-1)
                for name, d in directions.items():
                    st.ntcov[name] = Ji @ d.to(Ji.dtype)
                out[i] = st
        return out  # type: ignore[return-value]

    def _structured_stats(self, spec: PerState, metrics: Mapping[str, Metric], low_rank: Mapping[str, tuple],
                          directions: Mapping[str, Tensor], params: ParamDict | None) -> TangentStats:
        """Per-layer NTVar and NTCov; a low-rank metric Vhᵀ diag(w) Vh + (I − VhᵀVh)/λ from the
        directional derivatives C_k = ∇X·v_k: Σ_k w_k C_k² + (‖∇X‖² − Σ_k C_k²)/λ."""
        tr = self._trace(spec, params)
        dtype = tr.value.dtype
        out = TangentStats(value=tr.value, backend="structured")
        for name, metric in metrics.items():
            out.ntvar[name] = self.structured.ntvar(tr, *self._metric_blocks(metric, dtype))
        for name, (Vh, w, lam) in low_rank.items():
            C = (self.structured.ntcov_many(tr, self.unflatten(Vh.to(dtype))) if Vh.shape[0]
                 else tr.value.new_zeros(tr.value.shape[0], 0))
            ntvar = (C**2 * w.to(dtype)).sum(dim=-1)
            if lam > 0:
                euc = self.structured.ntvar(tr, *self._metric_blocks(Euclidean(), dtype))
                ntvar = ntvar + (euc - (C**2).sum(dim=-1)) / lam
            out.ntvar[name] = ntvar
        for name, v in directions.items():
            out.ntcov[name] = self.structured.ntcov(tr, self._blocks(v, dtype))
        return out

    def ntcov(self, X: TangentFn, Y: TangentFn, metric: Metric | None = None) -> Tensor:
        """NTCov_M(X, Y) = ∂X/∂θ · M · (∂Y/∂θ)ᵀ, shape (n_X, n_Y)."""
        metric = metric or Euclidean()
        sx, sy = self._per_state(X, {"m": metric}), self._per_state(Y, {"m": metric})
        if sx is not None and sy is not None:
            return self._structured_gram([sx], metric, cols=[sy])
        _, Jx = self.jacobian(X)
        _, Jy = self.jacobian(Y)
        return Jx @ metric.apply(Jy).T

    def ntvar(self, X: TangentFn, metric: Metric | None = None) -> Tensor:
        """NTVar_M(X) = ∇X · M ∇X for each entry of X, shape (n,)."""
        metric = metric or Euclidean()
        return self.stats(X, metrics={"m": metric}).ntvar["m"]

    def ntcov_matrix(self, props: Sequence[TangentFn], metric: Metric | None = None) -> Tensor:
        """The NTCov_M matrix between all entries of several properties (stacked in order)."""
        metric = metric or Euclidean()
        specs = [self._per_state(X, {"m": metric}) for X in props]
        if specs and all(s is not None for s in specs):
            return self._structured_gram(specs, metric)
        J = torch.cat([self.jacobian(X)[1] for X in props], dim=0)
        return J @ metric.apply(J).T

    def kappa(self, obs: Tensor, action: int, metric: Metric | None = None) -> Tensor:
        """κ = ‖∇θ z_a‖² for the log-odds z_a of ``action`` at each observation, shape (N,)."""
        return self.ntvar(_KappaProperty(obs, action), metric)
