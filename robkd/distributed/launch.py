"""``--launcher torchrun``: re-execute a robkd command under ``python -m torch.distributed.run``.

The parent process builds the torchrun command line (one node, ``--nproc-per-node``
workers, rendezvous on 127.0.0.1 and a free port), waits for it, and returns the
command's own exit code: workers started this way report their exit code through a
small file (``ROBKD_EXIT_FILE``) and exit 0, so that torchrun does not treat an
ordinary "gate failed" (1) or "bad input" (2) as a crashed worker.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from robkd.errors import RobkdError, UsageError

log = logging.getLogger(__name__)

#: environment variable naming the file where rank 0 writes the command's exit code
EXIT_FILE_ENV = "ROBKD_EXIT_FILE"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_nproc(nproc: object) -> int:
    """Validate ``--nproc-per-node``."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise UsageError(f"--nproc-per-node must be an integer >= 1, got {nproc!r}")
    return nproc


def strip_launcher_args(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--launcher X`` / ``--nproc-per-node N`` (both ``--flag value`` and ``--flag=value``)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--launcher", "--nproc-per-node", "--nproc_per_node"):
            skip = True
            continue
        if a.startswith(("--launcher=", "--nproc-per-node=", "--nproc_per_node=")):
            continue
        out.append(a)
    return out


def torchrun_safe_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--n`` spelled ``--num-samples`` (torchrun's parser takes ``--n`` for an abbreviation of its own options)."""
    out = []
    for a in argv:
        if a == "--n":
            out.append("--num-samples")
        elif a.startswith("--n="):
            out.append("--num-samples=" + a[len("--n="):])
        else:
            out.append(a)
    return out


def torchrun_command(command_argv: Sequence[str], nproc: int, *, port: int | None = None,
                     python: str | None = None) -> list[str]:
    """The ``python -m torch.distributed.run ... -m robkd ARGV`` command line for one node on 127.0.0.1."""
    nproc = check_nproc(nproc)
    port = free_port() if port is None else int(port)
    return [
        python or sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "robkd", *torchrun_safe_args(command_argv),
    ]


def relaunch(argv: Sequence[str], nproc: int, *, env: dict[str, str] | None = None) -> int:
    """Run the robkd command ``argv`` (without ``robkd``) under torchrun; returns its exit code.

    ``argv`` may still contain ``--launcher``/``--nproc-per-node`` (they are removed). Without ``--debug``
    the workers' output passes through, each distinct error line once, and torchrun's own failure report
    (a launcher traceback and a ChildFailedError summary, 40+ lines) is dropped: the failing rank has
    printed its one line and recorded its exit code.
    """
    debug = "--debug" in argv
    cmd = torchrun_command(strip_launcher_args(argv), nproc)
    with tempfile.TemporaryDirectory(prefix="robkd-launch-") as tmp:
        exit_file = Path(tmp) / "exit_code"
        child_env = dict(os.environ if env is None else env)
        child_env[EXIT_FILE_ENV] = str(exit_file)
        child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        log.debug("launching %d processes: %s", nproc, " ".join(cmd))
        if debug:
            rc = subprocess.call(cmd, env=child_env)
        else:
            proc = subprocess.Popen(cmd, env=child_env, stderr=subprocess.PIPE, text=True, errors="replace")
            filt = _StderrFilter()
            for line in proc.stderr or ():
                if filt.keep(line):
                    sys.stderr.write(line)
                    sys.stderr.flush()
            rc = proc.wait()
        if exit_file.is_file():  # rank 0's code on success, a failing rank's (e.g. 2, bad input) otherwise
            try:
                return int(exit_file.read_text(encoding="utf-8").strip() or 0)
            except ValueError:
                pass
        if rc == 0:
            return 0
        # torchrun failed before any worker reported (a port, a crash of the launcher): never exit 1
        raise LaunchError(f"torchrun exited with code {rc} before the robkd processes reported a result "
                          "(rerun with --debug to see its output)")


class LaunchError(RobkdError):
    """torchrun itself failed (no worker recorded an exit code)."""


class _StderrFilter:
    """Which lines of a torchrun job's stderr to show: not torchrun's failure report, each error line once."""

    _GLOG = re.compile(r"^[EWI]\d{4} \d\d:\d\d:\d\d")

    def __init__(self) -> None:
        self.dropping = False
        self.errors: set[str] = set()

    def keep(self, line: str) -> bool:
        if self.dropping:
            return False
        if line.startswith("Traceback (most recent call last)") or "ChildFailedError" in line:
            self.dropping = True  # torchrun's launcher traceback and summary run to the end of its output
            return False
        if self._GLOG.match(line):
            return False
        if ": error: " in line and line.startswith("robkd"):
            if line in self.errors:
                return False
            self.errors.add(line)
        return True


def report_failure(code: int) -> None:
    """Under :func:`relaunch`, record the exit code of a rank that failed (any rank): the rank then exits
    non-zero at once (no waiting for its peers, which torchrun stops) and the launcher returns ``code``.

    Only the FIRST failure is recorded: it is the cause, and what fails after it on other ranks (e.g. a
    rank whose state folder the failed rank 0 removed) is a consequence that must not replace its code."""
    path = os.environ.get(EXIT_FILE_ENV)
    if path:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"{int(code)}\n")


def report_exit(code: int, *, rank: int) -> int:
    """Exit code a torchrun worker should return: under :func:`relaunch`, rank 0 records ``code`` and every rank returns 0."""
    path = os.environ.get(EXIT_FILE_ENV)
    if not path:
        return code
    if rank == 0:
        from robkd.utils.io import atomic_write_text

        atomic_write_text(path, f"{int(code)}\n")
    return 0
