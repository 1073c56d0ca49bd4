"""``robkd audit TEACHER STUDENT``: attack both models on identical samples, report, gate.

Exit codes: 0 all gates passed, 1 a gate failed, 2 bad input (one line on stderr) or ``--time-limit``
reached (the finished work is saved: continue with ``--resume``), 3 sanity flags raised under ``--strict``
(results are still written). ``--dry-run`` checks everything and estimates the cost (exit 0, nothing
written); ``--preset`` fills attacks, radii and sample counts (:mod:`robkd.auditing.presets`).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from robkd.auditing.config import AuditConfig


def register(sub: "argparse._SubParsersAction") -> None:
    """The ``audit`` subcommand; every flag named like an :class:`AuditConfig` field sets that field, and the
    defaults shown in the help are the dataclass' own."""
    from robkd.auditing.config import AuditConfig
    from robkd.auditing.presets import PRESETS, presets_help
    from robkd.cli.common import add_data_args, add_model_args, add_run_control_args

    d = AuditConfig()  # the defaults (no validation: nothing is given)
    p = sub.add_parser(
        "audit",
        help="attack suite over radii on teacher and student, transfer figures, gates, results.json",
        description=(
            "Evaluate teacher and student on the same seeded samples: clean and robust accuracy per attack "
            "(cumulative, in cascade order) and per radius, worst case, 95% Clopper-Pearson intervals, "
            "transfer figures, gates. Settings come from defaults < --preset < --spec FILE < flags. "
            "The default attack (pgd-20) is weaker than AutoAttack, so gates judged on it are optimistic: "
            "--preset robustbench runs the AutoAttack standard suite. "
            "Exit codes: 0 gates passed, 1 a gate failed, 2 bad input or --time-limit reached (continue with "
            "--resume), 3 sanity flags under --strict."
        ),
    )
    p.add_argument("teacher", nargs="?", help="teacher model file (or 'teacher' in --spec)")
    p.add_argument("student", nargs="?", help="student model file (or 'student' in --spec)")
    p.add_argument("--spec", help="audit spec (TOML) with the same settings; flags override it")
    p.add_argument("--preset", choices=sorted(PRESETS), metavar="NAME",
                   help=f"named settings under --spec and flags: {presets_help()}")
    add_data_args(p, default_n=d.n, default_split=d.split, default_seed=d.seed)
    add_model_args(p, pair=True)
    g = p.add_argument_group("threat model and attacks")
    g.add_argument("--eps", help="radii in [0,1] pixel space, e.g. 0.05,0.1 or 1/255,2/255,...,8/255 (default: the dataset's usual radius)")
    g.add_argument("--norm", choices=["Linf", "L2", "linf", "l2"], help=f"threat-model norm (default {d.norm})")
    g.add_argument("--attacks", help=f"comma-separated attack suite in cascade order, e.g. fgsm,pgd-20,autoattack (default {','.join(d.attacks)}); "
                        "a -eot<n> suffix (pgd-20-eot10) averages gradients over n passes for stochastic models; transfer attacks "
                        "each model with the other's adversarial examples (after both suites, e.g. pgd-20,transfer)")
    g.add_argument("--batch-size", type=int, help=f"batch size (default {d.batch_size})")
    g.add_argument("--device", help=f"cpu, cuda, cuda:N or mps (default {d.device})")
    a = p.add_argument_group("analyses")
    a.add_argument("--certify", choices=["ibp", "crown", "alpha-crown"], help="also certify both models at every radius")
    a.add_argument("--llm", action="store_true", default=None, help="also compute the Proposition-2 terms (local linearity) per radius")
    a.add_argument("--llm-steps", type=int, help=f"ascent steps of the local-linearity estimate (default {d.llm_steps})")
    a.add_argument("--llm-restarts", type=int,
                   help=f"random restarts of the local-linearity and Proposition-2 LHS ascents (default {d.llm_restarts})")
    a.add_argument("--linear-region-radius", action="store_true", default=None,
                   help="with --certify: also find, per sample, the largest radius inside one linear region "
                        "(bisection, about 14 bound passes per sample)")
    a.add_argument("--self-test", action="store_true", default=None,
                   help="also run the attack self-test (binarization test, Zimmermann et al. 2022) of each gradient attack "
                        "at the largest radius; a success rate below 90%% raises a sanity flag")
    a.add_argument("--self-test-n", type=int, metavar="N", help=f"samples of the attack self-test (default {d.self_test_n})")
    a.add_argument("--corruptions", nargs="?", const="all", metavar="LIST",
                   help="also measure accuracy under the common corruptions (Hendrycks and Dietterich): all 15 (no value) "
                        "or a list, e.g. gaussian_noise,fog; gates: student.corruption@3, student.corruption")
    a.add_argument("--severities", metavar="LIST",
                   help="corruption severities, e.g. 3 or 1,3,5 (default 1,2,3,4,5)")
    o = p.add_argument_group("gates and output")
    o.add_argument("--gate", action="append", dest="gates", metavar="EXPR",
                   help='release gate, repeatable, e.g. "student.worst@8/255 >= 0.9*teacher.worst@8/255" (replaces the spec\'s gates)')
    o.add_argument("--gate-on", choices=["lower", "point"], help=f"judge gates on 95%% confidence bounds (lower) or point estimates (point); default {d.gate_on}")
    o.add_argument("--enforce-default-verdict", action="store_true", default=None,
                   help="exit 1 when the default transfer verdict fails (the student keeps less than 90%% of the "
                        "teacher's worst-case robust accuracy at the largest radius, judged like --gate-on); "
                        "without it the default verdict is shown, not enforced")
    o.add_argument("--strict", action="store_true", default=None, help="exit 3 when a sanity check flags the evaluation")
    o.add_argument("--sanity-n", type=int, metavar="N",
                   help="clean-correct samples per model for the attack-based sanity checks (large radius, 10x more "
                        f"PGD steps, per-radius monotonicity; default {d.sanity_n}; they start from the suite's outcomes "
                        "and are saved for --resume); 0 runs only the cheap checks")
    o.add_argument("--out", help="output directory for results.json and samples.safetensors")
    o.add_argument("--resume", action="store_true", help="continue an interrupted audit in --out (finished work is not redone)")
    o.add_argument("--overwrite", action="store_true", help="replace an audit already in --out")
    o.add_argument("--cache", metavar="DIR",
                   help="result cache: a model's finished block (same weights, samples and settings) is taken from "
                        "here and re-checked instead of attacked again (default $ROBKD_CACHE_DIR, else "
                        "~/.cache/robkd/audit; see docs/results-schema.md, <role>.cache)")
    o.add_argument("--no-cache", action="store_true", help="neither read nor write the result cache")
    o.add_argument("--no-report", action="store_true", help="write results.json and samples only, no report.md/report.html")
    o.add_argument("--json", action="store_true", help="print results.json to stdout instead of the summary table")
    add_run_control_args(o, what="audit", checkpoint="after every (attack, radius) and analysis step")
    d = p.add_argument_group("multi-process (see docs/distributed.md)")
    d.add_argument("--launcher", choices=["none", "torchrun"], default="none",
                   help="torchrun: re-run this command under torchrun with --nproc-per-node processes; the samples are "
                        "sharded across them and rank 0 writes the results (same numbers as one process). "
                        "Multi-node: call torchrun yourself: torchrun --nnodes ... -m robkd audit ...")
    d.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="processes for --launcher torchrun (default: the number of GPUs with --device cuda, else 2)")
    p.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    """The settings given on the command line, for :meth:`AuditConfig.from_spec`: every config field whose flag
    (same name) was given. A flag left off is None and a switch left off (False) is not given either, so
    the spec file or the dataclass default stays; values are parsed and checked once, by the config."""
    from robkd.auditing.config import AuditConfig

    given = vars(args)
    return {name: None if given.get(name) is False else given.get(name) for name in AuditConfig.field_names()}


