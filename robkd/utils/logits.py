"""Predictions from logits under robkd's non-finite policy.

A model output row that holds any NaN or infinity is never a prediction: :func:`predict` maps it to
:data:`NON_FINITE` (-1), a class no label can equal (labels are validated to lie in ``[0, K)``), so the
sample counts as misclassified everywhere (clean accuracy, robust accuracy, certification, training
validation). ``torch.argmax`` alone would read an all-NaN row as class 0 and give a broken model credit
on every sample labelled 0. Audits also count such samples and raise the ``non-finite outputs`` sanity
flag (which fails under ``--strict``).
"""

from __future__ import annotations

import torch

NON_FINITE = -1
"""The prediction given to an output row that holds NaN or +-inf."""


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """Boolean ``(B,)``: rows of ``logits`` (``(B, K)``) whose entries are all finite."""
    return torch.isfinite(logits).all(dim=1)


def predict(logits: torch.Tensor) -> torch.Tensor:
    """``argmax`` over classes, with :data:`NON_FINITE` for any row that is not entirely finite."""
    pred = logits.argmax(dim=1)
    return torch.where(finite_rows(logits), pred, torch.full_like(pred, NON_FINITE))


def correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Boolean ``(B,)``: finite row and ``argmax == y``."""
    return predict(logits) == y
