"""The bundled demo models (robust teacher, KD student, KDIGA student) and the ``robkd demo`` story.

``robkd/zoo/manifest.json`` lists every bundled file with its SHA-256 and the exact
robkd command that produced it; :func:`load_manifest` checks the hashes before a
file is used. :func:`run_demo` audits teacher vs KD student (the gate fails),
repairs the student with a short KDIGA run (or, with ``full=True``, uses the
bundled fully trained KDIGA student), re-audits, and writes the reports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from robkd.errors import DataError, ModelLoadError, UsageError

log = logging.getLogger(__name__)

ZOO_DIR = Path(__file__).resolve().parent
MANIFEST = "manifest.json"
ROLES = ("teacher", "kd_student", "kdiga_student")

#: The demo's audit settings (audits/demo.toml holds the same values as an audit spec).
DEMO_AUDIT: dict[str, Any] = {
    "data": "fashion-mnist",
    "split": "test",
    "n": 500,
    "seed": 0,
    "norm": "Linf",
    "eps": [0.05, 0.1],
    "attacks": ["fgsm", "pgd-20", "transfer"],  # transfer: each model attacked with the other's adversarial examples
    "corruptions": ["all"],  # the 15 common corruptions at every severity (about 15 s on a CPU for 500 samples)
    "severities": [1, 2, 3, 4, 5],
    "gate_on": "lower",
    "gates": ["student.worst@0.1 >= 0.65*teacher.worst@0.1", "student.clean >= 0.65"],
}
#: The short KDIGA repair (fine-tuning the KD student); ``--full`` uses the bundled full run instead.
DEMO_REPAIR: dict[str, Any] = {
    "method": "kdiga",
    "epochs": 2,
    "train_n": 6000,
    "val_n": 300,
    "lr": 0.05,
    "lambda_iga": 2.0,
    "lambda_ce": 0.5,
    "lambda_kl": 0.5,
    "temperature": 1.0,
    "batch_size": 128,
    "schedule": "multistep",
    "seed": 0,
}


@dataclasses.dataclass
class ZooEntry:
    """One bundled file: its path, expected SHA-256 and the command that produced it."""

    role: str
    path: Path
    sha256: str
    command: str
    note: str = ""
    training_log: Path | None = None


def load_manifest(zoo_dir: str | Path | None = None, *, verify: Sequence[str] = ROLES) -> dict[str, ZooEntry]:
    """Read ``manifest.json`` and check the SHA-256 of the files named in ``verify``.

    Raises :class:`UsageError` when the manifest is missing or malformed and
    :class:`ModelLoadError` when a file is missing or its hash differs.
    """
    from robkd.utils.io import sha256_file

    root = Path(zoo_dir) if zoo_dir is not None else ZOO_DIR
    path = root / MANIFEST
    if not path.is_file():
        raise UsageError(f"no demo models in this installation: {path} is missing "
                         "(the demo pair is produced by scripts/table3_fashion_mnist.py; see robkd/zoo/README.md)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"malformed demo manifest {path}: {exc}") from exc
    out: dict[str, ZooEntry] = {}
    for role in ROLES:
        ent = files.get(role) if isinstance(files, dict) else None
        if not isinstance(ent, dict) or not all(isinstance(ent.get(k), str) for k in ("file", "sha256", "command")):
            raise UsageError(f"malformed demo manifest {path}: entry {role!r} needs 'file', 'sha256' and 'command'")
        tlog = ent.get("training_log")
        out[role] = ZooEntry(role, root / ent["file"], ent["sha256"].lower(), ent["command"], str(ent.get("note", "")),
                             root / tlog if isinstance(tlog, str) else None)
    for role in verify:
        e = out[role]
        if not e.path.is_file():
            raise ModelLoadError(f"demo model {e.path} listed in {path} is missing")
        got = sha256_file(e.path)
        if got != e.sha256:
            raise ModelLoadError(f"demo model {e.path} is corrupt or was changed: SHA-256 {got[:16]}... "
                                 f"does not match the manifest's {e.sha256[:16]}...")
        want_log = files[role].get("training_log_sha256")
        if e.training_log is not None and isinstance(want_log, str) and e.training_log.is_file():
            if sha256_file(e.training_log) != want_log.lower():
                raise ModelLoadError(f"training log {e.training_log} does not match the manifest's SHA-256")
    return out


def write_manifest(zoo_dir: str | Path, entries: dict[str, dict[str, Any]], *, description: str = "") -> Path:
    """Write ``manifest.json`` for files already in ``zoo_dir``: hashes computed here.

    ``entries[role]`` has ``file`` and ``command`` (and optionally ``training_log``,
    ``note``, ``provenance``); every role of :data:`ROLES` is required.
    """
    from robkd.utils.io import atomic_write_json, sha256_file

    root = Path(zoo_dir)
    missing = [r for r in ROLES if r not in entries]
    if missing:
        raise UsageError(f"manifest needs entries for {missing}")
    files: dict[str, Any] = {}
    for role in ROLES:
        ent = dict(entries[role])
        if not isinstance(ent.get("file"), str) or not isinstance(ent.get("command"), str):
            raise UsageError(f"manifest entry {role!r} needs 'file' and 'command' strings")
        p = root / ent["file"]
        if not p.is_file():
            raise ModelLoadError(f"{p} does not exist")
        ent["sha256"] = sha256_file(p)
        if isinstance(ent.get("training_log"), str):
            ent["training_log_sha256"] = sha256_file(root / ent["training_log"])
        files[role] = ent
    path = root / MANIFEST
    atomic_write_json(path, {"description": description, "files": files})
    return path


def demo_data(data: str, data_dir: str | None) -> str:
    """``data`` if it loads, else the bundled ``fashion-mnist-slice`` (with a warning) for Fashion-MNIST."""
    from robkd.data import load_dataset

    try:
        load_dataset(data, "test", data_dir=data_dir)
        return data
    except DataError as exc:
        if data != "fashion-mnist":
            raise
        log.warning("Fashion-MNIST not found (%s); using the bundled real slice fashion-mnist-slice "
                    "(1000 test / 2000 train images). Install Debian's dataset-fashion-mnist for the full data.", exc)
        return "fashion-mnist-slice"


@dataclasses.dataclass
class DemoResult:
    """What the demo did: both audits' results dicts, the combined report dict, the written paths."""

    before: dict[str, Any]
    after: dict[str, Any]
    combined: dict[str, Any]
    paths: list[Path]
    seconds: float

    @property
    def story_holds(self) -> bool:
        """The gate failed before the repair and passed after it."""
        return (not self.before.get("gates_passed", True)) and bool(self.after.get("gates_passed"))


