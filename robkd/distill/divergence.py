"""The checks of every training step: a NaN/inf loss (before its backward pass) or NaN/inf student weights (after
the optimizer step) stop training with :class:`robkd.errors.TrainingDivergedError`, before anything saves them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from robkd.distill.checks import nonfinite_tensors, short_list
from robkd.distill.objectives import StepContext, nonfinite_teacher
from robkd.distill.state import Checkpointer, LoopState
from robkd.errors import TrainingDivergedError
from robkd.utils.logits import finite_rows


class DivergenceGuard:
    """Stops a diverged run with one line: where (epoch and step of ``loop``), what, which training state is kept
    (``checkpoint``) and what to try. Under torchrun every rank agrees first, so that all ranks stop together."""

    def __init__(self, *, method: str, student: torch.nn.Module, ctx: StepContext, optimizer: torch.optim.Optimizer, loop: LoopState,
                 checkpoint: Checkpointer, passes: int, batches: int, dctx: Any) -> None:
        self.method, self.student, self.ctx, self.optimizer, self.loop = method, student, ctx, optimizer, loop
        self.checkpoint, self.passes, self.batches, self.dctx = checkpoint, passes, batches, dctx

    def diverged(self, what: str) -> TrainingDivergedError:
        """The error that ends a diverged run: where, what, what is kept, what to try."""
        path: Path | None = self.checkpoint.path
        at_saved = self.checkpoint.saved_at
        if path is not None and at_saved is not None:
            e, s = at_saved
            at = f"after epoch {e}" if s == 0 else f"at epoch {e + 1}, step {s}"
            kept = f"the last good training state ({at}) is kept in {path}"
        else:
            kept = "no training state was saved yet"
        lr = self.optimizer.param_groups[0]["lr"]
        return TrainingDivergedError(
            f"training diverged at epoch {self.loop.epoch + 1}/{self.passes}, step {self.loop.step + 1}/{self.batches}: "
            f"{what}; no model was saved and {kept}; lower the learning rate (--lr, {lr:g} at this step) and train again")

    def agreed(self, ok: bool) -> bool:
        """``ok`` on every rank (one collective under torchrun, so that all ranks stop together)."""
        if not self.dctx.distributed:
            return ok
        from robkd.distributed import ddp as D

        return D.sum_across_ranks({"bad": 0.0 if ok else 1.0}, self.dctx)["bad"] == 0

    def check_loss(self, loss: torch.Tensor, x: torch.Tensor, cidx: torch.Tensor | None) -> None:
        """Before the backward pass: a NaN/inf loss stops training (blaming the teacher when its outputs are)."""
        if self.agreed(bool(torch.isfinite(loss.detach()).all())):
            return
        if self.ctx.teacher is not None:
            bad_t = int((~finite_rows(self.ctx.teacher_logits(x, cidx))).sum())
            if bad_t:
                raise nonfinite_teacher(bad_t, len(x), f"images of epoch {self.loop.epoch + 1}, step {self.loop.step + 1}")
        raise self.diverged(f"the {self.method} loss is {float(loss.detach().float().sum())}")

    def check_weights(self) -> None:
        """After the optimizer step: NaN/inf student weights stop training before anything saves them."""
        bad = nonfinite_tensors(self.student)
        if not self.agreed(not bad):
            raise self.diverged(f"the student's weights became non-finite (NaN/inf in {short_list(bad) or 'another process'})")
