"""Certification under a budget: per sample, the tightest bound method that fits a time and memory cap.

``robkd certify --budget 30s,2GB`` runs the ladder IBP -> CROWN-IBP -> CROWN -> alpha-CROWN -> MILP
(MILP only on small ReLU networks under Linf) and escalates only the samples that are not decided yet
(certified, or falsified by a counterexample / an exact answer). Before each costlier stage the memory
it needs is estimated from the network's sizes (elements x float32 bytes; the number of unstable
neurons and input dimensions for MILP) and the stage is skipped, with a recorded reason, when the
estimate exceeds the cap; full CROWN's chunks are sized from the cap (``BoundedModel.chunk_elements``).
Time is enforced by a deadline that the bound passes check between chunks and optimisation steps
(:class:`~robkd.bounds.graph.DeadlineExceeded`), and by HiGHS's own time limit for MILP: a stage that
runs out of time is abandoned and the sample keeps its best earlier bound ("fallback", recorded).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import torch
from torch import nn

from robkd.bounds import ops
from robkd.bounds.certification import CertifyResult, certify
from robkd.bounds.checks import batch_input_shape, check_batch_size, in_eval_mode
from robkd.bounds.compute import margin_matrix
from robkd.bounds.graph import DeadlineExceeded, BoundedModel
from robkd.bounds.inputset import InputSet
from robkd.bounds.regions import affine_margin, count_unstable, pieces_decided
from robkd.errors import UsageError
from robkd.types import Norm

LADDER = ("ibp", "crown-ibp", "crown", "alpha-crown", "milp")
#: "small net" for MILP: at most this many ReLUs in the whole network
MILP_MAX_RELUS = 2000
_F32, _F64 = 4, 8
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
_TIMES = {"ms": 1e-3, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


@dataclasses.dataclass(frozen=True)
class Budget:
    """Per-sample time (seconds) and memory cap (bytes); None: no limit of that kind."""

    seconds: float | None = None
    memory_bytes: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """``"30s,2GB"``, ``"2m"``, ``"500MB"``, ``"1.5GiB,45s"``: comma-separated, each a time (ms, s, m, h) or a
        memory size (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), in any order, at most one of each."""
        if not isinstance(text, str) or not text.strip():
            raise UsageError("--budget needs a time and/or a memory cap, e.g. 30s,2GB")
        seconds = memory = None
        for part in text.split(","):
            m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]+)\s*", part)
            if not m:
                raise UsageError(f"--budget: cannot read {part.strip()!r}: use a number with a unit, e.g. 30s or 2GB")
            value, unit = float(m.group(1)), m.group(2).lower()
            if not math.isfinite(value) or value <= 0:
                raise UsageError(f"--budget: {part.strip()!r} must be > 0")
            if unit in _TIMES:
                if seconds is not None:
                    raise UsageError("--budget: give the time once")
                seconds = value * _TIMES[unit]
            elif unit in _UNITS:
                if memory is not None:
                    raise UsageError("--budget: give the memory cap once")
                memory = int(value * _UNITS[unit])
            else:
                raise UsageError(f"--budget: unknown unit {m.group(2)!r} (times: ms, s, m, h; sizes: B, KB, MB, GB, "
                                 "KiB, MiB, GiB)")
        return cls(seconds, memory)

    def to_dict(self) -> dict:
        return {"seconds_per_sample": self.seconds, "memory_bytes": self.memory_bytes}


def _sizes(bm: BoundedModel) -> int:
    return sum(math.prod(op.out_shape) for op in bm.ops) + math.prod(bm.input_shape)


def estimate_bytes(bm: BoundedModel, stage: str, *, specs: int, unstable: int = 0, chunk_elements: int = 0) -> int:
    """Peak memory (bytes) of one sample's ``stage``, from the network's sizes.

    ``crown-ibp``: node bounds plus the output backward pass (``specs`` coefficient rows over the widest map).
    ``crown``: node bounds and ReLU relaxations plus one chunk of ``chunk_elements`` coefficients.
    ``alpha-crown``: adds per-specification slopes with Adam's state (5 tensors per ReLU) and the
    autograd tape of the backward pass (about 3 coefficient tensors per node).
    ``milp``: the float64 affine expressions of every node over ``input dims + unstable`` variables and the
    big-M rows (3 per unstable ReLU, ``input dims + 2 unstable`` columns).
    """
    nodes = _sizes(bm)
    widest = max(math.prod(op.out_shape) for op in bm.ops) if bm.ops else 1
    base = _F32 * (2 * nodes + 3 * bm.total_relus)
    if stage in ("ibp",):
        return _F32 * 2 * nodes
    if stage == "crown-ibp":
        return base + _F32 * 4 * 2 * specs * widest
    if stage == "crown":
        return base + _F32 * max(chunk_elements, 2 * specs * 4 * widest)
    if stage == "alpha-crown":
        return base + _F32 * specs * (5 * bm.total_relus + 3 * nodes)
    if stage == "milp":
        n0 = math.prod(bm.input_shape)
        return _F64 * (nodes * (n0 + unstable) + 3 * unstable * (n0 + 2 * unstable))
    raise UsageError(f"unknown stage {stage!r}")


def milp_applicable(bm: BoundedModel, norm: Norm) -> str:
    """Why MILP is not run on this network (empty when it may be): Linf only, small ReLU nets only."""
    if norm is not Norm.LINF:
        return "milp: Linf ball only"
    if bm.total_relus > MILP_MAX_RELUS:
        return f"milp: network too large ({bm.total_relus} ReLUs > {MILP_MAX_RELUS})"
    for op in bm.ops:
        if not (isinstance(op, (ops.ReLU, ops.Add)) or (op.is_linear and hasattr(op, "linear_part"))):
            return f"milp: no encoding for {type(op).__name__}"
    return ""


@in_eval_mode
def certify_budget(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    budget: Budget,
    *,
    norm: "Norm | str" = Norm.LINF,
    alpha_steps: int = 20,
    batch_size: int = 128,
    milp: bool = True,
) -> CertifyResult:
    """Certify at radius ``eps`` with, per sample, the tightest method that fits ``budget``.

    Returns a :class:`CertifyResult` with ``method="budget"``; ``decided_by`` names the stage whose bound
    is reported for each sample (``ibp``, ``crown-ibp``, ``counterexample``, ``crown``, ``alpha-crown``,
    ``milp``), ``fallbacks`` the stages skipped or abandoned (memory estimate over the cap, time budget,
    unsupported) and ``sample_seconds`` the time spent per sample (its share of the batched cheap stages
    plus its own stages).
    """
    norm = Norm.parse(norm)
    if not isinstance(budget, Budget):
        raise UsageError("budget must be a Budget (see Budget.parse)")
    check_batch_size(batch_size)
    shape = batch_input_shape(x)
    t0 = time.perf_counter()
    bm = BoundedModel(model, shape)
    bm.check("ibp")
    n = x.shape[0]
    notes: list[list[str]] = [[] for _ in range(n)]
    crown_ok = not bm.no_backward and not bm.unsupported
    K = None
    cap = budget.memory_bytes
    # stage 1 (batched): IBP, CROWN-IBP with a counterexample check; batch size fitted to the memory cap
    method = "crown" if crown_ok else "ibp"
    if not crown_ok:
        for nt in notes:
            nt.append("crown: unsupported operators (IBP only)")
    with torch.no_grad():
        K = int(model(x[:1].float()).shape[1])
    per_sample = estimate_bytes(bm, "crown-ibp" if crown_ok else "ibp", specs=max(1, K - 1))
    bs = batch_size
    if cap is not None:
        if per_sample > cap and crown_ok:
            method = "ibp"
            for nt in notes:
                nt.append(f"crown-ibp: needs about {_mb(per_sample)} > cap {_mb(cap)}")
            per_sample = estimate_bytes(bm, "ibp", specs=1)
        bs = max(1, min(batch_size, cap // max(1, per_sample)))
    res = certify(model, x, y, eps, norm=norm, method=method, intermediate="ibp", batch_size=bs, region_stats=False,
                  bounded=bm)
    share = (time.perf_counter() - t0) / max(1, n)
    seconds = [share] * n
    status, decided = list(res.status), list(res.decided_by)
    margin_lb, unstable = res.margin_lb.clone(), res.unstable.clone()
    linear, exact = res.linear_region.clone(), res.exact.clone()
    why_milp = milp_applicable(bm, norm) if milp else "milp: disabled"
    C_all = margin_matrix(y.to(x.device).long(), K)
    for i in range(n):
        if status[i] != "unknown" or not crown_ok:
            continue
        start = time.perf_counter()
        deadline = None if budget.seconds is None else start + budget.seconds - share
        xi = x[i : i + 1].float()
        C = C_all[i : i + 1]
        inputs = InputSet.around(xi, float(eps), norm)
        stage = "crown"
        bm.deadline = deadline
        try:
            # full CROWN (chunks sized from the cap)
            chunk = bm.chunk_elements
            if cap is not None:
                base = estimate_bytes(bm, "crown", specs=K - 1, chunk_elements=0)
                chunk = min(chunk, max(0, (cap - base) // _F32))
            need = estimate_bytes(bm, "crown", specs=K - 1, chunk_elements=max(chunk, 1))
            if cap is not None and (chunk < 1024 or need > cap):
                raise _Skip(f"crown: needs about {_mb(need)} > cap {_mb(cap)}")
            bm.chunk_elements = chunk
            nb = bm.intermediate_bounds(inputs, True)
            lb = bm.bounds(xi, float(eps), norm=norm, method="crown", C=C, node_bounds=nb, upper=False)[0]
            _update(margin_lb, i, lb[0], decided, "crown")
            unstable[i] = count_unstable(bm, nb, 1)[0].to(unstable.dtype)
            if bool(unstable[i] == 0) and bool(pieces_decided(bm, nb, 1)[0]):
                margin_lb[i] = torch.maximum(margin_lb[i], affine_margin(bm, xi, float(eps), norm, C, nb)[0].cpu())
                linear[i] = True
                exact[i] = norm is Norm.LINF or bool(((xi - eps >= 0) & (xi + eps <= 1)).all())
                status[i] = _verdict(res.clean_correct[i], margin_lb[i], exact[i])
                raise _Done
            if bool((margin_lb[i] > 0).all()):
                status[i] = "certified"
                raise _Done
            stage = "alpha-crown"
            need = estimate_bytes(bm, "alpha-crown", specs=K - 1)
            if cap is not None and need > cap:
                notes[i].append(f"alpha-crown: needs about {_mb(need)} > cap {_mb(cap)}")
            else:
                lb = bm.bounds(xi, float(eps), norm=norm, method="alpha-crown", C=C, node_bounds=nb, upper=False,
                               alpha_steps=alpha_steps)[0]
                _update(margin_lb, i, lb[0], decided, "alpha-crown")
                if bool((margin_lb[i] > 0).all()):
                    status[i] = "certified"
                    raise _Done
            stage = "milp"  # small nets only, within the remaining time
            if why_milp:
                raise _Skip(why_milp)
            need = estimate_bytes(bm, "milp", specs=K - 1, unstable=int(unstable[i]))
            if cap is not None and need > cap:
                raise _Skip(f"milp: needs about {_mb(need)} > cap {_mb(cap)}")
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None and left <= 0.05:
                raise DeadlineExceeded("no time left for milp")
            from robkd.bounds.milp import verify_milp

            bm.deadline = None
            out = verify_milp(model, xi, y[i : i + 1], float(eps), time_limit=left if left is not None else 1e9)[0]
            if out.status in ("verified", "falsified"):
                status[i] = "certified" if out.status == "verified" else "falsified"
                decided[i] = "milp"
                margin_lb[i] = torch.maximum(margin_lb[i], torch.tensor(out.margin_lower_bounds(), dtype=margin_lb.dtype))
                exact[i] = out.min_margin is not None
            else:
                notes[i].append(f"milp: {out.reason or 'undecided'}")
        except _Done:
            pass
        except _Skip as e:
            notes[i].append(str(e))
        except DeadlineExceeded:
            notes[i].append(f"{stage}: time budget ({budget.seconds:g}s per sample) exhausted")
        finally:
            bm.deadline = None
        seconds[i] += time.perf_counter() - start
    certified = torch.tensor([s == "certified" for s in status], dtype=torch.bool)
    return dataclasses.replace(
        res, method="budget", certified=certified, margin_lb=margin_lb, unstable=unstable, linear_region=linear,
        exact=exact, status=status, decided_by=decided, seconds=time.perf_counter() - t0,
        fallbacks=["; ".join(nt) for nt in notes], sample_seconds=seconds,
    )


class _Done(Exception):
    """The sample is decided."""


class _Skip(Exception):
    """The next stage does not fit (the message says why)."""


def _update(margin_lb: torch.Tensor, i: int, lb: torch.Tensor, decided: list[str], stage: str) -> None:
    margin_lb[i] = torch.maximum(margin_lb[i], lb.to(margin_lb.device, margin_lb.dtype))
    decided[i] = stage


def _verdict(clean: torch.Tensor, lb: torch.Tensor, exact: torch.Tensor) -> str:
    if bool(clean) and bool((lb > 0).all()):
        return "certified"
    return "falsified" if (not bool(clean) or bool(exact)) else "unknown"


def _mb(b: int) -> str:
    return f"{b / 2**20:.0f} MiB" if b < 2**30 else f"{b / 2**30:.1f} GiB"
