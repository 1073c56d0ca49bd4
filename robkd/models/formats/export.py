"""``torch.export`` programs (``.pt2`` archives): loaded without unpickling anything beyond tensors unless
``allow_pickle``, and run at any batch size even when exported with a fixed one."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from robkd.errors import ModelLoadError
from robkd.types import ModelMeta


def load_export(p: Path, flags: ModelMeta, allow_pickle: bool) -> tuple[nn.Module, ModelMeta]:
    """An exported program's module; the input shape comes from its example inputs when it has them."""
    guard = contextlib.nullcontext() if allow_pickle else _weights_only_torch_load()
    try:
        with guard:
            program = torch.export.load(str(p))
            net = program.module()
    except Exception as exc:
        text = str(exc).lower()
        if not allow_pickle and ("weights_only" in text or "unpickl" in text):
            raise ModelLoadError(f"{p} holds pickled Python objects beyond tensors (sample inputs, weights or "
                                 f"constants); unpickling runs code from the file: pass --allow-pickle only if you "
                                 f"trust it") from exc
        raise ModelLoadError(f"corrupt torch.export program {p}: {exc}") from exc
    meta = ModelMeta(arch="torch.export")
    fixed_batch = None
    try:
        arg = program.example_inputs[0][0] if program.example_inputs else None
        if isinstance(arg, torch.Tensor) and arg.dim() == 4:
            meta.input_shape = tuple(int(v) for v in arg.shape[1:])
            fixed_batch = _fixed_batch(net, arg)
    except (AttributeError, IndexError, TypeError):
        pass
    return ExportedModule(net, fixed_batch), meta


class ExportedModule(nn.Module):
    """Holds an exported program's module; eval()/train() must not reach into it.

    ``fixed_batch``: the only batch size the program accepts (``torch.export`` fixes the batch size
    unless it was exported with a dynamic batch dimension); other batches then run in chunks of that
    size, the last one padded by repeating its final row (padding rows are dropped from the output, and
    an exported graph computes each row independently, so the kept rows are unchanged)."""

    def __init__(self, gm: nn.Module, fixed_batch: int | None = None) -> None:
        super().__init__()
        self.gm = gm
        self.fixed_batch = fixed_batch

    def train(self, mode: bool = True) -> "ExportedModule":  # exported graphs have no mode
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fb = self.fixed_batch
        if fb is None or x.shape[0] == fb:
            return self.gm(x)
        outs = []
        for s in range(0, x.shape[0], fb):
            part = x[s : s + fb]
            n = part.shape[0]
            if n < fb:
                part = torch.cat([part, part[-1:].expand(fb - n, *part.shape[1:])])
            outs.append(self.gm(part)[:n])
        return torch.cat(outs)


@contextlib.contextmanager
def _weights_only_torch_load() -> Iterator[None]:
    """Force ``weights_only=True`` on every ``torch.load`` made inside (``torch.export.load`` unpickles a
    program's sample inputs, and pickled weights or constants, with ``weights_only=False``: a crafted
    ``.pt2`` would otherwise run code). Not thread-safe: it swaps ``torch.load`` for the duration."""
    real = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = real


def _fixed_batch(net: nn.Module, example: torch.Tensor) -> int | None:
    """The example's batch size when the program accepts no other (exported without a dynamic batch)."""
    b = int(example.shape[0])
    other = example[:1] if b > 1 else torch.cat([example, example])
    try:
        with torch.no_grad():
            net(other)
    except Exception:  # noqa: BLE001 - a shape guard of the exported graph
        return b
    return None
