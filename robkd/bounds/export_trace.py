"""The ``torch.export`` front end: bound operators from the ATen graph of an exported program.

:func:`export_network` exports a model (in eval mode, at a fixed example batch) into an
``ExportedProgram``; TorchScript modules inside it are converted first (``torch._export.converter``), a
loaded ``.pt2`` program is re-exported as part of the [0,1]-input wrapper. :func:`trace_program` maps
the ATen op families onto the operators of :mod:`robkd.bounds.ops` (one handler per family in
:data:`HANDLERS`); lifted parameters, buffers and constants become constants, and every node computed
from constants only is folded. What stays unsupported is named by its ATen op family
(``aten.gelu``), deduplicated.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, Iterator

import torch
import torch.fx
from torch import nn

from robkd.bounds import ops
from robkd.bounds.trace import TracedGraph, Unsupported, adaptive_op, avgpool_op, conv_op, unsupported_message
from robkd.errors import UnsupportedModelError
from robkd.utils.modules import model_device

_EXPORT_HINT = "export the model with torch.export in eval mode (or save it as a state_dict with its architecture)"


def export_network(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Any, int]:
    """``(ExportedProgram, example batch)`` of ``model`` for per-sample inputs of ``input_shape``."""
    batch = 2
    for m in model.modules():
        fb = getattr(m, "fixed_batch", None)  # a loaded .pt2 exported without a dynamic batch dimension
        if type(m).__name__ == "ExportedModule" and isinstance(fb, int) and fb > 0:
            batch = fb
    example = torch.rand((batch,) + tuple(input_shape), device=model_device(model), dtype=dtype)
    with _scripts_converted(model, example):
        try:
            with torch.no_grad():
                program = torch.export.export(model, (example,), strict=False)
        except Exception as exc:  # noqa: BLE001 - any export failure means "not exportable"
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise UnsupportedModelError(
                f"bound propagation needs a traceable model: torch.fx and torch.export both failed "
                f"({type(exc).__name__}: {first[:200]}); remove data-dependent control flow, or {_EXPORT_HINT}",
                unsupported=[f"untraceable: {type(exc).__name__}"],
            ) from exc
    return program, batch


@contextlib.contextmanager
def _scripts_converted(model: nn.Module, example: torch.Tensor) -> Iterator[None]:
    """Within the block, every TorchScript submodule of ``model`` is replaced by its ``torch.export``
    conversion (restored afterwards). Raises :class:`UnsupportedModelError` when a conversion fails."""
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedModelError(
            "a bare TorchScript module cannot be bounded; load it with robkd.load_model (or wrap it in an nn.Module)",
            unsupported=["TorchScript module"])
    parents = [(p, name, c) for p in model.modules() for name, c in p.named_children()
               if isinstance(c, torch.jit.ScriptModule) and not isinstance(p, torch.jit.ScriptModule)]
    if not parents:
        yield
        return
    seen: dict[str, torch.Tensor] = {}
    for parent, name, child in parents:
        setattr(parent, name, _Recorder(child, seen, f"{id(parent)}.{name}"))
    try:
        with torch.no_grad():
            model(example)
        for parent, name, child in parents:
            setattr(parent, name, _convert_script(child, seen[f"{id(parent)}.{name}"]))
        yield
    finally:
        for parent, name, child in parents:
            setattr(parent, name, child)


class _Recorder(nn.Module):
    """Runs a TorchScript module and records its (first) input."""

    def __init__(self, inner: nn.Module, seen: dict[str, torch.Tensor], key: str) -> None:
        super().__init__()
        self.inner, self.seen, self.key = inner, seen, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.setdefault(self.key, x.detach())
        return self.inner(x)


def _convert_script(script: nn.Module, example: torch.Tensor) -> nn.Module:
    """A TorchScript module as the module of an equivalent exported program."""
    try:
        from torch._export.converter import TS2EPConverter

        return TS2EPConverter(script, (example,)).convert().module()
    except Exception as exc:  # noqa: BLE001 - the converter covers part of TorchScript only
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise UnsupportedModelError(
            f"this TorchScript model cannot be converted for bound propagation ({type(exc).__name__}: {first[:200]}); "
            f"{_EXPORT_HINT} and certify the .pt2 file",
            unsupported=["TorchScript (conversion failed)"],
        ) from exc


def trace_network_export(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype) -> TracedGraph:
    """Export ``model`` and map its ATen graph onto bound operators."""
    program, batch = export_network(model, input_shape, dtype)
    return trace_program(program, tuple(input_shape), batch, dtype)


class _Ctx:
    """The state of one conversion: per-sample shapes of traced tensors, constants, aliases."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.consts: dict[str, Any] = {}
        self.alias: dict[str, str] = {}
        self.found: list[ops.BoundOp] = []

    def name(self, v: Any) -> str | None:
        """The traced tensor a node argument stands for (None for constants and Python values)."""
        if isinstance(v, torch.fx.Node):
            n = self.alias.get(v.name, v.name)
            return n if n in self.shapes else None
        return None

    def const(self, v: Any) -> Any:
        if isinstance(v, torch.fx.Node):
            if v.name not in self.consts:
                raise Unsupported("an operand that is neither traced nor constant")
            return self.consts[v.name]
        return v


