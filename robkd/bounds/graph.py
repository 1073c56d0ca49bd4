"""IBP, CROWN and alpha-CROWN over a traced network (:class:`BoundedModel`).

:mod:`robkd.bounds.trace` turns the model into bound operators (:mod:`robkd.bounds.ops`, one per
op family); this module propagates bounds through them. Intermediate bounds (the pre-activation
bounds of every ReLU) are computed layer by layer in topological order. Under ``crown`` and
``alpha-crown`` the default is *full CROWN* for intermediate layers: each pre-activation neuron that
IBP leaves unstable gets a backward CROWN bound (and the result is intersected with IBP, so it is
never looser); convolution layers use windowed coefficients (:mod:`robkd.bounds.windows`).
``intermediate="ibp"`` is the cheaper CROWN-IBP variant (IBP for intermediates, CROWN at the
output). alpha-CROWN optimises the lower ReLU slopes of the *output* bound only (intermediate bounds
come from CROWN), by projected Adam on alpha in [0, 1].
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch
from torch import nn

from robkd.bounds import ops, windows
from robkd.bounds.inputset import InputSet, concretize
from robkd.bounds.frontend import trace_network
from robkd.errors import UnsupportedModelError, UsageError
from robkd.types import Norm

METHODS = ("ibp", "crown", "alpha-crown")
# elements of the dense matrix of one layer kept as its unit response
_UNIT_BUDGET = 1 << 25
# elements of one coefficient chunk in the intermediate pass (the default memory cap of a chunk: 4 MiB of
# float32 per live coefficient tensor, small enough for the CPU caches); see BoundedModel.chunk_elements
_CHUNK_BUDGET = 1 << 22
# coefficient tensors of a chunk's size alive at once in a backward pass (A, its clamp, the new A, a branch)
_LIVE = 4



class DeadlineExceeded(Exception):
    """A bound computation passed :attr:`BoundedModel.deadline` (``time.perf_counter()`` seconds); raised
    between chunks / optimisation steps, so it overshoots by at most one chunk (see robkd.bounds.budget)."""


# A ReLU's CROWN relaxation: (lower slope, upper - lower slope, upper intercept or None when zero)
Relaxation = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class BoundedModel:
    """A traced network as a list of bound operators in topological order.

    ``input_shape`` is the per-sample shape ``(C, H, W)`` (or any shape the
    model accepts). Build once, then call :meth:`bounds` for any batch.
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        self.model = model
        self.input_shape = tuple(int(s) for s in input_shape)
        traced = trace_network(model, self.input_shape)
        self.dtype: torch.dtype = traced.dtype  # bounds are computed in the model's dtype
        self.front_end: str = traced.front_end  # "fx" or "export"
        self._message = traced.message
        self.ops: list[ops.BoundOp] = traced.ops
        self.unsupported: list[str] = traced.unsupported  # unsupported under every method
        self.no_backward: list[str] = traced.no_backward  # supported by IBP only
        self.input_name: str = traced.input_name
        # "" when the model has no single tensor output (then :meth:`check` fails for every method)
        self.output_name: str = traced.output_name or ""
        self.index = {op.name: i for i, op in enumerate(self.ops)}
        self.relu_ops = [op for op in self.ops if isinstance(op, ops.ReLU)]
        self.relu_inputs = {op.inputs[0] for op in self.relu_ops}
        # operators with a precomputable CROWN relaxation (ReLU, max pooling)
        self.relax_ops = [op for op in self.ops if isinstance(op, (ops.ReLU, ops.MaxPool2d))]
        self.total_relus = sum(math.prod(op.out_shape) for op in self.relu_ops)
        # piecewise-linear operators other than ReLU (max pooling): linear on a set only where decided
        self.piecewise_ops = [op for op in self.ops if not op.is_linear and not isinstance(op, ops.ReLU)]
        self._targets: dict[Norm, frozenset[str]] = {}
        self._plans: dict[str, windows.Plan | None] = {}
        self._units: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
        # coefficient elements (all live tensors together) one chunk of intermediate CROWN problems may use
        self.chunk_elements = _CHUNK_BUDGET
        self.crown_problems = 0  # (sample, neuron) backward problems solved by the intermediate pass so far
        self.deadline: float | None = None  # time.perf_counter() after which CROWN raises DeadlineExceeded

    # ------------------------------------------------------------------ checks
    def check(self, method: str) -> None:
        """Raise one :class:`UnsupportedModelError` listing every operator ``method`` cannot handle."""
        if method not in METHODS:
            raise UsageError(f"unknown bound method {method!r}: use one of {', '.join(METHODS)}")
        bad = list(self.unsupported)
        if method != "ibp":
            bad += self.no_backward
        if bad:
            raise UnsupportedModelError(f"bound propagation ({method}) {self._message(bad)}", unsupported=bad)

    # ------------------------------------------------------------------ evaluation
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output computed by the bound operators (equals the model's)."""
        vals = {self.input_name: x}
        for op in self.ops:
            vals[op.name] = op.forward(*(vals[i] for i in op.inputs))
        return vals[self.output_name]

    def bounds(
        self,
        x: torch.Tensor,
        eps: "float | torch.Tensor",
        *,
        norm: Norm = Norm.LINF,
        method: str = "crown",
        C: torch.Tensor | None = None,
        intermediate: str = "crown",
        alpha_steps: int = 20,
        alpha_lr: float = 0.1,
        node_bounds: dict[str, ops.Bounds] | None = None,
        upper: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, ops.Bounds]]:
        """Lower/upper bounds of ``C @ logits`` over the ball, and every node's bounds.

        ``C`` is ``(S, K)`` or ``(B, S, K)`` (identity when None). Returns
        ``(lb, ub, node_bounds)`` with ``lb``/``ub`` of shape ``(B, S)``.
        ``node_bounds`` may be given to reuse precomputed intermediate bounds.
        ``upper=False`` skips the backward pass for the upper bound (``ub`` is then IBP's, still sound).
        """
        self.check(method)
        if intermediate not in ("crown", "ibp"):
            raise UsageError(f"intermediate bounds must be 'crown' or 'ibp', got {intermediate!r}")
        norm = Norm.parse(norm)
        x = x.detach().to(self.dtype)
        B = x.shape[0]
        inputs = InputSet.around(x, eps, norm)
        relax = None
        if node_bounds is None:
            node_bounds, relax = self._intermediate(inputs, method != "ibp" and intermediate == "crown")
        out_lo, out_hi = node_bounds[self.output_name]
        K = out_lo.shape[1] if out_lo.dim() == 2 else math.prod(out_lo.shape[1:])
        if C is None:
            C = torch.eye(K, device=x.device)
        C = C.to(x.device, x.dtype)
        if C.dim() == 2:
            C = C.unsqueeze(0)
        if C.shape[-1] != K or C.shape[0] not in (1, B):
            raise UsageError(f"specification matrix of shape {list(C.shape)} does not fit {B} samples x {K} outputs")
        # IBP on the specification
        flat_lo, flat_hi = out_lo.reshape(B, K, 1), out_hi.reshape(B, K, 1)
        ibp_lb = (C.clamp(min=0) @ flat_lo + C.clamp(max=0) @ flat_hi).squeeze(-1)
        ibp_ub = (C.clamp(min=0) @ flat_hi + C.clamp(max=0) @ flat_lo).squeeze(-1)
        if method == "ibp":
            return ibp_lb, ibp_ub, node_bounds
        S = C.shape[1]
        out_shape = self.ops[self.index[self.output_name]].out_shape
        spec = (torch.cat([C, -C], dim=1) if upper else C).reshape(C.shape[0], -1, *out_shape)
        if relax is None:
            relax = self.relaxations(node_bounds)
        A, bias = self.backward(self.output_name, spec, node_bounds, relax=relax)
        res = concretize(A, bias, inputs)
        if method == "alpha-crown":
            res = self._optimise_alpha(inputs, spec, node_bounds, res, alpha_steps, alpha_lr)
        lb = torch.maximum(res[:, :S], ibp_lb)
        ub = torch.minimum(-res[:, S:], ibp_ub) if upper else ibp_ub
        return lb, ub, node_bounds

    def relaxations(self, node_bounds: dict[str, ops.Bounds]) -> dict[str, Relaxation]:
        """The default CROWN relaxation of every ReLU (and max pooling) whose input bounds are given."""
        out = {}
        for op in self.relax_ops:
            if op.inputs[0] in node_bounds:
                out[op.name] = relaxation(*node_bounds[op.inputs[0]], op)
        return out

    def intermediate_bounds(self, inputs: InputSet, crown: bool) -> dict[str, ops.Bounds]:
        """Bounds of every node over ``inputs`` in topological order: IBP, CROWN-tightened at the ReLU
        inputs when ``crown``."""
        return self._intermediate(inputs, crown)[0]

    def crown_targets(self, norm: Norm) -> frozenset[str]:
        """The ReLU inputs whose IBP bounds CROWN may tighten: all but those one linear operator (after
        elementwise ones) from the input box under Linf, whose IBP bounds are exact."""
        if norm not in self._targets:
            boxlike = {self.input_name: norm is Norm.LINF}
            exact: dict[str, bool] = {}
            targets = set()
            for op in self.ops:
                in_box = all(boxlike.get(i, False) for i in op.inputs)
                boxlike[op.name] = in_box and isinstance(op, (ops.ElementwiseAffine, ops.Reshape))
                # an elementwise affine map of exact per-neuron bounds is exact too (BatchNorm after a conv)
                exact[op.name] = (in_box and len(op.inputs) == 1 and op.is_linear) or boxlike[op.name] or (
                    isinstance(op, (ops.ElementwiseAffine, ops.Reshape)) and exact.get(op.inputs[0], False))
                if op.name in self.relu_inputs and not exact[op.name]:
                    targets.add(op.name)
            self._targets[norm] = frozenset(targets)
        return self._targets[norm]

    def _intermediate(
        self, inputs: InputSet, crown: bool
    ) -> tuple[dict[str, ops.Bounds], dict[str, Relaxation] | None]:
        """Every node's bounds and, under ``crown``, every ReLU's relaxation (None otherwise).

        Each ReLU's relaxation is computed once and gathered for the backward problems of later
        layers; convolution layers use windowed coefficients (:mod:`robkd.bounds.windows`).
        """
        bounds: dict[str, ops.Bounds] = {self.input_name: inputs.box}
        relax: dict[str, Relaxation] | None = {} if crown else None
        targets = self.crown_targets(inputs.norm) if crown else frozenset()
        for op in self.ops:
            ins = [bounds[i] for i in op.inputs]
            lo, hi = op.interval(*ins)
            if op.name in targets:
                lo, hi = self._crown_node(inputs, op, lo, hi, relax, bounds)
            bounds[op.name] = (lo, hi)
            if relax is not None and isinstance(op, (ops.ReLU, ops.MaxPool2d)):
                relax[op.name] = relaxation(*ins[0], op)
        return bounds, relax

    @staticmethod
    def neuron_spec(
        op: ops.BoundOp, unit: Any, pn: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, Any]:
        """The backward specification bounding neurons ``pn`` of ``op`` from below and above (rows ``+e``,
        ``-e``), and its constant: through ``op``'s unit response ``(U, const)`` when it has one."""
        if unit is not None:
            U, const = unit
            a = U[pn]
            return torch.stack([a, -a], 1), torch.stack([const[pn], -const[pn]], 1)
        P, n = pn.shape[0], math.prod(op.out_shape)
        eye = torch.zeros(P, n, device=device, dtype=dtype)
        eye[torch.arange(P), pn] = 1.0
        return torch.stack([eye, -eye], 1).reshape((P, 2) + op.out_shape), 0.0

    def _crown_node(
        self, inputs: InputSet, op: ops.BoundOp, lo: torch.Tensor, hi: torch.Tensor, relax: dict[str, Relaxation],
        bounds: dict[str, ops.Bounds] | None = None,
    ) -> ops.Bounds:
        """Tighten the bounds of the neurons of ``op`` that are unstable under the current bounds.

        Only unstable neurons need CROWN bounds (a stable ReLU's relaxation is exact whatever its bounds).
        Each (sample, unstable neuron) pair is one backward problem, using the precomputed relaxations
        of the earlier ReLUs; pairs are processed in chunks (:attr:`chunk_elements` coefficients, the
        memory cap) as a virtual batch, with windowed coefficients where the layers below allow them
        (:mod:`robkd.bounds.windows`), else dense coefficients one sample at a time (the relaxations are
        broadcast, not copied per pair). The bounds do not depend on the chunk size.
        """
        B = lo.shape[0]
        n = math.prod(op.out_shape)
        lo_f, hi_f = lo.reshape(B, n).clone(), hi.reshape(B, n).clone()
        pairs = ((lo_f < 0) & (hi_f > 0)).nonzero()
        if pairs.numel() == 0:
            return lo, hi
        self.crown_problems += int(pairs.shape[0])
        if op.name not in self._plans:
            self._plans[op.name] = windows.make_plan(self, op)
        plan = self._plans[op.name]
        if plan is not None:
            wp = windows.WindowPass(self, plan, relax, inputs.box, inputs.x, inputs.norm)
            sizes = [s.op.out_shape[0] * s.h * s.w for s in plan.steps]
            per_pair = 2 * _LIVE * max(sizes + [plan.input_step.h * plan.input_step.w * self.input_shape[0]])
            chunk = max(1, self.chunk_elements // per_pair)
            for s in range(0, pairs.shape[0], chunk):
                self.check_deadline()
                ps, pn = pairs[s : s + chunk, 0], pairs[s : s + chunk, 1]
                res = wp.lower(ps, pn, inputs.eps[ps])
                lo_f[ps, pn] = torch.maximum(lo_f[ps, pn], res[:, 0])
                hi_f[ps, pn] = torch.minimum(hi_f[ps, pn], -res[:, 1])
            return lo_f.reshape(lo.shape), hi_f.reshape(hi.shape)
        pos = self.index[op.name]
        unit = self._unit_response(op)
        start = op.inputs[0] if unit is not None else op.name
        chunk = max(1, self.chunk_elements // (2 * _LIVE * self.widest(op.name)))
        relus = [o.name for o in self.relu_ops if self.index[o.name] < pos]
        for b in pairs[:, 0].unique().tolist():
            sample_pn = pairs[pairs[:, 0] == b, 1]
            sub = inputs.select(torch.tensor([b], device=lo.device))
            one_relax = {name: tuple(None if t is None else t[b : b + 1] for t in relax[name]) for name in relus
                         if name in relax}
            for s in range(0, sample_pn.shape[0], chunk):
                self.check_deadline()
                pn = sample_pn[s : s + chunk]
                P = pn.shape[0]
                one_bounds = {k: (v[0][b : b + 1].expand((P,) + v[0].shape[1:]), v[1][b : b + 1].expand((P,) + v[1].shape[1:]))
                              for k, v in (bounds or {}).items()}
                spec, bias0 = self.neuron_spec(op, unit, pn, lo.device)
                if start == self.input_name:
                    A, bias = spec, torch.zeros(P, 2, device=lo.device)
                else:
                    A, bias = self.backward(start, spec, one_bounds, relax=one_relax)
                res = concretize(None if A is None else A.reshape(1, P * 2, -1), (bias + bias0).reshape(1, P * 2), sub)
                res = res.reshape(P, 2)
                lo_f[b, pn] = torch.maximum(lo_f[b, pn], res[:, 0])
                hi_f[b, pn] = torch.minimum(hi_f[b, pn], -res[:, 1])
        return lo_f.reshape(lo.shape), hi_f.reshape(hi.shape)

    def check_deadline(self) -> None:
        """Raise :class:`DeadlineExceeded` when :attr:`deadline` has passed."""
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise DeadlineExceeded(f"bound computation passed its deadline by {time.perf_counter() - self.deadline:.2f}s")

    def widest(self, name: str) -> int:
        """The largest map (elements per sample) among the input and the nodes up to ``name``."""
        pos = self.index[name]
        return max([math.prod(o.out_shape) for o in self.ops[: pos + 1]] + [math.prod(self.input_shape)])

    def _unit_response(self, op: ops.BoundOp) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a Linear/Conv node: the rows of its matrix (n, *in_shape) and its constant (n,), cached;
        None when the operator is of another kind or the matrix would be too large."""
        if not isinstance(op, (ops.Linear, ops.Conv2d)):
            return None
        cache = self._units
        if op.name not in cache:
            n = math.prod(op.out_shape)
            in_shape = tuple(op.in_shape) if isinstance(op, ops.Conv2d) else op.out_shape[:-1] + (op.weight.shape[1],)
            if n * math.prod(in_shape) > _UNIT_BUDGET:
                cache[op.name] = None
            else:
                eye = torch.eye(n, device=op.weight.device, dtype=op.weight.dtype).reshape((1, n) + op.out_shape)
                rows = op.backward(eye, [])[0][0][0]
                cache[op.name] = (rows.reshape((n,) + in_shape), op.constant().reshape(n).to(rows))
        return cache[op.name]

    def backward(
        self,
        start: str,
        spec: torch.Tensor,
        bounds: dict[str, ops.Bounds],
        alphas: dict[str, torch.Tensor] | None = None,
        relax: dict[str, Relaxation] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Propagate ``spec`` (``(B|1, S, *shape)`` coefficients on node ``start``) back to the input.

        Returns ``(A_input, bias)`` with ``sum(spec * node) >= sum(A_input * x) + bias``
        for every ``x`` in the set the ``bounds`` were computed for. ``relax`` (ReLU name ->
        precomputed relaxation, see :meth:`ops.ReLU.relax`) replaces the bounds of ReLUs without alpha.
        """
        pending: dict[str, torch.Tensor] = {start: spec}
        bias: torch.Tensor = torch.zeros(spec.shape[:2], device=spec.device)
        for op in reversed(self.ops[: self.index[start] + 1]):
            A = pending.pop(op.name, None)
            if A is None:
                continue
            alpha = alphas.get(op.name) if alphas else None
            if alpha is None and relax is not None and op.name in relax:
                new, b = op.backward_relaxed(A, *relax[op.name])
                outs = [new]
            else:
                outs, b = op.backward(A, [bounds.get(i) for i in op.inputs], alpha)
            if b is not None:
                bias = bias + b
            for inp, a in zip(op.inputs, outs):
                if a is None:
                    continue
                pending[inp] = pending[inp] + a if inp in pending else a
        return pending.get(self.input_name), bias

    def _backward_lower(
        self, inputs: InputSet, start: str, spec: torch.Tensor, bounds: dict[str, ops.Bounds],
        alphas: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        A, bias = self.backward(start, spec, bounds, alphas)
        return concretize(A, bias, inputs)

    def _optimise_alpha(
        self, inputs: InputSet, spec: torch.Tensor, bounds: dict[str, ops.Bounds], init: torch.Tensor, steps: int,
        lr: float,
    ) -> torch.Tensor:
        """alpha-CROWN on the output specification: projected Adam on the lower ReLU slopes."""
        if steps <= 0:
            return init
        S2 = spec.shape[1]
        B = inputs.x.shape[0]
        alphas: dict[str, torch.Tensor] = {}
        for op in self.relax_ops:
            if self.index[op.name] > self.index[self.output_name]:
                continue
            lo, hi = bounds[op.inputs[0]]
            if isinstance(op, ops.MaxPool2d):
                a0 = op.default_alpha((lo, hi), S2)
            else:
                a0 = ops.ReLU.default_alpha(lo, hi).unsqueeze(1).expand((B, S2) + op.out_shape).clone()
            alphas[op.name] = a0.requires_grad_(True)
        if not alphas:
            return init
        best = init.clone()
        opt = torch.optim.Adam(list(alphas.values()), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                self.check_deadline()
                res = self._backward_lower(inputs, self.output_name, spec, bounds, alphas)
                best = torch.maximum(best, res.detach())
                loss = -res.sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for a in alphas.values():
                        a.clamp_(0.0, 1.0)
            with torch.no_grad():
                res = self._backward_lower(inputs, self.output_name, spec, bounds, alphas)
                best = torch.maximum(best, res)
        return best


def relaxation(lo: torch.Tensor, hi: torch.Tensor, op: ops.BoundOp | None = None) -> Relaxation:
    """``(lower slope, upper - lower slope, upper intercept)`` of :meth:`ops.ReLU.relax` for input bounds
    ``lo``/``hi``; the intercept is None when it is zero everywhere (no unstable neuron). For a max-pooling
    ``op``: its :meth:`ops.MaxPool2d.relax` (lower weights, upper weights, upper constant)."""
    if isinstance(op, ops.MaxPool2d):
        return op.relax(lo, hi)
    ls, us, ui = ops.ReLU.relax(lo, hi)
    return ls, us - ls, (ui if bool((ui != 0).any()) else None)
