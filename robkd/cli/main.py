"""``robkd`` entry point: dispatch to one module per command; errors become one line + exit 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import typing
from typing import Sequence

# command name -> module; each module defines register(subparsers) and run(args) -> int
COMMANDS: dict[str, str] = {
    "audit": "robkd.cli.audit",
    "repair": "robkd.cli.repair",
    "train": "robkd.cli.train",
    "certify": "robkd.cli.certify",
    "report": "robkd.cli.report",
    "demo": "robkd.cli.demo",
    "env": "robkd.cli.env",
}

DESCRIPTION = (
    "robkd answers one question before a distilled model ships: did the student keep the "
    "teacher's adversarial robustness, and if not, fix it."
)


class _Parser(argparse.ArgumentParser):
    """argparse with bad usage reported as ONE line (``prog: error: ...``) and exit code 2, no usage dump."""

    def error(self, message: str) -> "typing.NoReturn":  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full parser (imports every command module, none of which imports torch at top level)."""
    from robkd import __version__

    parser = _Parser(prog="robkd", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"robkd {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on the terminal")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 gate failed, 2 bad input)."""
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
    if not debug:  # pyautoattack logs every runner's settings at INFO ("setting parameters for ... version")
        logging.getLogger("auto-attack").setLevel(logging.WARNING)
    from robkd.errors import RobkdError

    finished = False
    try:
        code = int(args.func(args) or 0)
        finished = True
        return code
    except RobkdError as exc:
        if debug:
            raise
        sys.stderr.write(f"robkd {args.command}: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("robkd: interrupted\n")
        return 130
    finally:
        _close_process_group(wait=finished)


def _close_process_group(*, wait: bool) -> None:
    """Tear down a process group a command started (torchrun runs): an undestroyed gloo group can abort
    at exit. ``wait``: the command finished normally, so every rank waits for the others first."""
    ctx_mod = sys.modules.get("robkd.distributed.context")
    if ctx_mod is not None:
        ctx_mod.shutdown(wait=wait)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