def trace_program(program: Any, input_shape: tuple[int, ...], batch: int, dtype: torch.dtype) -> TracedGraph:
    """Bound operators for the ATen graph of ``program`` (exported at batch size ``batch``)."""
    from torch.export.graph_signature import InputKind

    ctx = _Ctx(batch)
    sig = program.graph_signature
    user_input: str | None = None
    unsupported: list[str] = []
    lifted = {}
    for spec in sig.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            if user_input is not None:
                unsupported.append("a second model input")
            user_input = spec.arg.name
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            val = program.state_dict.get(spec.target)
            if val is None:
                val = program.constants.get(spec.target)
            lifted[spec.arg.name] = val
        else:
            unsupported.append(f"{spec.kind.name.lower()} input")
    output_name: str | None = None
    for node in program.graph.nodes:
        if node.op == "placeholder":
            if node.name == user_input:
                ctx.shapes[node.name] = tuple(input_shape)
            elif node.name in lifted:
                ctx.consts[node.name] = lifted[node.name]
            continue
        if node.op == "output":
            outs = node.args[0]
            out = outs[0] if isinstance(outs, (tuple, list)) and len(outs) == 1 else outs
            output_name = ctx.name(out)
            if output_name is None:
                unsupported.append("output: a single logits tensor is required")
            continue
        label = _label(node)
        if node.op != "call_function":
            unsupported.append(label)
            continue
        tin = [a for a in _flat(node) if ctx.name(a) is not None]
        if not tin and node.target is not operator.getitem:
            try:
                ctx.consts[node.name] = _fold(node, ctx)
            except Exception:  # noqa: BLE001 - a constant computation we cannot redo is unsupported
                unsupported.append(label)
            continue
        try:
            _convert(node, ctx, label)
        except Unsupported as exc:
            unsupported.append(f"{label}{' (' + str(exc) + ')' if str(exc) else ''}")
    if user_input is None:
        unsupported.append("no tensor input")
    if output_name is None and "output: a single logits tensor is required" not in unsupported:
        unsupported.append("no tensor output")
    return TracedGraph(ctx.found, user_input or "x", output_name, unsupported, [], dtype=dtype, front_end="export",
                       message=lambda bad: unsupported_message(bad, _EXPORT_HINT))


def _label(node: torch.fx.Node) -> str:
    """An ATen op family (``aten.conv2d``) or the function's name."""
    t = node.target
    packet = getattr(t, "overloadpacket", None)
    if packet is not None:
        return str(packet)
    return getattr(t, "__name__", str(t))


def _flat(node: torch.fx.Node) -> list[Any]:
    out: list[Any] = []
    torch.fx.node.map_aggregate((node.args, node.kwargs), lambda a: out.append(a) or a)
    return out


