"""Per-sample random streams: a sample's noise depends on (seed, sample id, draw number) only.

One generator consumed batch by batch gives a sample different random starts when
the batch size, the batch order, the set of samples still unbroken, or the shard of
a multi-process run changes. :class:`SampleNoise` instead seeds a generator for each
sample from ``(seed, id, k)`` (``k`` counts that sample's own draws), so the same
sample gets the same noise wherever and with whomever it is processed.

Noise is drawn on the requested device with that device's generator (CPU: Mersenne
Twister; CUDA: Philox), so streams agree across batchings and shards on one device
type, not between CPU and CUDA.
"""

from __future__ import annotations

from typing import Sequence

import torch

from robkd.errors import UsageError

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (splitmix64 chain); distinct keys give unrelated seeds."""
    h = 0x243F6A8885A308D3
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h & ((1 << 63) - 1)


class SampleNoise:
    """Random draws for a batch of samples identified by global ids (see the module docstring).

    ``ids``: one integer per row (e.g. the sample's position in the evaluation set).
    :meth:`subset` gives a view on some rows that shares the draw counters, so a
    sample's ``k``-th draw is the same whether it is drawn alone or in a batch.
    """

    def __init__(self, seed: int, ids: "torch.Tensor | Sequence[int]", *, device: "torch.device | str | None" = None) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UsageError(f"seed must be an integer, got {seed!r}")
        t = torch.as_tensor(ids)
        if t.dim() != 1 or (t.numel() and (t.dtype.is_floating_point or t.dtype == torch.bool)):
            raise UsageError("ids must be a 1-D integer tensor or sequence")
        self.seed = seed
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._ids: list[int] = [int(v) for v in t.tolist()]
        self._draws: list[int] = [0] * len(self._ids)
        self._rows: list[int] = list(range(len(self._ids)))
        self._root = self

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def ids(self) -> torch.Tensor:
        """The sample ids of this view's rows."""
        return torch.tensor([self._root._ids[r] for r in self._rows], dtype=torch.int64)

    def subset(self, index: "torch.Tensor | Sequence[int]") -> "SampleNoise":
        """A view on rows ``index`` (bool mask or integer positions) sharing the draw counters."""
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise UsageError(f"mask must have shape ({len(self)},)")
            idx = idx.nonzero().flatten()
        pos = idx.detach().cpu().flatten().tolist()
        view = SampleNoise.__new__(SampleNoise)
        view.seed, view.device, view._root = self.seed, self.device, self._root
        try:
            view._rows = [self._rows[int(i)] for i in pos]
        except IndexError as exc:
            raise UsageError(f"subset index out of range for {len(self)} rows") from exc
        return view

    def __getitem__(self, index: "torch.Tensor | Sequence[int]") -> "SampleNoise":
        return self.subset(index)

    def _draw(self, fn, shape: Sequence[int], dtype: torch.dtype, device: "torch.device | str | None") -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        if not shape or shape[0] != len(self):
            raise UsageError(f"noise shape must start with the number of rows {len(self)}, got {shape}")
        dev = torch.device(device) if device is not None else self.device
        gen = torch.Generator(device=dev)
        root = self._root
        rows = []
        for r in self._rows:
            gen.manual_seed(stream_seed(self.seed, root._ids[r], root._draws[r]))
            root._draws[r] += 1
            rows.append(fn(shape[1:], generator=gen, device=dev, dtype=dtype))
        if not rows:
            return torch.empty(shape, device=dev, dtype=dtype)
        return torch.stack(rows)

    def rand(self, shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
             device: "torch.device | str | None" = None) -> torch.Tensor:
        """Uniform [0,1) noise of ``shape`` (first dimension = rows); one draw per row."""
        return self._draw(torch.rand, shape, dtype, device)

    def randn(self, shape: Sequence[int], *, dtype: torch.dtype = torch.float32,
              device: "torch.device | str | None" = None) -> torch.Tensor:
        """Standard normal noise of ``shape`` (first dimension = rows); one draw per row."""
        return self._draw(torch.randn, shape, dtype, device)