def run_demo(out_dir: str | Path = "reports/demo", *, full: bool = False, zoo_dir: str | Path | None = None,
             data: str | None = None, data_dir: str | None = None, audit_overrides: dict[str, Any] | None = None,
             repair_overrides: dict[str, Any] | None = None, command: Sequence[str] | None = None,
             show_progress: bool = False, on_stage: Callable[[str], None] | None = None) -> DemoResult:
    """Audit -> repair -> re-audit on the bundled pair; writes reports into ``out_dir``.

    ``out_dir/report.{md,html}`` + ``results.json``: the repair report (verdict after
    the repair, before/after comparison, training curves); ``out_dir/before/``: the
    audit of the KD student alone. ``full=True`` audits the bundled fully trained
    KDIGA student instead of running the short repair.
    """
    from robkd.auditing import audit
    from robkd.report import render

    t_start = time.perf_counter()
    stage = on_stage or (lambda text: log.info("%s", text))
    zoo = load_manifest(zoo_dir, verify=ROLES if full else ("teacher", "kd_student"))
    settings = {**DEMO_AUDIT, **dict(audit_overrides or {})}
    unknown = set(settings) - set(DEMO_AUDIT)
    if unknown:
        raise UsageError(f"unknown demo audit setting(s) {sorted(unknown)}")
    settings["data"] = demo_data(data or settings["data"], data_dir)
    rep = {**DEMO_REPAIR, **dict(repair_overrides or {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cmd = list(command) if command is not None else ["robkd", "demo", "--out", str(out)] + (["--full"] if full else [])
    audit_kw = dict(settings, data_dir=data_dir)
    teacher, kd = _short(zoo["teacher"].path), _short(zoo["kd_student"].path)

    def run_audit(t: Any, s: Any) -> Any:
        """One audit of the demo, its phases shown as progress (bars on a terminal, lines in CI)."""
        if not show_progress:
            return audit(t, s, command=cmd, **audit_kw)
        from robkd.auditing.events import EventDisplay
        from robkd.utils.progress import progress_bar

        with progress_bar() as progress:
            return audit(t, s, command=cmd, on_event=EventDisplay(progress), **audit_kw)

    stage(f"1/3 auditing the teacher vs the KD student ({settings['n']} {settings['data']} test images, "
          f"{', '.join(settings['attacks'])} at {settings['eps']})")
    before = run_audit(teacher, kd).to_dict()
    paths = render(before, out / "before")

    training: dict[str, Any] | None
    if full:
        stage("2/3 using the bundled fully trained KDIGA student (--full)")
        student_after = _short(zoo["kdiga_student"].path)
        training = _bundled_training_log(zoo["kdiga_student"])
    else:
        from robkd.distill import repair

        stage(f"2/3 repairing the KD student with a short {rep['method'].upper()} run ({rep['epochs']} epoch(s) "
              f"on {rep['train_n']} training images)")
        rep_kw = {k: v for k, v in rep.items() if k not in ("method", "epochs")}
        res = repair(teacher, kd, method=rep["method"], data=settings["data"], data_dir=data_dir, epochs=rep["epochs"],
                     out=out / "kdiga_student_short.safetensors", state_path=out / ".repair-state.pt",
                     log_path=out / ".repair-log.jsonl", show_progress=show_progress, **rep_kw)
        for tmp in (out / ".repair-state.pt", out / ".repair-log.jsonl"):
            tmp.unlink(missing_ok=True)
        student_after = res.checkpoint or (out / "kdiga_student_short.safetensors")
        training = res.log.to_dict()

    stage("3/3 re-auditing the teacher vs the repaired student")
    after_result = run_audit(teacher, student_after)
    after = after_result.to_dict()
    after_result.attach_before(before)
    combined = after_result.to_dict()
    if training:
        combined["training"] = training
    combined["demo"] = {"full": full, "zoo": {r: {"file": e.path.name, "sha256": e.sha256, "command": e.command}
                                              for r, e in zoo.items()},
                        "repair": None if full else rep}
    paths += render(combined, out)
    return DemoResult(before, after, combined, paths, time.perf_counter() - t_start)


def _short(path: Path) -> Path:
    """``path`` relative to the working directory when it lies below it (reports then show short paths)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def _bundled_training_log(entry: ZooEntry) -> dict[str, Any] | None:
    """The full run's epoch log shipped beside the bundled model (``training_log`` in the manifest).

    Accepts a ``TrainLog.to_dict()`` JSON object or the trainer's JSON-lines epoch log.
    """
    p = entry.training_log
    if p is None or not p.is_file():
        return None
    text = p.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except ValueError:
        try:
            obj = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            log.warning("ignoring unreadable training log %s", p)
            return None
    if isinstance(obj, list):
        return {"records": [r for r in obj if isinstance(r, dict)], "config": {"method": "kdiga"}}
    return obj if isinstance(obj, dict) else None
