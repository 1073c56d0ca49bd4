"""``robkd`` entry point: dispatch to one module per command; errors become one line + exit 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import typing
from typing import Sequence

from robkd.errors import EXIT_BAD_INPUT, EXIT_CODES_HELP, EXIT_INTERNAL, EXIT_INTERRUPTED

# command name -> module; each module defines register(subparsers) and run(args) -> int
COMMANDS: dict[str, str] = {
    "audit": "robkd.cli.audit",
    "repair": "robkd.cli.repair",
    "train": "robkd.cli.train",
    "certify": "robkd.cli.certify",
    "report": "robkd.cli.report",
    "gate": "robkd.cli.gate",
    "compare": "robkd.cli.compare",
    "demo": "robkd.cli.demo",
    "env": "robkd.cli.env",
    "cache": "robkd.cli.cache",
}

DESCRIPTION = (
    "robkd answers one question before a distilled model ships: did the student keep the "
    "teacher's adversarial robustness, and if not, fix it."
)


class _Parser(argparse.ArgumentParser):
    """argparse with bad usage reported as ONE line (``prog: error: ...``) and exit code 2, no usage dump.

    argparse %-formats an argument's help ("95%%" shows as "95%") but prints descriptions and epilogs as they
    are; here they are written like help strings too, so "%%" never reaches the terminal."""

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        for key in ("description", "epilog"):
            if isinstance(kwargs.get(key), str):
                kwargs[key] = kwargs[key].replace("%%", "%")
        super().__init__(*args, **kwargs)

    def add_argument_group(self, *args: typing.Any, **kwargs: typing.Any) -> typing.Any:  # noqa: D102
        if len(args) > 1 and isinstance(args[1], str):  # (title, description) given positionally
            args = (args[0], args[1].replace("%%", "%"), *args[2:])
        if isinstance(kwargs.get("description"), str):
            kwargs["description"] = kwargs["description"].replace("%%", "%")
        return super().add_argument_group(*args, **kwargs)

    def format_help(self) -> str:
        """argparse's help, then the exit-code table (verbatim: argparse would re-wrap an epilog)."""
        return super().format_help() + "\n" + EXIT_CODES_HELP

    def error(self, message: str) -> "typing.NoReturn":  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full parser (imports every command module, none of which imports torch at top level)."""
    from robkd import __version__

    parser = _Parser(prog="robkd", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"robkd {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on the terminal (no progress either)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (table in :mod:`robkd.errors`: 0 ok, 1 a gate failed, 2 bad input,
    3 sanity flags under ``--strict``, 4 internal error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    args._robkd_argv = ["robkd"] + argv  # the exact command line, recorded by commands that write results
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    debug = bool(args.debug)
    logging.basicConfig(
        level=logging.DEBUG if debug else (logging.WARNING if args.quiet else logging.INFO),
        format="%(levelname)s %(name)s: %(message)s" if debug else "%(message)s",
        stream=sys.stderr,
    )
    from robkd.utils.progress import set_quiet

    set_quiet(bool(args.quiet))  # --quiet: no progress bars or lines either
    if not debug:  # pyautoattack logs every runner's settings at INFO ("setting parameters for ... version")
        logging.getLogger("auto-attack").setLevel(logging.WARNING)
    _fail_writes_instead_of_dying()
    finished = False
    try:
        code = int(args.func(args) or 0)
        finished = True
        return code
    except KeyboardInterrupt:
        sys.stderr.write("robkd: interrupted\n")
        return EXIT_INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - every failure becomes one line and a documented code
        if debug or isinstance(exc, SystemExit):
            raise
        message, code = describe_failure(exc)
        sys.stderr.write(f"robkd {args.command}: error: {message}\n")
        return code
    finally:
        _close_process_group(wait=finished)


_MAX_MESSAGE = 400


def _fail_writes_instead_of_dying() -> None:
    """Past a file-size limit (``ulimit -f``) the kernel kills the process with SIGXFSZ, silently; ignored, a
    write fails with EFBIG instead, which becomes one line and exit 2."""
    import signal

    if hasattr(signal, "SIGXFSZ"):
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except ValueError:  # not the main thread (an embedding application): leave the signal alone
            pass


def _one_line(text: str) -> str:
    """The first non-empty line of ``text``, shortened, with control characters made visible."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    more = len(lines) > 1
    first = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in first)
    if len(first) > _MAX_MESSAGE:
        first, more = first[: _MAX_MESSAGE - 3] + "...", True
    return first + (" (--debug shows the full message)" if more else "")


def describe_failure(exc: BaseException) -> tuple[str, int]:
    """One line and the exit code (see :mod:`robkd.errors`) for an exception that ended a command.

    A :class:`~robkd.errors.RobkdError` keeps its message and code. Filesystem errors and memory
    exhaustion are the environment's (exit 2); anything else is a bug of robkd (exit 4).
    """
    from robkd.errors import RobkdError

    if isinstance(exc, RobkdError):
        return _one_line(str(exc)), exc.exit_code
    if isinstance(exc, OSError):
        what = exc.strerror or type(exc).__name__
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        return _one_line(f"cannot write or read a file ({what}{where})"), EXIT_BAD_INPUT
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "out of memory: lower --batch-size or -n, or use a larger machine", EXIT_BAD_INPUT
    if isinstance(exc, RecursionError):
        return "input nested too deeply to process", EXIT_BAD_INPUT
    detail = _one_line(f"{type(exc).__name__}: {exc}")
    return f"internal error ({detail}); rerun with --debug for the traceback and report it", EXIT_INTERNAL


def _close_process_group(*, wait: bool) -> None:
    """Tear down a process group a command started (torchrun runs): an undestroyed gloo group can abort
    at exit. ``wait``: the command finished normally, so every rank waits for the others first."""
    ctx_mod = sys.modules.get("robkd.distributed.context")
    if ctx_mod is not None:
        ctx_mod.shutdown(wait=wait)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