def _fold(node: torch.fx.Node, ctx: _Ctx) -> Any:
    """The value of a node computed from constants only."""
    args = torch.fx.node.map_arg(node.args, lambda n: ctx.consts[n.name])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: ctx.consts[n.name])
    with torch.no_grad():
        return node.target(*args, **kwargs)


def _bind(node: torch.fx.Node) -> dict[str, Any]:
    """The node's arguments by their schema names, defaults filled in."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _out_shape(node: torch.fx.Node, ctx: _Ctx) -> tuple[int, ...]:
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        val = val[0]
    if not isinstance(val, torch.Tensor):
        raise Unsupported("no tensor output")
    shape = tuple(int(s) for s in val.shape)
    if not shape or shape[0] != ctx.batch:
        raise Unsupported("mixes the batch dimension")
    return shape[1:]


def _convert(node: torch.fx.Node, ctx: _Ctx, label: str) -> None:
    """Add the operator (or alias) for one node with traced inputs (raises Unsupported)."""
    if node.target is operator.getitem:
        src, idx = node.args
        name = ctx.name(src)
        if name is None or idx != 0:
            raise Unsupported("only the values of max pooling / batch norm are supported")
        ctx.alias[node.name] = name
        return
    handler = HANDLERS.get(label)
    if handler is None:
        raise Unsupported("")
    a = _bind(node)
    shape = _out_shape(node, ctx)
    op = handler(node, a, ctx, shape)
    if isinstance(op, str):  # identity: an alias of a traced tensor
        ctx.alias[node.name] = op
        return
    ctx.shapes[node.name] = shape
    ctx.found.append(op)


def _first(a: dict[str, Any], ctx: _Ctx, key: str = "self") -> tuple[str, tuple[int, ...]]:
    name = ctx.name(a[key])
    if name is None:
        raise Unsupported("the traced tensor must be the first operand")
    return name, ctx.shapes[name]


def _identity(node, a, ctx, shape):
    key = "input" if "input" in a else "self"
    if node.target is torch.ops.aten.dropout.default and a.get("train"):
        raise Unsupported("dropout in training mode: export in eval mode")
    name, in_shape = _first(a, ctx, key)
    if in_shape != shape:
        raise Unsupported("changes the shape")
    return name


def _to_copy(node, a, ctx, shape):
    name, _ = _first(a, ctx)
    return name  # a dtype/device copy: bounds are computed in the model's dtype


def _reshape(node, a, ctx, shape):
    name, in_shape = _first(a, ctx)
    return ops.Reshape(node.name, name, in_shape, shape)


def _conv2d(node, a, ctx, shape):
    name, in_shape = _first(a, ctx, "input")
    if a.get("transposed"):
        raise Unsupported("transposed convolution")
    if len(in_shape) != 3:
        raise Unsupported("only 2-D convolutions")
    w, b = ctx.const(a["weight"]), ctx.const(a.get("bias"))
    return conv_op(node.name, name, in_shape, shape, w, b, a.get("stride", 1), a.get("padding", 0), a.get("dilation", 1),
                   int(a.get("groups", 1)))


def _linear(node, a, ctx, shape):
    name, _ = _first(a, ctx, "input")
    return ops.Linear(node.name, name, shape, ctx.const(a["weight"]), ctx.const(a.get("bias")))


def _matmul(node, a, ctx, shape):
    """``x @ W`` (mm / matmul with a constant right operand) and ``b + x @ W`` (addmm, beta = alpha = 1)."""
    key = "mat1" if "mat1" in a else "self"
    other = a["mat2"] if "mat2" in a else a["other"]
    name, _ = _first(a, ctx, key)
    w = ctx.const(other)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise Unsupported("product of two traced tensors" if ctx.name(other) else "non-matrix operand")
    bias = None
    if "mat1" in a:
        if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
            raise Unsupported("addmm with beta/alpha")
        bias = ctx.const(a["self"])
        if not isinstance(bias, torch.Tensor):
            raise Unsupported("non-tensor bias")
        bias = torch.broadcast_to(bias, (w.shape[1],))
    return ops.Linear(node.name, name, shape, w.t(), bias)


def _relu(node, a, ctx, shape):
    name, _ = _first(a, ctx)
    return ops.ReLU(node.name, [name], shape)


def _batch_norm(node, a, ctx, shape):
    name, _ = _first(a, ctx, "input")
    if a.get("training"):
        raise Unsupported("batch norm in training mode: export in eval mode")
    mean, var = ctx.const(a["running_mean"]), ctx.const(a["running_var"])
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        raise Unsupported("batch norm without running statistics")
    w, b = ctx.const(a.get("weight")), ctx.const(a.get("bias"))
    scale = (w if w is not None else torch.ones_like(var)) / torch.sqrt(var + float(a["eps"]))
    shift = (b if b is not None else torch.zeros_like(mean)) - mean * scale
    view = (-1,) + (1,) * (len(shape) - 1)
    return ops.ElementwiseAffine(node.name, name, shape, scale.view(view), shift.view(view))


def _arith(node, a, ctx, shape):
    """add/sub/rsub/mul/div/neg: of two traced tensors of one shape (add, sub), or by a constant."""
    kind = str(node.target.overloadpacket).split(".")[-1].rstrip("_")
    if kind == "neg":
        name, _ = _first(a, ctx)
        return ops.ElementwiseAffine(node.name, name, shape, torch.tensor(-1.0), torch.tensor(0.0))
    x, y = a["self"], a["other"]
    alpha = a.get("alpha", 1)
    if kind == "div" and a.get("rounding_mode") is not None:
        raise Unsupported("rounding division")
    nx, ny = ctx.name(x), ctx.name(y)
    if kind == "rsub":  # other - alpha * self
        x, y, nx, ny, kind, alpha = y, x, ny, nx, "sub", 1 if alpha == 1 else None
        if alpha is None:
            raise Unsupported("rsub with alpha")
        if nx is None:  # constant - alpha * traced
            c = _as_tensor(x, ctx)
            return _affine(node, ny, ctx, shape, -torch.ones_like(c), c)
    if nx is not None and ny is not None:
        if kind in ("add", "sub") and alpha == 1 and ctx.shapes[nx] == shape and ctx.shapes[ny] == shape:
            return ops.Add(node.name, nx, ny, shape, 1.0 if kind == "add" else -1.0)
        raise Unsupported(f"{kind} of two traced tensors")
    t, c_raw = (nx, y) if nx is not None else (ny, x)
    c = _as_tensor(c_raw, ctx)
    if kind == "add":
        return _affine(node, t, ctx, shape, torch.ones_like(c), c * alpha)
    if kind == "sub":
        if nx is not None:
            return _affine(node, t, ctx, shape, torch.ones_like(c), -c * alpha)
        return _affine(node, t, ctx, shape, -alpha * torch.ones_like(c), c)
    if kind == "mul":
        return _affine(node, t, ctx, shape, c, torch.zeros_like(c))
    if kind == "div" and nx is not None:
        return _affine(node, t, ctx, shape, 1.0 / c, torch.zeros_like(c))
    raise Unsupported("division by a traced tensor")


def _as_tensor(v: Any, ctx: _Ctx) -> torch.Tensor:
    c = ctx.const(v)
    if isinstance(c, bool) or not isinstance(c, (int, float, torch.Tensor)):
        raise Unsupported("a non-numeric operand")
    return ops.as_float(c) if isinstance(c, torch.Tensor) else torch.tensor(float(c))


def _affine(node, name: str, ctx: _Ctx, shape, scale: torch.Tensor, shift: torch.Tensor) -> ops.ElementwiseAffine:
    in_shape = ctx.shapes[name]
    full = (1,) + tuple(in_shape)
    for c in (scale, shift):
        if c.dim() > len(full) or (c.dim() == len(full) and c.shape[0] != 1):
            raise Unsupported("a constant with a batch dimension")
        try:
            ok = torch.broadcast_shapes(tuple(c.shape), full) == full
        except RuntimeError:
            ok = False
        if not ok or tuple(in_shape) != tuple(shape):
            raise Unsupported("a constant that broadcasts the tensor to a larger shape")
    return ops.ElementwiseAffine(node.name, name, shape, scale, shift)


def _avg_pool(node, a, ctx, shape):
    name, in_shape = _first(a, ctx)
    k = a["kernel_size"]
    stride = a.get("stride") or k
    return avgpool_op(node.name, name, in_shape, shape, k, stride, a.get("padding", 0), a.get("ceil_mode", False),
                      a.get("count_include_pad", True), a.get("divisor_override"))


def _adaptive(node, a, ctx, shape):
    name, in_shape = _first(a, ctx)
    if len(in_shape) != 3:
        raise Unsupported("only 2-D pooling")
    return adaptive_op(node.name, name, in_shape, shape)


def _mean(node, a, ctx, shape):
    """Global average pooling written as ``x.mean((2, 3))`` / ``x.mean((-2, -1), keepdim=True)``."""
    name, in_shape = _first(a, ctx)
    dims = sorted(int(d) % (len(in_shape) + 1) for d in (a.get("dim") or []))
    if len(in_shape) != 3 or dims != [2, 3]:
        raise Unsupported("mean over dimensions other than the spatial ones")
    pooled = (in_shape[0], 1, 1)
    pool = adaptive_op(node.name + "_pool", name, in_shape, pooled)
    if shape == pooled:
        pool.name = node.name
        return pool
    ctx.found.append(pool)
    ctx.shapes[pool.name] = pooled
    return ops.Reshape(node.name, pool.name, pooled, shape)


def _max_pool(node, a, ctx, shape):
    name, in_shape = _first(a, ctx)
    if len(in_shape) != 3:
        raise Unsupported("only 2-D max pooling")
    kw = dict(kernel_size=tuple(a["kernel_size"]), stride=tuple(a.get("stride") or a["kernel_size"]),
              padding=tuple(a.get("padding") or (0,)), dilation=tuple(a.get("dilation") or (1,)),
              ceil_mode=bool(a.get("ceil_mode", False)))
    kw = {k: (v[0] if isinstance(v, tuple) and len(v) == 1 else v) for k, v in kw.items()}
    return ops.MaxPool2d(node.name, name, shape, kw, in_shape)


def _cat(node, a, ctx, shape):
    names = [ctx.name(t) for t in a["tensors"]]
    if any(n is None for n in names):
        raise Unsupported("concatenation with a constant")
    rank = len(shape) + 1
    dim = int(a.get("dim", 0)) % rank
    if dim == 0:
        raise Unsupported("concatenation along the batch dimension")
    sizes = [ctx.shapes[n][dim - 1] for n in names]
    return ops.Concat(node.name, names, sizes, dim, shape)


_Handler = Callable[[torch.fx.Node, dict, _Ctx, tuple], "ops.BoundOp | str"]

HANDLERS: dict[str, _Handler] = {
    **{f"aten.{n}": _identity for n in ("detach", "detach_", "clone", "contiguous", "alias", "dropout", "dropout_",
                                        "feature_dropout", "lift_fresh_copy", "lift_fresh")},
    "aten._to_copy": _to_copy, "aten.to": _to_copy, "aten.type_as": _to_copy,
    **{f"aten.{n}": _reshape for n in ("view", "_unsafe_view", "reshape", "flatten", "squeeze", "unsqueeze",
                                       "unflatten")},
    "aten.conv2d": _conv2d, "aten.convolution": _conv2d, "aten._convolution": _conv2d,
    "aten.linear": _linear, "aten.addmm": _matmul, "aten.mm": _matmul, "aten.matmul": _matmul,
    "aten.relu": _relu, "aten.relu_": _relu,
    "aten.batch_norm": _batch_norm, "aten._native_batch_norm_legit_no_training": _batch_norm,
    **{f"aten.{n}": _arith for n in ("add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg")},
    "aten.avg_pool2d": _avg_pool, "aten.adaptive_avg_pool2d": _adaptive, "aten._adaptive_avg_pool2d": _adaptive,
    "aten.mean": _mean,
    "aten.max_pool2d": _max_pool, "aten.max_pool2d_with_indices": _max_pool,
    "aten.cat": _cat, "aten.concat": _cat,
}
