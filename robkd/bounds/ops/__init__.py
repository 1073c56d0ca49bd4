"""Bound operators: one class per supported operation family of a traced network.

Every operator works on per-sample tensors with a leading batch dimension and
offers three methods:

* ``forward(*xs)``: the exact value (used by tests and the MILP encoder);
* ``interval(*bounds)``: interval bound propagation (IBP), each bound a
  ``(lo, hi)`` pair of tensors shaped ``(B, *shape)``;
* ``backward(A, bounds, alpha)``: one step of the backward linear relaxation
  (CROWN). ``A`` has shape ``(B or 1, S, *out_shape)`` and represents the linear
  function ``sum(A * out)``; the method returns the coefficients for each
  tensor input (``None`` for inputs that receive nothing) and a bias ``(B|1, S)``
  so that ``sum(A * out) >= sum(A_i * in_i) + bias`` over the given input bounds
  (with equality for linear operators).

Linear operators also expose ``linear_part(x)`` (the operator without its
constant term) and ``constant()`` for the exact MILP encoding. Operators keep
their constants in the model's dtype (float64 models get float64 bounds).

Files: :mod:`.base` (the interface), :mod:`.linear` (affine families), :mod:`.relu`, :mod:`.maxpool`.
"""

from robkd.bounds.ops.base import BoundOp, Bounds, as_float, tail_dims
from robkd.bounds.ops.linear import Add, Concat, Conv2d, ElementwiseAffine, Linear, Reshape
from robkd.bounds.ops.maxpool import MaxPool2d, PoolRelaxation
from robkd.bounds.ops.relu import ReLU

_tail_dims = tail_dims  # the name used before the split into a package

__all__ = [
    "Add", "BoundOp", "Bounds", "Concat", "Conv2d", "ElementwiseAffine", "Linear", "MaxPool2d", "PoolRelaxation",
    "ReLU", "Reshape", "as_float", "tail_dims",
]