def run(args: argparse.Namespace) -> int:
    """Parse settings, run the audit (under torchrun with ``--launcher torchrun``), print the summary, return the exit code."""
    import os

    from robkd.errors import UsageError

    launcher = getattr(args, "launcher", "none") or "none"
    nproc = getattr(args, "nproc_per_node", None)
    if launcher == "none" and nproc is not None:
        raise UsageError("--nproc-per-node needs --launcher torchrun")
    if getattr(args, "dry_run", False):  # one process: nothing is attacked
        return _dry_run(args)
    if getattr(args, "time_limit", None) is not None and (launcher == "torchrun" or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1):
        raise UsageError("--time-limit is not supported under torchrun (stop the job yourself; --resume continues it)")
    if launcher == "torchrun":
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise UsageError("--launcher torchrun given inside a torchrun worker: drop --launcher when calling torchrun yourself")
        return _relaunch(args, nproc)
    from robkd.distributed.launch import EXIT_FILE_ENV, report_exit, report_failure

    if EXIT_FILE_ENV not in os.environ:
        return _run(args)
    # a worker started by --launcher torchrun: rank 0 reports the exit code through the file and every
    # rank exits 0; a rank that fails records its code and re-raises, so it exits at once (printing its
    # error) instead of waiting for peers that wait for it, and torchrun stops the others
    rank = int(os.environ.get("RANK", "0") or 0)
    try:
        code = _run(args)
    except Exception as exc:  # noqa: BLE001 - every failure's documented code reaches the launcher
        from robkd.cli.main import describe_failure

        report_failure(describe_failure(exc)[1])
        raise
    return report_exit(code, rank=rank)


