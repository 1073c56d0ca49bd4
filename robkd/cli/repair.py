"""``robkd repair TEACHER [STUDENT]``: distil the teacher's robustness into the student, then audit the pair."""

from __future__ import annotations

import argparse

from robkd.cli.train import OBJECTIVES_HELP, add_train_args, hparams_from_args, parse_arch_kwargs
from robkd.distill.config import STUDENT_METHODS


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "repair", help="distil a robust teacher into a student (KDIGA, ARD, ...), then audit the pair",
        description=(
            "Fine-tune STUDENT to keep TEACHER's adversarial robustness (default method: kdiga), save a "
            "self-describing robkd checkpoint, then audit (teacher, new student) and write the report "
            "(unless --no-audit). --from-scratch re-initialises STUDENT; without STUDENT, --student-arch "
            "creates a new one."
        ),
        epilog=OBJECTIVES_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("teacher", metavar="TEACHER", help="robust teacher model file")
    p.add_argument("student", metavar="STUDENT", nargs="?", help="student model file to fine-tune (omit with --student-arch)")
    p.add_argument("--method", choices=STUDENT_METHODS + ("auto",), default="kdiga",
                   help="distillation objective (default: kdiga); auto: try candidates on validation, continue the best "
                        "until --gate holds on validation or --budget is spent")
    p.add_argument("--out", required=True, help="output checkpoint path of the repaired student")
    p.add_argument("--from-scratch", action="store_true", help="re-initialise STUDENT (same architecture) before training")
    p.add_argument("--student-arch", help="without STUDENT: architecture of a new student; with STUDENT (a state_dict): its architecture")
    p.add_argument("--arch-kwargs", help="JSON keyword arguments of --student-arch, e.g. '{\"width\": 2}'")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled nn.Module files (runs code from the file)")
    g = p.add_argument_group("audit after training", "the audits run on --device, like the training")
    g.add_argument("--no-audit", action="store_true", help="skip the audit of (teacher, repaired student)")
    g.add_argument("--no-before-audit", action="store_true",
                   help="skip the audit of STUDENT as given (otherwise it runs first, with the same settings, and the "
                        "report compares before with after)")
    g.add_argument("--audit-out", help="audit output directory (default: OUT.audit/)")
    g.add_argument("--audit-n", type=int, default=1000, help="test samples of the audit (default: 1000)")
    g.add_argument("--audit-eps", help="audit radii, e.g. 0.02,0.04,...,0.1 (default: the dataset's radius)")
    g.add_argument("--audit-attacks", default="pgd-20", help="audit attacks, comma-separated (default: pgd-20)")
    g.add_argument("--gate", action="append", help="release gate judged by the audit (repeatable); --method auto repairs "
                   "until it holds on validation, e.g. \"student.worst@0.1 >= 0.9*teacher.worst@0.1\"")
    au = p.add_argument_group("--method auto", "short trials on a validation split carved from the training data, "
                              "ranked by the 95% lower bound of validation robust accuracy; see docs/methods.md")
    au.add_argument("--budget", help="wall-clock budget of --method auto, e.g. 2h, 90m, 1h30m (default: 1h)")
    au.add_argument("--auto-candidates", help="JSON list of candidate objective options, e.g. "
                    "'[{\"method\": \"rslad\"}, {\"method\": \"ard\", \"igdm\": true}]' (default: every recent method)")
    au.add_argument("--auto-trial-epochs", type=int, help="passes of each trial (default: 1)")
    au.add_argument("--auto-trial-n", type=int, help="training images of each trial (default: all)")
    au.add_argument("--auto-round-epochs", type=int, help="passes of each continuation round (default: 1)")
    au.add_argument("--auto-max-rounds", type=int, help="most continuation rounds (default: 20)")
    au.add_argument("--auto-max-clean-drop", type=float, help="largest validation clean-accuracy loss a trial may have (default: 0.1)")
    add_train_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from robkd.distill import repair
    from robkd.errors import UsageError

    if args.student is None and not args.student_arch:
        raise UsageError("give STUDENT (a model file to fine-tune) or --student-arch to create a new student")
    if args.student is None and args.from_scratch:
        raise UsageError("--from-scratch re-initialises STUDENT: give STUDENT, or use --student-arch alone")
    load_kw = {"arch": args.student_arch, "allow_pickle": args.allow_pickle} if args.student else {}
    from robkd.utils.validate import split_list

    audit_kw: dict = {"n": args.audit_n, "attacks": split_list(args.audit_attacks, "--audit-attacks", allow_empty=True),
                      "seed": args.seed, "device": args.device}  # the audits run on the training device
    if args.audit_eps:
        audit_kw["eps"] = args.audit_eps
    audit_out = args.audit_out or (args.out + ".audit")
    auto_kw: dict = {}
    if args.method == "auto":
        import json

        if args.auto_candidates:
            try:
                auto_kw["candidates"] = json.loads(args.auto_candidates)
            except ValueError as exc:
                raise UsageError(f"bad --auto-candidates: not JSON ({exc})") from exc
        auto_kw.update(trial_epochs=args.auto_trial_epochs, trial_n=args.auto_trial_n, round_epochs=args.auto_round_epochs,
                       max_clean_drop=args.auto_max_clean_drop, max_rounds=args.auto_max_rounds)
    elif args.budget or any(v is not None for v in (args.auto_candidates, args.auto_trial_epochs, args.auto_trial_n,
                                                     args.auto_round_epochs, args.auto_max_clean_drop, args.auto_max_rounds)):
        raise UsageError("--budget and --auto-* options belong to --method auto")
    res = repair(
        args.teacher, args.student, method=args.method, data=args.data, epochs=args.epochs, out=args.out,
        from_scratch=args.from_scratch, student_arch=args.student_arch if args.student is None else None,
        arch_kwargs=parse_arch_kwargs(args.arch_kwargs), load_kwargs=load_kw, data_dir=args.data_dir,
        state_path=args.state, log_path=args.log, resume=args.resume, audit=not args.no_audit,
        audit_out=None if args.no_audit else Path(audit_out), audit_kwargs=audit_kw,
        audit_before=not args.no_before_audit, gate=args.gate,
        budget=(args.budget or "1h") if args.method == "auto" else None, auto_options=auto_kw or None,
        **hparams_from_args(args),
    )
    out = logging.getLogger("robkd")
    out.info("saved %s (selected epoch %s)", res.checkpoint, res.log.selected_epoch)
    if res.auto is not None:
        from robkd.distill.auto import auto_table

        out.info("%s", auto_table(res.auto).rstrip())
    if res.audit is not None:
        out.info("audit written to %s", audit_out)
        return int(getattr(res.audit, "exit_code", 0) or 0)
    return 0
