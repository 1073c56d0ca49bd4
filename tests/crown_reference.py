"""The plain reference CROWN pass, kept to test (and benchmark) robkd's fast bound paths against.

:class:`ReferenceBoundedModel` is a :class:`~robkd.bounds.BoundedModel` whose intermediate pass
tightens every unstable pre-activation neuron by a plain dense backward CROWN problem (no
precomputed ReLU relaxations, no windowed coefficients, chunks sized by a memory budget only), and
whose output bound uses the plain ReLU backward step too. Everything else (IBP, alpha-CROWN, the
certification stages) is the production code.

* :func:`reference_bounds` -> ``BoundedModel.bounds`` through the reference pass;
* :func:`reference_certify` -> :func:`robkd.bounds.certify` through the reference pass.

Used by ``tests/test_bounds_fast.py`` and ``bench/bounds_speed.py`` (which puts this folder on
``sys.path``).
"""

from __future__ import annotations

import math
from typing import Any
from unittest import mock

import torch
from torch import nn

from robkd.bounds import BoundedModel, CertifyResult, certification, ops
from robkd.bounds.graph import Relaxation
from robkd.bounds.inputset import InputSet, concretize

# elements of one backward coefficient tensor (limits the memory of the reference intermediate CROWN)
A_BUDGET = 1 << 24


class ReferenceBoundedModel(BoundedModel):
    """A :class:`BoundedModel` whose CROWN passes are the plain reference ones."""

    built = 0  # instances created (lets reference_certify check that its pass really ran)

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        super().__init__(model, input_shape)
        type(self).built += 1

    def _intermediate(
        self, inputs: InputSet, crown: bool
    ) -> tuple[dict[str, ops.Bounds], dict[str, Relaxation] | None]:
        """Every node's bounds, the unstable ReLU inputs tightened by :meth:`_crown_node_reference`; no
        precomputed relaxations (an empty dict: the output bound then takes the plain ReLU step too)."""
        bounds: dict[str, ops.Bounds] = {self.input_name: inputs.box}
        targets = self.crown_targets(inputs.norm) if crown else frozenset()
        for op in self.ops:
            lo, hi = op.interval(*[bounds[i] for i in op.inputs])
            if op.name in targets:
                lo, hi = self._crown_node_reference(inputs, op, lo, hi, bounds)
            bounds[op.name] = (lo, hi)
        return bounds, {}

    def _crown_node_reference(
        self, inputs: InputSet, op: ops.BoundOp, lo: torch.Tensor, hi: torch.Tensor, bounds: dict[str, ops.Bounds]
    ) -> ops.Bounds:
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
        chunk = max(1, A_BUDGET // (2 * widest))
        relu_in = [name for name in self.relu_inputs if self.index[name] < pos]
        for s in range(0, pairs.shape[0], chunk):
            ps, pn = pairs[s : s + chunk, 0], pairs[s : s + chunk, 1]
            P = ps.shape[0]
            sub_inputs = inputs.select(ps)
            sub_bounds = {name: (bounds[name][0][ps], bounds[name][1][ps]) for name in relu_in}
            spec, bias0 = self.neuron_spec(op, unit, pn, lo.device)
            if start == self.input_name:
                A, bias = spec, torch.zeros(P, 2, device=lo.device)
            else:
                A, bias = self.backward(start, spec, sub_bounds)
            res = concretize(A, bias + bias0, sub_inputs)
            lo_f[ps, pn] = torch.maximum(lo_f[ps, pn], res[:, 0])
            hi_f[ps, pn] = torch.minimum(hi_f[ps, pn], -res[:, 1])
        return lo_f.reshape(lo.shape), hi_f.reshape(hi.shape)


def reference_bounds(
    bm: BoundedModel, x: torch.Tensor, eps: "float | torch.Tensor", **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor, dict[str, ops.Bounds]]:
    """``bm.bounds(x, eps, **kwargs)`` through the reference pass (same model and input shape)."""
    return ReferenceBoundedModel(bm.model, bm.input_shape).bounds(x, eps, **kwargs)


def reference_certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, **kwargs: Any) -> CertifyResult:
    """:func:`robkd.bounds.certify` with every bound computed through the reference pass."""
    before = ReferenceBoundedModel.built
    with mock.patch.object(certification, "BoundedModel", ReferenceBoundedModel):
        res = certification.certify(model, x, y, eps, **kwargs)
    if ReferenceBoundedModel.built == before:
        raise RuntimeError("certify did not build its BoundedModel in robkd.bounds.certification: "
                           "reference_certify no longer reaches the reference pass")
    return res
