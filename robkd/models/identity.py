"""A model's identity: one SHA-256 over its weights, the same however the model was loaded or passed.

The audit's fingerprint (``weights_sha256`` in ``results.json``), the resume state, the result cache and
the training provenance (``teacher_sha256``) all use :func:`model_sha256`, so they can be joined: a
teacher audited from a file and the same teacher passed as a module to ``repair`` hash alike.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def model_sha256(model: nn.Module) -> str:
    """SHA-256 over the model's state_dict: for each entry in name order, ``name|dtype|shape|`` then the
    raw bytes (so storage layout, device and the order of registration do not matter)."""
    if not isinstance(model, nn.Module):
        from robkd.errors import UsageError

        raise UsageError(f"model_sha256 needs a torch.nn.Module, got {type(model).__name__}")
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes directly
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
