"""Trace a model with ``torch.fx`` into a list of bound operators (:mod:`robkd.bounds.ops`).

The whole :class:`~robkd.models.RobustModel` is traced, so the ``Normalize``
wrapper is part of the graph (an elementwise affine operator). Every node that
is not supported is collected in one pass, so that :meth:`BoundedModel.check
<robkd.bounds.graph.BoundedModel.check>` reports them together in one
:class:`~robkd.errors.UnsupportedModelError`.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from typing import Any, Callable

import torch
import torch.fx
from torch import nn
import torch.nn.functional as F

from robkd.bounds import ops
from robkd.errors import UnsupportedModelError, UsageError
from robkd.utils.modules import model_device

SUPPORTED_TEXT = (
    "Linear, Conv2d, ReLU, BatchNorm (eval), MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten/view/reshape, "
    "concatenation, residual add/sub, Identity/Dropout (eval), the Normalize wrapper, +-*/ by constants"
)

# what to do about an unsupported operator, by a word its name contains (lower case)
_HINTS = {
    "gelu": "replace GELU by ReLU", "silu": "replace SiLU by ReLU", "swish": "replace Swish by ReLU",
    "sigmoid": "replace Sigmoid by ReLU", "tanh": "replace Tanh by ReLU", "elu": "replace ELU by ReLU",
    "hardtanh": "replace Hardtanh/ReLU6 by ReLU", "softmax": "certify the logits (drop the final softmax)",
    "layer_norm": "replace LayerNorm by BatchNorm", "group_norm": "replace GroupNorm by BatchNorm",
    "batch": "export/certify in eval mode (BatchNorm with running statistics)",
}


def unsupported_message(bad: list[str], advice: str = "") -> str:
    """One line naming the unsupported operators (deduplicated, locations dropped) and what would help."""
    kinds: list[str] = []
    for b in bad:
        k = re.sub(r" at [^ ;()]+", "", b).replace(" (function)", "").replace(" (method)", "")
        if k not in kinds:
            kinds.append(k)
    low = " ".join(kinds).lower()
    tips = [t for w, t in _HINTS.items() if w in low]
    tips.append(advice or f"supported: {SUPPORTED_TEXT}")
    return f"does not support {', '.join(kinds)}; {'; '.join(dict.fromkeys(tips))}"


@dataclasses.dataclass
class TracedGraph:
    """A traced network: bound operators in topological order and what could not be traced.

    ``unsupported`` lists nodes no method supports, ``no_backward`` the operators only IBP
    supports; ``output_name`` is None when the model has no single tensor output.
    """

    ops: list[ops.BoundOp]
    input_name: str
    output_name: str | None
    unsupported: list[str]
    no_backward: list[str]
    dtype: torch.dtype = torch.float32  # the model's dtype: bounds are computed in it
    front_end: str = "fx"  # "fx" (torch.fx on the nn.Module) or "export" (the torch.export ATen graph)
    message: Callable[[list[str]], str] = unsupported_message  # the one-line report of unsupported operators


class _Tracer(torch.fx.Tracer):
    """Treats every torch.nn module, the Normalize wrapper and TorchScript modules as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from robkd.models.wrapper import Normalize

        if isinstance(m, (Normalize, torch.jit.ScriptModule)):
            return True
        return super().is_leaf_module(m, qualname)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def trace_model(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> TracedGraph:
    """Trace ``model`` for per-sample inputs of ``input_shape`` into bound operators.

    Raises :class:`UnsupportedModelError` when ``torch.fx`` cannot trace the model and
    :class:`UsageError` when the model does not accept inputs of that shape; unsupported nodes are
    collected in the result instead.
    """
    try:
        graph = _Tracer().trace(model)
        gm = torch.fx.GraphModule(model, graph)
    except Exception as exc:  # noqa: BLE001 - any trace failure means "not traceable"
        raise UnsupportedModelError(
            f"the model cannot be traced by torch.fx ({type(exc).__name__}: {exc}); bound propagation needs a "
            "traceable model without data-dependent control flow",
            unsupported=[f"untraceable: {type(exc).__name__}"],
        ) from exc
    from torch.fx.passes.shape_prop import ShapeProp

    example = torch.rand((2,) + input_shape, device=model_device(model), dtype=dtype)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"the model does not accept inputs of shape {list(input_shape)}: {exc}") from exc
    modules = dict(gm.named_modules())
    tensors: dict[str, tuple[int, ...]] = {}  # node name -> per-sample shape
    consts: dict[str, torch.Tensor] = {}
    found: list[ops.BoundOp] = []
    unsupported: list[str] = []
    no_backward: list[str] = []
    input_name: str | None = None
    output_name: str | None = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if found or tensors:
                unsupported.append(f"extra input {node.name}")
                continue
            input_name = node.name
            tensors[node.name] = input_shape
            continue
        if node.op == "get_attr":
            consts[node.name] = _fetch_attr(gm, node.target)
            continue
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, torch.fx.Node) or out.name not in tensors:
                unsupported.append("output: a single logits tensor is required")
            else:
                output_name = out.name
            continue
        meta = node.meta.get("tensor_meta")
        if not hasattr(meta, "shape"):
            # non-tensor values (x.size(0), x.shape) only feed reshapes: shapes are known
            continue
        shape = tuple(int(s) for s in meta.shape)
        desc = _describe(node, modules)
        if len(shape) == 0 or shape[0] != example.shape[0]:
            unsupported.append(f"{desc} (mixes the batch dimension)")
            tensors[node.name] = shape[1:]
            continue
        tensors[node.name] = shape[1:]
        try:
            op = _make_op(node, modules, tensors, consts, shape[1:])
        except Unsupported as exc:
            unsupported.append(f"{desc}{': ' + str(exc) if str(exc) else ''}")
            continue
        if not op.supports_backward:
            no_backward.append(f"{desc} (IBP only)")
        found.append(op)
    if input_name is None:
        raise UsageError("the model takes no input tensor")
    if output_name is None:
        unsupported.append("no tensor output")
    return TracedGraph(found, input_name, output_name, unsupported, no_backward, dtype=dtype)


