"""Trace a model with ``torch.fx`` into bound operators; IBP, CROWN and alpha-CROWN over the graph.

The whole :class:`~robkd.models.RobustModel` is traced, so the ``Normalize``
wrapper is part of the graph (an elementwise affine operator). Every node that
is not supported is collected in one pass and reported together in one
:class:`~robkd.errors.UnsupportedModelError`.

Intermediate bounds (the pre-activation bounds of every ReLU) are computed
layer by layer in topological order. Under ``crown`` and ``alpha-crown`` the
default is *full CROWN* for intermediate layers: each pre-activation neuron that
IBP leaves unstable gets a backward CROWN bound (and the result is intersected
with IBP, so it is never looser). ``intermediate="ibp"`` is the cheaper
CROWN-IBP variant (IBP for intermediates, CROWN at the output). alpha-CROWN
optimises the lower ReLU slopes of the *output* bound only (intermediate bounds
come from CROWN), by projected Adam on alpha in [0, 1].
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any, Sequence

import torch
import torch.fx
from torch import nn
import torch.nn.functional as F

from robkd.bounds import ops
from robkd.errors import UnsupportedModelError, UsageError
from robkd.types import Norm

log = logging.getLogger(__name__)

METHODS = ("ibp", "crown", "alpha-crown")
SUPPORTED_TEXT = (
    "Linear, Conv2d, ReLU (module, F.relu, torch.relu, .relu()), BatchNorm (eval), Flatten/view/reshape, "
    "AvgPool2d, AdaptiveAvgPool2d, residual add/sub, Identity/Dropout (eval), the Normalize wrapper, "
    "+-*/ by constants; MaxPool2d under IBP only"
)
# elements of one backward coefficient tensor (limits the memory of intermediate CROWN)
_A_BUDGET = 1 << 24
# elements of one coefficient chunk in the fast intermediate pass (small enough for the CPU caches)
_CHUNK_BUDGET = 1 << 20


class _Tracer(torch.fx.Tracer):
    """Treats every torch.nn module, the Normalize wrapper and TorchScript modules as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from robkd.models.wrapper import Normalize

        if isinstance(m, (Normalize, torch.jit.ScriptModule)):
            return True
        return super().is_leaf_module(m, qualname)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class BoundedModel:
    """A traced network as a list of bound operators in topological order.

    ``input_shape`` is the per-sample shape ``(C, H, W)`` (or any shape the
    model accepts). Build once, then call :meth:`bounds` for any batch.
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int]) -> None:
        self.model = model
        self.input_shape = tuple(int(s) for s in input_shape)
        self.ops: list[ops.BoundOp] = []
        self.unsupported: list[str] = []  # unsupported under every method
        self.no_backward: list[str] = []  # supported by IBP only
        self._trace()
        self.index = {op.name: i for i, op in enumerate(self.ops)}
        self.relu_ops = [op for op in self.ops if isinstance(op, ops.ReLU)]
        self.relu_inputs = {op.inputs[0] for op in self.relu_ops}
        self.total_relus = sum(math.prod(op.out_shape) for op in self.relu_ops)
        # piecewise-linear operators other than ReLU (max pooling): linear on a set only where decided
        self.piecewise_ops = [op for op in self.ops if not op.is_linear and not isinstance(op, ops.ReLU)]

    # ------------------------------------------------------------------ tracing
    def _trace(self) -> None:
        try:
            graph = _Tracer().trace(self.model)
            gm = torch.fx.GraphModule(self.model, graph)
        except Exception as exc:  # noqa: BLE001 - any trace failure means "not traceable"
            raise UnsupportedModelError(
                f"the model cannot be traced by torch.fx ({type(exc).__name__}: {exc}); bound propagation needs a "
                "traceable model without data-dependent control flow",
                unsupported=[f"untraceable: {type(exc).__name__}"],
            ) from exc
        from torch.fx.passes.shape_prop import ShapeProp

        example = torch.rand((2,) + self.input_shape, device=_device(self.model))
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(example)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"the model does not accept inputs of shape {list(self.input_shape)}: {exc}") from exc
        modules = dict(gm.named_modules())
        self._gm = gm
        tensors: dict[str, tuple[int, ...]] = {}  # node name -> per-sample shape
        consts: dict[str, torch.Tensor] = {}
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                if self.ops or tensors:
                    self.unsupported.append(f"extra input {node.name}")
                    continue
                self.input_name = node.name
                tensors[node.name] = self.input_shape
                continue
            if node.op == "get_attr":
                consts[node.name] = _fetch_attr(gm, node.target)
                continue
            if node.op == "output":
                out = node.args[0]
                if not isinstance(out, torch.fx.Node) or out.name not in tensors:
                    self.unsupported.append("output: a single logits tensor is required")
                else:
                    self.output_name = out.name
                continue
            meta = node.meta.get("tensor_meta")
            if not hasattr(meta, "shape"):
                # non-tensor values (x.size(0), x.shape) only feed reshapes: shapes are known
                continue
            shape = tuple(int(s) for s in meta.shape)
            desc = _describe(node, modules)
            if len(shape) == 0 or shape[0] != example.shape[0]:
                self.unsupported.append(f"{desc} (mixes the batch dimension)")
                tensors[node.name] = shape[1:]
                continue
            tensors[node.name] = shape[1:]
            try:
                op = self._make_op(node, modules, tensors, consts, shape[1:])
            except _Unsupported as exc:
                self.unsupported.append(f"{desc}{': ' + str(exc) if str(exc) else ''}")
                continue
            if not op.supports_backward:
                self.no_backward.append(f"{desc} (IBP only)")
            self.ops.append(op)
        if not hasattr(self, "output_name"):
            self.unsupported.append("no tensor output")

    def _make_op(self, node, modules, tensors, consts, shape) -> ops.BoundOp:
        """One bound operator for a traced node (raises _Unsupported)."""
        from robkd.models.wrapper import Normalize

        name = node.name
        tin = [a for a in _flat_args(node) if isinstance(a, torch.fx.Node) and a.name in tensors]
        first = tin[0].name if tin else None
        if first is None:
            raise _Unsupported("no traced tensor input")
        in_shape = tensors[first]
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, nn.Linear):
                return ops.Linear(name, first, shape, m.weight, m.bias)
            if isinstance(m, nn.Conv2d):
                if m.padding_mode != "zeros":
                    raise _Unsupported(f"padding_mode={m.padding_mode}")
                return self._conv(name, first, in_shape, shape, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
            if isinstance(m, nn.ReLU):
                return ops.ReLU(name, [first], shape)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if m.running_mean is None or m.running_var is None:
                    raise _Unsupported("BatchNorm without running statistics")
                scale = (m.weight if m.affine else torch.ones_like(m.running_var)) / torch.sqrt(m.running_var + m.eps)
                shift = (m.bias if m.affine else torch.zeros_like(m.running_mean)) - m.running_mean * scale
                view = (-1,) + (1,) * (len(shape) - 1)
                return ops.ElementwiseAffine(name, first, shape, scale.view(view), shift.view(view))
            if isinstance(m, Normalize):
                with torch.no_grad():
                    zero = m(torch.zeros((1,) + in_shape, device=m.mean.device))
                    scale = m(torch.ones((1,) + in_shape, device=m.mean.device)) - zero
                return ops.ElementwiseAffine(name, first, shape, scale, zero)
            if isinstance(m, (nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Unflatten)):
                return ops.Reshape(name, first, in_shape, shape)
            if isinstance(m, nn.AvgPool2d):
                return self._avgpool(name, first, in_shape, shape, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                     m.count_include_pad, m.divisor_override)
            if isinstance(m, nn.AdaptiveAvgPool2d):
                return self._adaptive(name, first, in_shape, shape)
            if isinstance(m, nn.MaxPool2d):
                return ops.MaxPool2d(name, first, shape, dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                                                              dilation=m.dilation, ceil_mode=m.ceil_mode))
            raise _Unsupported("")
        target = node.target
        if node.op == "call_function" and target in (F.relu, torch.relu, torch.nn.functional.relu):
            return ops.ReLU(name, [first], shape)
        if node.op == "call_method" and target in ("relu", "relu_"):
            return ops.ReLU(name, [first], shape)
        if (node.op == "call_function" and target in (torch.flatten, torch.reshape)) or (
            node.op == "call_method" and target in ("view", "reshape", "flatten", "contiguous")
        ):
            return ops.Reshape(name, first, in_shape, shape)
        if node.op == "call_function" and target is F.adaptive_avg_pool2d:
            return self._adaptive(name, first, in_shape, shape)
        if node.op == "call_function" and target is F.avg_pool2d:
            a = _bind(node, ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"])
            return self._avgpool(name, first, in_shape, shape, a["kernel_size"], a.get("stride") or a["kernel_size"],
                                 a.get("padding", 0), a.get("ceil_mode", False), a.get("count_include_pad", True),
                                 a.get("divisor_override"))
        if node.op == "call_function" and target is F.dropout or (node.op == "call_method" and target == "clone"):
            return ops.Reshape(name, first, in_shape, shape)
        arith = {operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub", operator.mul: "mul",
                 torch.mul: "mul", operator.truediv: "div", torch.div: "div", operator.neg: "neg", torch.neg: "neg"}
        if node.op == "call_method" and target in ("add", "sub", "mul", "div", "neg"):
            kind = target
        elif node.op == "call_function" and target in arith:
            kind = arith[target]
        else:
            raise _Unsupported("")
        if kind == "neg":
            return ops.ElementwiseAffine(name, first, shape, torch.tensor(-1.0), torch.tensor(0.0))
        if node.kwargs.get("alpha", 1) != 1:
            raise _Unsupported("add/sub with alpha")
        a, b = node.args[0], node.args[1]
        a_t = isinstance(a, torch.fx.Node) and a.name in tensors
        b_t = isinstance(b, torch.fx.Node) and b.name in tensors
        if a_t and b_t:
            if kind in ("add", "sub") and tensors[a.name] == shape and tensors[b.name] == shape:
                return ops.Add(name, a.name, b.name, shape, 1.0 if kind == "add" else -1.0)
            raise _Unsupported(f"{kind} of two traced tensors")
        const = _const(b if a_t else a, consts)
        if const is None:
            raise _Unsupported(f"{kind} with a non-constant operand")
        if tensors.get(first) != shape:
            raise _Unsupported(f"{kind} with a constant that broadcasts the tensor to a larger shape")
        one, zero = torch.ones_like(const), torch.zeros_like(const)
        if kind == "add":
            return ops.ElementwiseAffine(name, first, shape, one, const)
        if kind == "sub":
            return ops.ElementwiseAffine(name, first, shape, one if a_t else -one, -const if a_t else const)
        if kind == "mul":
            return ops.ElementwiseAffine(name, first, shape, const, zero)
        if kind == "div" and a_t:
            return ops.ElementwiseAffine(name, first, shape, 1.0 / const, zero)
        raise _Unsupported("division by a traced tensor")

    def _conv(self, name, first, in_shape, shape, weight, bias, stride, padding, dilation, groups) -> ops.Conv2d:
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0, 0)
            else:
                k = weight.shape[-2:]
                tot = [_pair(dilation)[i] * (k[i] - 1) for i in range(2)]
                if any(t % 2 for t in tot):
                    raise _Unsupported("asymmetric 'same' padding")
                padding = (tot[0] // 2, tot[1] // 2)
        return ops.Conv2d(name, first, in_shape, shape, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups)

    def _avgpool(self, name, first, in_shape, shape, kernel, stride, padding, ceil_mode, include_pad, divisor) -> ops.Conv2d:
        kernel, stride, padding = _pair(kernel), _pair(stride if stride is not None else kernel), _pair(padding)
        if divisor is not None or (padding != (0, 0) and not include_pad):
            raise _Unsupported("divisor_override / count_include_pad=False")
        c = in_shape[0]
        w = torch.full((c, 1) + kernel, 1.0 / (kernel[0] * kernel[1]))
        expected = tuple((in_shape[1 + i] + 2 * padding[i] - kernel[i]) // stride[i] + 1 for i in range(2))
        if expected != tuple(shape[1:]):
            raise _Unsupported("ceil_mode pooling")
        return ops.Conv2d(name, first, in_shape, shape, w, None, stride, padding, (1, 1), c)

    def _adaptive(self, name, first, in_shape, shape) -> ops.Conv2d:
        (h, w), (oh, ow) = in_shape[1:], shape[1:]
        if h % oh or w % ow:
            raise _Unsupported(f"adaptive pooling {h}x{w} -> {oh}x{ow} with uneven windows")
        k = (h // oh, w // ow)
        return self._avgpool(name, first, in_shape, shape, k, k, 0, False, True, None)

    # ------------------------------------------------------------------ checks
    def check(self, method: str) -> None:
        """Raise one :class:`UnsupportedModelError` listing every operator ``method`` cannot handle."""
        if method not in METHODS:
            raise UsageError(f"unknown bound method {method!r}: use one of {', '.join(METHODS)}")
        bad = list(self.unsupported)
        if method != "ibp":
            bad += self.no_backward
        if bad:
            raise UnsupportedModelError(
                f"bound propagation ({method}) does not support {len(bad)} operator(s) of this model: "
                f"{'; '.join(bad)}. Supported: {SUPPORTED_TEXT}",
                unsupported=bad,
            )

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
        reference: bool = False,
        upper: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, ops.Bounds]]:
        """Lower/upper bounds of ``C @ logits`` over the ball, and every node's bounds.

        ``C`` is ``(S, K)`` or ``(B, S, K)`` (identity when None). Returns
        ``(lb, ub, node_bounds)`` with ``lb``/``ub`` of shape ``(B, S)``.
        ``node_bounds`` may be given to reuse precomputed intermediate bounds.
        ``reference=True`` uses the plain (slow) intermediate pass, kept to test the fast one against;
        ``upper=False`` skips the backward pass for the upper bound (``ub`` is then IBP's, still sound).
        """
        self.check(method)
        if intermediate not in ("crown", "ibp"):
            raise UsageError(f"intermediate bounds must be 'crown' or 'ibp', got {intermediate!r}")
        norm = Norm.parse(norm)
        x = x.detach().float()
        B = x.shape[0]
        eps_t = _eps_tensor(eps, x)
        box = _input_box(x, eps_t)
        ctx = _Ctx(x, eps_t, norm, box)
        relax = None
        if node_bounds is None:
            node_bounds, relax = self._intermediate(ctx, method != "ibp" and intermediate == "crown", reference=reference,
                                                    with_relax=True)
        out_lo, out_hi = node_bounds[self.output_name]
        K = out_lo.shape[1] if out_lo.dim() == 2 else math.prod(out_lo.shape[1:])
        if C is None:
            C = torch.eye(K, device=x.device)
        C = C.to(x.device, torch.float32)
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
        if reference:
            relax = None
        elif relax is None:
            relax = self._relax_all(node_bounds)
        A, bias = self.backward(self.output_name, spec, node_bounds, relax=relax)
        res = _concretize(A, bias, ctx)
        if method == "alpha-crown":
            res = self._optimise_alpha(ctx, spec, node_bounds, res, alpha_steps, alpha_lr)
        lb = torch.maximum(res[:, :S], ibp_lb)
        ub = torch.minimum(-res[:, S:], ibp_ub) if upper else ibp_ub
        return lb, ub, node_bounds

    def _relax_all(self, bounds: dict[str, ops.Bounds]) -> dict[str, tuple]:
        """The default CROWN relaxation of every ReLU (see :meth:`ops.ReLU.relax`)."""
        out = {}
        for op in self.relu_ops:
            if op.inputs[0] in bounds:
                out[op.name] = _relax_entry(*bounds[op.inputs[0]])
        return out

    def _intermediate(
        self, ctx: "_Ctx", use_crown: bool, *, reference: bool = False, with_relax: bool = False
    ) -> "dict[str, ops.Bounds] | tuple[dict[str, ops.Bounds], dict[str, tuple] | None]":
        """Bounds of every node in topological order (CROWN-tightened at ReLU inputs when asked).

        The fast pass (default) computes each ReLU's relaxation once, gathers it for the backward
        problems and uses windowed coefficients for convolution layers (:mod:`robkd.bounds.windows`);
        ``reference=True`` is the plain pass. With ``with_relax`` also returns the relaxations.
        """
        bounds: dict[str, ops.Bounds] = {self.input_name: ctx.box}
        relax: dict[str, tuple] | None = None if reference or not use_crown else {}
        boxlike = {self.input_name: ctx.norm is Norm.LINF}
        exact = {self.input_name: ctx.norm is Norm.LINF}
        for op in self.ops:
            ins = [bounds[i] for i in op.inputs]
            lo, hi = op.interval(*ins)
            in_box = all(boxlike.get(i, False) for i in op.inputs)
            boxlike[op.name] = in_box and isinstance(op, (ops.ElementwiseAffine, ops.Reshape))
            exact[op.name] = (in_box and len(op.inputs) == 1 and op.is_linear) or boxlike[op.name]
            if use_crown and op.name in self.relu_inputs and not exact[op.name]:
                if relax is None:
                    lo, hi = self._crown_node_reference(ctx, op, lo, hi, bounds)
                else:
                    lo, hi = self._crown_node(ctx, op, lo, hi, relax)
            bounds[op.name] = (lo, hi)
            if relax is not None and isinstance(op, ops.ReLU):
                relax[op.name] = _relax_entry(*ins[0])
        return (bounds, relax) if with_relax else bounds

    def _crown_node(self, ctx, op, lo, hi, relax: dict[str, tuple]) -> ops.Bounds:
        """Fast :meth:`_crown_node_reference`: precomputed relaxations gathered per backward problem,
        windowed coefficients for convolutions, chunks sized for the CPU cache."""
        from robkd.bounds import windows

        B = lo.shape[0]
        n = math.prod(op.out_shape)
        lo_f, hi_f = lo.reshape(B, n).clone(), hi.reshape(B, n).clone()
        pairs = ((lo_f < 0) & (hi_f > 0)).nonzero()
        if pairs.numel() == 0:
            return lo, hi
        plans = self.__dict__.setdefault("_plans", {})
        if op.name not in plans:
            plans[op.name] = windows.make_plan(self, op)
        plan = plans[op.name]
        if plan is not None:
            wp = windows.WindowPass(self, plan, relax, ctx.box, ctx.x, ctx.norm)
            per_pair = 2 * max([s.op.out_shape[0] * s.h * s.w for s in plan.steps] + [1])
            chunk = max(1, _CHUNK_BUDGET // per_pair)
            for s in range(0, pairs.shape[0], chunk):
                ps, pn = pairs[s : s + chunk, 0], pairs[s : s + chunk, 1]
                res = wp.lower(ps, pn, ctx.eps[ps])
                lo_f[ps, pn] = torch.maximum(lo_f[ps, pn], res[:, 0])
                hi_f[ps, pn] = torch.minimum(hi_f[ps, pn], -res[:, 1])
            return lo_f.reshape(lo.shape), hi_f.reshape(hi.shape)
        pos = self.index[op.name]
        unit = self._unit_response(op)
        start = op.inputs[0] if unit is not None else op.name
        widest = max([math.prod(o.out_shape) for o in self.ops[: pos + 1]] + [math.prod(self.input_shape)])
        chunk = max(1, _CHUNK_BUDGET // (2 * widest))
        relus = [o.name for o in self.relu_ops if self.index[o.name] < pos]
        for s in range(0, pairs.shape[0], chunk):
            ps, pn = pairs[s : s + chunk, 0], pairs[s : s + chunk, 1]
            P = ps.shape[0]
            sub_ctx = _Ctx(ctx.x[ps], ctx.eps[ps], ctx.norm, (ctx.box[0][ps], ctx.box[1][ps]))
            sub_relax = {
                name: tuple(None if t is None else t[ps] for t in relax[name]) for name in relus if name in relax
            }
            if unit is not None:
                U, const = unit
                a = U[pn]
                spec = torch.stack([a, -a], 1)
                bias0 = torch.stack([const[pn], -const[pn]], 1)
            else:
                eye = torch.zeros(P, n, device=lo.device)
                eye[torch.arange(P), pn] = 1.0
                spec = torch.stack([eye, -eye], 1).reshape((P, 2) + op.out_shape)
                bias0 = 0.0
            if start == self.input_name:
                A, bias = spec, torch.zeros(P, 2, device=lo.device)
            else:
                A, bias = self.backward(start, spec, {}, relax=sub_relax)
            res = _concretize(A, bias + bias0, sub_ctx)
            lo_f[ps, pn] = torch.maximum(lo_f[ps, pn], res[:, 0])
            hi_f[ps, pn] = torch.minimum(hi_f[ps, pn], -res[:, 1])
        return lo_f.reshape(lo.shape), hi_f.reshape(hi.shape)

    def _crown_node_reference(self, ctx, op, lo, hi, bounds) -> ops.Bounds:
        """Tighten the bounds of the neurons of ``op`` that are unstable under the current bounds.

        Each (sample, unstable neuron) pair is one backward problem; pairs are
        processed in chunks as a virtual batch (no padding to the largest count).
        """
        B = lo.shape[0]
        n = math.prod(op.out_shape)
        lo_f, hi_f = lo.reshape(B, n).clone(), hi.reshape(B, n).clone()
        pairs = ((lo_f < 0) & (hi_f > 0)).nonzero()
        if pairs.numel() == 0:
            return lo, hi
        pos = self.index[op.name]
        unit = self._unit_response(op)
        start = op.inputs[0] if unit is not None else op.name
        widest = max([math.prod(o.out_shape) for o in self.ops[: pos + 1]] + [math.prod(self.input_shape)])
        chunk = max(1, _A_BUDGET // (2 * widest))
        relu_in = [name for name in self.relu_inputs if self.index[name] < pos]
        for s in range(0, pairs.shape[0], chunk):
            ps, pn = pairs[s : s + chunk, 0], pairs[s : s + chunk, 1]
            P = ps.shape[0]
            sub_ctx = _Ctx(ctx.x[ps], ctx.eps[ps], ctx.norm, (ctx.box[0][ps], ctx.box[1][ps]))
            sub_bounds = {name: (bounds[name][0][ps], bounds[name][1][ps]) for name in relu_in}
            if unit is not None:
                U, const = unit
                a = U[pn]
                spec = torch.stack([a, -a], 1)
                bias0 = torch.stack([const[pn], -const[pn]], 1)
            else:
                eye = torch.zeros(P, n, device=lo.device)
                eye[torch.arange(P), pn] = 1.0
                spec = torch.stack([eye, -eye], 1).reshape((P, 2) + op.out_shape)
                bias0 = 0.0
            if start == self.input_name:
                A, bias = spec, torch.zeros(P, 2, device=lo.device)
            else:
                A, bias = self.backward(start, spec, sub_bounds)
            res = _concretize(A, bias + bias0, sub_ctx)
            lo_f[ps, pn] = torch.maximum(lo_f[ps, pn], res[:, 0])
            hi_f[ps, pn] = torch.minimum(hi_f[ps, pn], -res[:, 1])
        return lo_f.reshape(lo.shape), hi_f.reshape(hi.shape)

    def _unit_response(self, op: ops.BoundOp) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a Linear/Conv node: the rows of its matrix (n, *in_shape) and its constant (n,), cached;
        None when the operator is of another kind or the matrix would be too large."""
        if not isinstance(op, (ops.Linear, ops.Conv2d)):
            return None
        cache = self.__dict__.setdefault("_units", {})
        if op.name not in cache:
            n = math.prod(op.out_shape)
            in_shape = tuple(op.in_shape) if isinstance(op, ops.Conv2d) else op.out_shape[:-1] + (op.weight.shape[1],)
            if n * math.prod(in_shape) > 2 * _A_BUDGET:
                cache[op.name] = None
            else:
                eye = torch.eye(n, device=op.weight.device).reshape((1, n) + op.out_shape)
                rows = op.backward(eye, [])[0][0][0]
                cache[op.name] = (rows.reshape((n,) + in_shape), op.constant().reshape(n).to(rows))
        return cache[op.name]

    def backward(
        self,
        start: str,
        spec: torch.Tensor,
        bounds: dict[str, ops.Bounds],
        alphas: dict[str, torch.Tensor] | None = None,
        relax: dict[str, tuple] | None = None,
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
                new, b = ops.ReLU.backward_relaxed(A, *relax[op.name])
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

    def _backward_lower(self, ctx, start, spec, bounds, alphas=None) -> torch.Tensor:
        A, bias = self.backward(start, spec, bounds, alphas)
        return _concretize(A, bias, ctx)

    def _optimise_alpha(self, ctx, spec, bounds, init: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
        """alpha-CROWN on the output specification: projected Adam on the lower ReLU slopes."""
        if steps <= 0:
            return init
        S2 = spec.shape[1]
        B = ctx.x.shape[0]
        alphas: dict[str, torch.Tensor] = {}
        for op in self.relu_ops:
            if self.index[op.name] > self.index[self.output_name]:
                continue
            lo, hi = bounds[op.inputs[0]]
            a0 = ops.ReLU.default_alpha(lo, hi).unsqueeze(1).expand((B, S2) + op.out_shape).clone()
            alphas[op.name] = a0.requires_grad_(True)
        if not alphas:
            return init
        best = init.clone()
        opt = torch.optim.Adam(list(alphas.values()), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                res = self._backward_lower(ctx, self.output_name, spec, bounds, alphas)
                best = torch.maximum(best, res.detach())
                loss = -res.sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for a in alphas.values():
                        a.clamp_(0.0, 1.0)
            with torch.no_grad():
                res = self._backward_lower(ctx, self.output_name, spec, bounds, alphas)
                best = torch.maximum(best, res)
        return best


class _Unsupported(Exception):
    pass


def _relax_entry(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(lower slope, upper - lower slope, upper intercept)`` of :meth:`ops.ReLU.relax`; the intercept
    is None when it is zero everywhere (no unstable neuron)."""
    ls, us, ui = ops.ReLU.relax(lo, hi)
    return ls, us - ls, (ui if bool((ui != 0).any()) else None)


class _Ctx:
    """The input set: centre, per-sample radius, norm and its [0,1]-clipped box."""

    def __init__(self, x: torch.Tensor, eps: torch.Tensor, norm: Norm, box: ops.Bounds) -> None:
        self.x, self.eps, self.norm, self.box = x, eps, norm, box


def _eps_tensor(eps: "float | torch.Tensor", x: torch.Tensor) -> torch.Tensor:
    """Per-sample radii ``(B,)`` from a float or a tensor; validated."""
    if isinstance(eps, torch.Tensor):
        e = eps.detach().to(x.device, torch.float32).flatten()
        if e.numel() == 1:
            e = e.expand(x.shape[0])
        if e.numel() != x.shape[0]:
            raise UsageError(f"eps has {e.numel()} values for {x.shape[0]} samples")
    else:
        if not isinstance(eps, (int, float)) or not math.isfinite(float(eps)):
            raise UsageError(f"eps must be a finite number >= 0, got {eps!r}")
        e = torch.full((x.shape[0],), float(eps), device=x.device)
    if not torch.isfinite(e).all() or (e < 0).any():
        raise UsageError("eps must be finite and >= 0")
    return e


def _input_box(x: torch.Tensor, eps: torch.Tensor) -> ops.Bounds:
    """The [0,1]-clipped box ``[x - eps, x + eps]`` (encloses both the Linf and the L2 ball)."""
    e = eps.view((-1,) + (1,) * (x.dim() - 1))
    return (x - e).clamp(0.0, 1.0), (x + e).clamp(0.0, 1.0)


def _concretize(A: torch.Tensor | None, bias: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    """min over the input set of ``sum(A * x) + bias``: (B, S).

    Linf: exact over the [0,1]-clipped box. L2: the dual-norm bound over the
    ball, intersected with the box bound (both are sound; the larger is kept).
    """
    B = ctx.x.shape[0]
    if A is None:
        return bias.expand(B, bias.shape[1]).clone()
    A = A.reshape(A.shape[0], A.shape[1], -1)
    lo, hi = ctx.box
    lo, hi = lo.reshape(B, -1, 1), hi.reshape(B, -1, 1)
    box_lb = (A.clamp(min=0) @ lo + A.clamp(max=0) @ hi).squeeze(-1) + bias
    if ctx.norm is Norm.LINF:
        return box_lb
    x0 = ctx.x.reshape(B, -1, 1)
    ball = (A @ x0).squeeze(-1) - ctx.eps.view(B, 1) * A.norm(dim=-1) + bias
    return torch.maximum(box_lb, ball)


def _device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _flat_args(node: torch.fx.Node) -> list[Any]:
    out: list[Any] = []
    torch.fx.node.map_aggregate((node.args, node.kwargs), lambda a: out.append(a) or a)
    return out


def _bind(node: torch.fx.Node, names: list[str]) -> dict[str, Any]:
    d = dict(zip(names, node.args))
    d.update(node.kwargs)
    return d


def _const(v: Any, consts: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if isinstance(v, torch.fx.Node):
        c = consts.get(v.name)
        return c.detach().float() if isinstance(c, torch.Tensor) else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return torch.tensor(float(v))
    if isinstance(v, torch.Tensor):
        return v.detach().float()
    return None


def _describe(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} at {node.target}"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', str(node.target))} (function) at {node.name}"
    return f".{node.target}() (method) at {node.name}"
