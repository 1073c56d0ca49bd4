"""The audit's output directory and its resume state.

``DIR/results.json`` and ``DIR/samples.safetensors`` are the results; ``DIR/state/`` holds the work saved
so far (``DIR/state/rank<k>/`` per process under torchrun), checked against a fingerprint of the models,
data and settings on ``--resume``. :func:`check_out_dir` refuses an unusable ``--out`` before any model
runs; :func:`audit_output` locks the directory for the whole run, prepares it and opens the state, and
removes what a fresh run created when it fails before saving any progress.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch

from robkd.auditing.result import RESULTS_FILE, SAMPLES_FILE
from robkd.errors import RobkdError, UsageError

if TYPE_CHECKING:
    from robkd.attacks import SuiteResult

log = logging.getLogger(__name__)

STATE_DIR = "state"
#: ``DIR/state/layout.json``: the number of processes whose shards the saved state holds
LAYOUT_FILE = "layout.json"
FINGERPRINT_FILE = "fingerprint.json"


# ----------------------------------------------------------------------------- the output directory
def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> bool:
    """Refuse an unusable ``--out`` (side-effect free, before any model runs); True when it holds an audit."""
    from robkd.utils.outdir import check_out_dir as check_writable

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    check_writable(out)
    has_audit = (out / RESULTS_FILE).exists() or (out / STATE_DIR).exists()
    if has_audit and not resume and not overwrite:
        raise UsageError(f"{out} already holds an audit: pass --resume to continue it, --overwrite to replace it, or choose another --out")
    return has_audit


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool, world_size: int = 1) -> None:
    """Check ``out`` again (now under the lock), refuse a resume with another process count, clear a replaced
    audit (``overwrite``) and create the directory."""
    has_audit = check_out_dir(out, resume=resume, overwrite=overwrite)
    layout = out / STATE_DIR / LAYOUT_FILE
    if resume and layout.is_file():
        try:
            saved = int(json.loads(layout.read_text(encoding="utf-8"))["world_size"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"cannot read {layout}: {exc} (rerun with --overwrite)") from exc
        if saved != world_size:
            raise UsageError(
                f"the audit in {out} was run by {saved} process(es) and its resume state is kept per shard: "
                f"resume it with {saved} process(es) (--nproc-per-node {saved}), not {world_size}, or use --overwrite"
            )
    if has_audit and overwrite and not resume:
        for name in (RESULTS_FILE, SAMPLES_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {out}: {exc}") from exc


def discard_new_state(out: Path, *, existed: bool) -> None:
    """Remove what a failed fresh run created in ``out``: its state folder, and ``out`` itself if it was new."""
    from robkd.utils.outdir import LOCK_FILE

    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    if not existed:
        with contextlib.suppress(OSError):
            remaining = [p for p in out.iterdir() if p.name != LOCK_FILE]
            if not remaining:
                shutil.rmtree(out, ignore_errors=True)


@contextlib.contextmanager
def audit_output(out: Path, fingerprint: Mapping[str, Any], ctx: Any, *, resume: bool,
                 overwrite: bool) -> Iterator["StateStore"]:
    """The output directory of one run, ready for work: locked against a second writer (rank 0 holds the lock
    for the whole job), prepared, with this process' resume state opened (``ctx`` is the
    :class:`~robkd.distributed.DistContext`). A run refused or failed before it saved any progress leaves
    nothing behind; one with saved progress keeps its state for ``--resume`` (as does an interrupt, which
    is not caught here)."""
    from robkd.distributed import all_ranks, on_main
    from robkd.utils.io import atomic_write_json
    from robkd.utils.outdir import OutDirLock

    existed = out.exists()
    lock = OutDirLock(out) if ctx.is_main else contextlib.nullcontext()
    with lock:
        if ctx.distributed:
            store = StateStore(out / STATE_DIR / f"rank{ctx.rank}", {**fingerprint, "world_size": ctx.world_size, "rank": ctx.rank})
        else:
            store = StateStore(out / STATE_DIR, dict(fingerprint))
        try:
            on_main(lambda: prepare_out_dir(out, resume=resume, overwrite=overwrite, world_size=ctx.world_size), ctx)
            all_ranks(lambda: store.open(resume=resume), ctx)
            if ctx.is_main:
                atomic_write_json(out / STATE_DIR / LAYOUT_FILE, {"world_size": ctx.world_size})
            yield store
        except Exception:
            if ctx.is_main and not store.has_progress():
                discard_new_state(out, existed=existed)
            raise


# ----------------------------------------------------------------------------- resume state
class StateStore:
    """Per-(model, attack, radius) progress under ``DIR/state/``, written atomically."""

    def __init__(self, root: Path, fingerprint: dict[str, Any]) -> None:
        self.root = root
        self.fingerprint = fingerprint
        self.resuming = False

    def open(self, *, resume: bool) -> None:
        """Pick up the saved state (``resume``, same fingerprint) or start an empty one."""
        from robkd.utils.io import atomic_write_json, remove_stale_temps, remove_stale_temps_in

        fp_path = self.root / FINGERPRINT_FILE
        if resume and fp_path.exists():
            try:
                saved = json.loads(fp_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise UsageError(f"cannot read saved audit state {fp_path}: {exc} (rerun with --overwrite)") from exc
            diff = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
            if diff:
                raise UsageError(
                    f"cannot resume: the saved audit in {self.root.parent} differs in {', '.join(diff)} "
                    "(use the same models and settings, or --overwrite)"
                )
            self.resuming = True
            remove_stale_temps_in(self.root)  # left by a kill during a state write
            out_dir = self.root.parent if self.root.name == STATE_DIR else self.root.parent.parent  # state/rank<k>/
            for name in (RESULTS_FILE, SAMPLES_FILE):
                remove_stale_temps(out_dir / name)
            log.info("resuming the audit saved in %s", self.root.parent)
        else:
            if resume:
                log.info("nothing to resume in %s: starting a new audit", self.root.parent)
            shutil.rmtree(self.root, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(fp_path, self.fingerprint)

    def has_progress(self) -> bool:
        """Whether the state holds saved work (attack, certification or analysis progress), not only its
        fingerprint."""
        try:
            return any(p.suffix == ".safetensors" or (p.suffix == ".json" and p.name != FINGERPRINT_FILE)
                       for p in self.root.iterdir())
        except OSError:
            return False

    def _tensor_path(self, name: str) -> Path:
        return self.root / f"{name}.safetensors"

    def save_tensors(self, name: str, tensors: Mapping[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
        """Save ``tensors`` as ``<name>.safetensors`` (atomically)."""
        from safetensors.torch import save

        from robkd.utils.io import atomic_write_bytes

        t = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        atomic_write_bytes(self._tensor_path(name), save(t, metadata=meta))

    def load_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        """The tensors saved as ``name`` when resuming (None when absent or unreadable: recompute)."""
        if not self.resuming:
            return None
        p = self._tensor_path(name)
        if not p.exists():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as exc:  # noqa: BLE001 - a corrupt state file: recompute
            log.warning("ignoring unreadable audit state %s (%s)", p, exc)
            return None

    def save_json(self, name: str, obj: Any) -> None:
        """Save ``obj`` as ``<name>.json`` (atomically)."""
        from robkd.utils.io import atomic_write_json

        atomic_write_json(self.root / f"{name}.json", obj)

    def load_json(self, name: str) -> Any:
        """The JSON saved as ``name`` when resuming (None when absent or unreadable)."""
        p = self.root / f"{name}.json"
        if not self.resuming or not p.exists():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def load_suite(self, role: str) -> "SuiteResult | None":
        """The saved attack-suite progress of ``role`` (None when absent or unusable)."""
        from robkd.attacks import SuiteResult

        t = self.load_tensors(f"suite-{role}")
        if t is None:
            return None
        try:
            return SuiteResult.from_tensors(t, adv_dir=self.root)
        except RobkdError as exc:
            log.warning("ignoring unusable saved %s attack state (%s)", role, exc)
            return None