def _make_op(
    node: torch.fx.Node, modules: dict[str, nn.Module], tensors: dict[str, tuple[int, ...]],
    consts: dict[str, torch.Tensor], shape: tuple[int, ...],
) -> ops.BoundOp:
    """One bound operator for a traced node (raises Unsupported)."""
    from robkd.models.wrapper import Normalize

    name = node.name
    tin = [a for a in _flat_args(node) if isinstance(a, torch.fx.Node) and a.name in tensors]
    first = tin[0].name if tin else None
    if first is None:
        raise Unsupported("no traced tensor input")
    in_shape = tensors[first]
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.Linear):
            return ops.Linear(name, first, shape, m.weight, m.bias)
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                raise Unsupported(f"padding_mode={m.padding_mode}")
            return conv_op(name, first, in_shape, shape, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        if isinstance(m, nn.ReLU):
            return ops.ReLU(name, [first], shape)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m.running_mean is None or m.running_var is None:
                raise Unsupported("BatchNorm without running statistics")
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
            return avgpool_op(name, first, in_shape, shape, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                 m.count_include_pad, m.divisor_override)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return adaptive_op(name, first, in_shape, shape)
        if isinstance(m, nn.MaxPool2d):
            return ops.MaxPool2d(name, first, shape, dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                                                          dilation=m.dilation, ceil_mode=m.ceil_mode), in_shape)
        raise Unsupported("")
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
        return adaptive_op(name, first, in_shape, shape)
    if node.op == "call_function" and target is F.avg_pool2d:
        a = _bind(node, ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"])
        return avgpool_op(name, first, in_shape, shape, a["kernel_size"], a.get("stride") or a["kernel_size"],
                             a.get("padding", 0), a.get("ceil_mode", False), a.get("count_include_pad", True),
                             a.get("divisor_override"))
    if node.op == "call_function" and target is F.dropout or (node.op == "call_method" and target in ("clone", "detach")):
        return ops.Reshape(name, first, in_shape, shape)
    arith = {operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub", operator.mul: "mul",
             torch.mul: "mul", operator.truediv: "div", torch.div: "div", operator.neg: "neg", torch.neg: "neg"}
    if node.op == "call_method" and target in ("add", "sub", "mul", "div", "neg"):
        kind = target
    elif node.op == "call_function" and target in arith:
        kind = arith[target]
    else:
        raise Unsupported("")
    if kind == "neg":
        return ops.ElementwiseAffine(name, first, shape, torch.tensor(-1.0), torch.tensor(0.0))
    if node.kwargs.get("alpha", 1) != 1:
        raise Unsupported("add/sub with alpha")
    a, b = node.args[0], node.args[1]
    a_t = isinstance(a, torch.fx.Node) and a.name in tensors
    b_t = isinstance(b, torch.fx.Node) and b.name in tensors
    if a_t and b_t:
        if kind in ("add", "sub") and tensors[a.name] == shape and tensors[b.name] == shape:
            return ops.Add(name, a.name, b.name, shape, 1.0 if kind == "add" else -1.0)
        raise Unsupported(f"{kind} of two traced tensors")
    const = _const(b if a_t else a, consts)
    if const is None:
        raise Unsupported(f"{kind} with a non-constant operand")
    if tensors.get(first) != shape:
        raise Unsupported(f"{kind} with a constant that broadcasts the tensor to a larger shape")
    one, zero = torch.ones_like(const), torch.zeros_like(const)
    if kind == "add":
        return ops.ElementwiseAffine(name, first, shape, one, const)
    if kind == "sub":
        return ops.ElementwiseAffine(name, first, shape, one if a_t else -one, -const if a_t else const)
    if kind == "mul":
        return ops.ElementwiseAffine(name, first, shape, const, zero)
    if kind == "div" and a_t:
        return ops.ElementwiseAffine(name, first, shape, 1.0 / const, zero)
    raise Unsupported("division by a traced tensor")


def conv_op(
    name: str, first: str, in_shape: tuple[int, ...], shape: tuple[int, ...], weight: torch.Tensor,
    bias: torch.Tensor | None, stride: Any, padding: Any, dilation: Any, groups: int,
) -> ops.Conv2d:
    """A Conv2d operator; ``padding`` may be a number, a pair, ``"valid"`` or a symmetric ``"same"``."""
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:
            k = weight.shape[-2:]
            tot = [_pair(dilation)[i] * (k[i] - 1) for i in range(2)]
            if any(t % 2 for t in tot):
                raise Unsupported("asymmetric 'same' padding")
            padding = (tot[0] // 2, tot[1] // 2)
    return ops.Conv2d(name, first, in_shape, shape, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups)


def avgpool_op(
    name: str, first: str, in_shape: tuple[int, ...], shape: tuple[int, ...], kernel: Any, stride: Any, padding: Any,
    ceil_mode: bool, include_pad: bool, divisor: int | None,
) -> ops.Conv2d:
    """Average pooling as a depthwise convolution with constant weights."""
    kernel, stride, padding = _pair(kernel), _pair(stride if stride is not None else kernel), _pair(padding)
    if divisor is not None or (padding != (0, 0) and not include_pad):
        raise Unsupported("divisor_override / count_include_pad=False")
    c = in_shape[0]
    w = torch.full((c, 1) + kernel, 1.0 / (kernel[0] * kernel[1]))
    expected = tuple((in_shape[1 + i] + 2 * padding[i] - kernel[i]) // stride[i] + 1 for i in range(2))
    if expected != tuple(shape[1:]):
        raise Unsupported("ceil_mode pooling")
    return ops.Conv2d(name, first, in_shape, shape, w, None, stride, padding, (1, 1), c)


def adaptive_op(name: str, first: str, in_shape: tuple[int, ...], shape: tuple[int, ...]) -> ops.Conv2d:
    """Adaptive average pooling with even windows as average pooling."""
    (h, w), (oh, ow) = in_shape[1:], shape[1:]
    if h % oh or w % ow:
        raise Unsupported(f"adaptive pooling {h}x{w} -> {oh}x{ow} with uneven windows")
    k = (h // oh, w // ow)
    return avgpool_op(name, first, in_shape, shape, k, k, 0, False, True, None)


class Unsupported(Exception):
    """A node no bound operator covers (the message says why; empty when the kind is unknown)."""


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
        return ops.as_float(c) if isinstance(c, torch.Tensor) else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return torch.tensor(float(v))
    if isinstance(v, torch.Tensor):
        return ops.as_float(v)
    return None


def _describe(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} at {node.target}"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', str(node.target))} (function) at {node.name}"
    return f".{node.target}() (method) at {node.name}"
