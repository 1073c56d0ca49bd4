"""``robkd demo``: the end-to-end story on the bundled Fashion-MNIST pair.

Audit a robust teacher against its KD student (the robustness gate fails and the report
says why), repair the student with a short KDIGA run, re-audit (robust accuracy recovers),
and write the reports under ``reports/demo/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``demo`` command."""
    p = sub.add_parser(
        "demo",
        help="audit teacher vs KD student, repair with KDIGA, re-audit; reports in reports/demo/",
        description="The end-to-end story on the bundled Fashion-MNIST models: audit the robust teacher against "
        "its KD student (the gate fails), repair the student with a short KDIGA run, audit again, and write "
        "report.html / report.md / results.json. Takes a few minutes on a laptop CPU.",
    )
    p.add_argument("--out", default="reports/demo", help="output directory (default: reports/demo)")
    p.add_argument("--full", action="store_true",
                   help="use the bundled fully trained KDIGA student instead of the short repair run")
    p.add_argument("--data-dir", help="directory holding Fashion-MNIST (default: the usual locations)")
    p.add_argument("--n", type=int, help="test samples per audit (default: 500)")
    p.add_argument("--epochs", type=int, help="epochs of the short KDIGA repair (default: 2)")
    p.add_argument("--train-n", type=int, help="training images of the short repair (default: 6000)")
    p.add_argument("--zoo", help=argparse.SUPPRESS)  # another directory holding manifest.json (tests)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when the story held (the gate failed before the repair and passed after), else 1."""
    import logging

    from robkd.errors import UsageError
    from robkd.zoo import run_demo

    for flag, v in (("--n", args.n), ("--epochs", args.epochs), ("--train-n", args.train_n)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    log = logging.getLogger("robkd.demo")
    audit_over = {"n": args.n} if args.n else {}
    repair_over = {k: v for k, v in (("epochs", args.epochs), ("train_n", args.train_n)) if v}
    cmd = ["robkd", "demo"] + sys.argv[sys.argv.index("demo") + 1:] if "demo" in sys.argv else None
    res = run_demo(args.out, full=args.full, zoo_dir=args.zoo, data_dir=args.data_dir, audit_overrides=audit_over,
                   repair_overrides=repair_over, command=cmd, show_progress=True,  # bars or CI lines; off under --quiet
                   on_stage=lambda text: log.info("%s", text))
    b, a = res.before, res.after
    r = a["radii_text"][-1]
    sys.stdout.write(
        f"before repair: gates {'passed' if b['gates_passed'] else 'FAILED'}; student worst-case robust accuracy @ {r}: "
        f"{100 * b['student']['per_radius'][-1]['worst']['value']:.1f}% (teacher "
        f"{100 * b['teacher']['per_radius'][-1]['worst']['value']:.1f}%)\n"
        f"after repair:  gates {'passed' if a['gates_passed'] else 'FAILED'}; student worst-case robust accuracy @ {r}: "
        f"{100 * a['student']['per_radius'][-1]['worst']['value']:.1f}%\n"
        f"report: {os.path.join(os.path.normpath(args.out), 'report.html')} ({res.seconds:.0f} s)\n"
    )
    if not res.story_holds:
        log.warning("the demo's story did not hold here (it needs the gate to fail before the repair and pass after; "
                    "on data %s). With the bundled slice instead of the full Fashion-MNIST the short repair sees only "
                    "2000 training images: install Debian's dataset-fashion-mnist, or pass --data-dir", a["data"]["dataset"])
        return 1
    return 0
