"""Every random-number generator of a training run, as a state that ``torch.load(weights_only=True)`` reads."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state(data_gen: torch.Generator, attack_gen: torch.Generator, device: torch.device | None = None) -> dict[str, Any]:
    """The global torch, NumPy and Python states, the data and attack generators, and CUDA's on a CUDA ``device``."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    extra = {"cuda": torch.cuda.get_rng_state(device)} if device is not None and device.type == "cuda" else {}
    return {**extra,
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss": py_state[2] if py_state[2] is not None else None},
        "data": data_gen.get_state(),
        "attack": attack_gen.get_state(),
    }


def set_rng_state(s: dict[str, Any], data_gen: torch.Generator, attack_gen: torch.Generator,
                  device: torch.device | None = None) -> None:
    """Restore what :func:`rng_state` saved (CUDA's only on a CUDA ``device`` and when it was saved)."""
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = s["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    data_gen.set_state(s["data"])
    attack_gen.set_state(s["attack"])
    if device is not None and device.type == "cuda" and "cuda" in s:  # dropout masks on CUDA (absent in a CPU-saved state)
        torch.cuda.set_rng_state(s["cuda"], device)