def _relaunch(args: argparse.Namespace, nproc: int | None) -> int:
    from robkd.distributed.launch import check_nproc, relaunch

    if nproc is None:
        nproc = 2
        if (args.device or "").startswith("cuda"):
            import torch

            nproc = max(1, torch.cuda.device_count())
    check_nproc(nproc)
    argv = list(getattr(args, "_robkd_argv", None) or ["robkd"] + sys.argv[1:])[1:]
    return relaunch(argv, nproc)


def _config(args: argparse.Namespace) -> "AuditConfig":
    """The audit's settings: defaults < --preset < --spec < flags; both models named."""
    from robkd.auditing.config import AuditConfig
    from robkd.errors import UsageError

    overrides = _overrides(args)
    if getattr(args, "no_cache", False):
        if overrides.get("cache"):
            raise UsageError("give --cache DIR or --no-cache, not both")
        overrides["cache"] = False
    cfg = AuditConfig.from_spec(args.spec, preset=getattr(args, "preset", None), **overrides)
    if not cfg.teacher or not cfg.student:
        raise UsageError("give TEACHER and STUDENT model files (or 'teacher'/'student' in --spec)")
    return cfg


def _time_limit(args: argparse.Namespace, cfg: "AuditConfig") -> float | None:
    """``--time-limit`` in seconds (None when not given); it needs --out, where the finished work is kept."""
    from robkd.auditing.events import parse_duration
    from robkd.errors import UsageError

    if getattr(args, "time_limit", None) is None:
        return None
    limit = parse_duration(args.time_limit)
    if not cfg.out:
        raise UsageError("--time-limit needs --out DIR (where the finished work is kept for --resume)")
    return limit


def _dry_run(args: argparse.Namespace) -> int:
    """``--dry-run``: every check of a real run, then the plan and the cost estimate; nothing attacked or written."""
    from robkd.auditing.estimate import dry_run, estimate_to_dict, format_estimate

    cfg = _config(args)
    _time_limit(args, cfg)  # a bad --time-limit fails the dry run too
    est = dry_run(cfg, resume=args.resume, overwrite=args.overwrite)
    if args.json:
        import json

        sys.stdout.write(json.dumps(estimate_to_dict(est), indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(format_estimate(est)) + "\n")
    return 0


def _run(args: argparse.Namespace) -> int:
    import os
    import shlex
    import time

    from robkd.errors import UsageError

    t_start = time.monotonic()

    cfg = _config(args)
    if args.resume and not cfg.out:
        raise UsageError("--resume needs --out DIR (the directory of the interrupted audit)")
    limit = _time_limit(args, cfg)

    from robkd.auditing.api import run_audit
    from robkd.auditing.events import EventDisplay, TimeLimit, TimeLimitReached
    from robkd.auditing.render import closing_line, summary_tables
    from robkd.distributed.launch import strip_launcher_args
    from robkd.utils.progress import progress_bar

    command = strip_launcher_args(list(getattr(args, "_robkd_argv", None) or ["robkd"] + sys.argv[1:]))
    if int(os.environ.get("RANK", "0") or 0) != 0:  # other ranks of a torchrun job compute; rank 0 reports
        return run_audit(cfg, resume=args.resume, overwrite=args.overwrite, command=command).exit_code
    try:
        with progress_bar() as progress:
            display = EventDisplay(progress)
            on_event = display if limit is None else TimeLimit(limit, display, start=t_start)
            try:
                result = run_audit(cfg, resume=args.resume, overwrite=args.overwrite, on_event=on_event, command=command)
            finally:
                display.finish()
    except TimeLimitReached as exc:
        from robkd.errors import EXIT_BAD_INPUT

        again = " ".join(shlex.quote(a) for a in command if a != "--overwrite")
        sys.stderr.write(f"robkd audit: {exc}; the finished work is saved in {cfg.out}: continue with "
                         f"{again}{'' if args.resume else ' --resume'}\n")
        return EXIT_BAD_INPUT
    data = result.to_dict()
    if cfg.out and not args.no_report:
        try:
            from robkd.report import render
        except ImportError:  # pragma: no cover - the renderer ships with robkd
            render = None
        if render is not None:
            render(data, cfg.out)
    if args.json:
        import json

        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        from rich.console import Console

        console = Console()
        for table in summary_tables(data):
            console.print(table)
        if cfg.out:
            shown = os.path.normpath(cfg.out)  # "runs/" or "runs//x" shown as the path it is, never with "//"
            console.print(f"results: {os.path.join(shown, 'results.json')}"
                          + ("" if args.no_report else f", report: {os.path.join(shown, 'report.html')}"))
        flags = result.sanity_flags
        if flags and cfg.strict:
            console.print(f"[red]{len(flags)} sanity flag(s) under --strict: exit 3[/red]")
        console.print(closing_line(data), markup=False, highlight=False, soft_wrap=True)
    return result.exit_code
