"""``robkd certify MODEL``: certified accuracy per radius (IBP / CROWN / alpha-CROWN / MILP / smoothing).

Writes ``DIR/certify.json`` atomically and prints a table. With ``--linear-region-radius`` also the
per-sample largest radius inside one linear region (bisection). Exit codes: 0 done, 2 bad input (one
line on stderr).
"""

from __future__ import annotations

import argparse

METHODS = ("ibp", "crown", "alpha-crown", "milp", "smoothing")


def register(sub: "argparse._SubParsersAction") -> None:
    from robkd.cli.common import add_data_args, add_model_args

    p = sub.add_parser(
        "certify",
        help="certified robustness per radius: ibp, crown, alpha-crown, exact milp, randomized smoothing",
        description=(
            "Certify a model on a seeded subset: per radius, the fraction of samples that are correctly "
            "classified and provably robust (bound methods: every margin lower bound > 0), the number of "
            "unstable ReLUs and the fraction of samples whose ball lies in one linear region. 'milp' gives "
            "exact verdicts on small networks; 'smoothing' certifies the smoothed classifier (L2 radii)."
        ),
    )
    p.add_argument("model", help="model file")
    add_model_args(p, pair=False)
    add_data_args(p, default_n=100)
    g = p.add_argument_group("certification")
    g.add_argument("--method", choices=METHODS, default=None, help="certification method (default crown)")
    g.add_argument("--budget", metavar="TIME,MEMORY",
                   help="per sample, the tightest bound method that fits a time and memory budget, e.g. 30s,2GB: "
                        "IBP -> CROWN-IBP -> CROWN -> alpha-CROWN -> MILP (small nets), escalating only undecided "
                        "samples; certify.json records the method that decided each sample and every fallback "
                        "(replaces --method)")
    g.add_argument("--eps", help="radii, e.g. 0.01,0.05 or 1/255,2/255,...,8/255 (default: the dataset's usual Linf radius; required for --norm L2 and smoothing)")
    g.add_argument("--norm", choices=["Linf", "L2", "linf", "l2"], default="Linf", help="ball norm (default Linf)")
    g.add_argument("--bounds-backend", choices=["robkd", "auto_lirpa"], default="robkd",
                   help="bound implementation for ibp/crown/alpha-crown (auto_lirpa needs a working install)")
    g.add_argument("--intermediate", choices=["crown", "ibp"], default="crown",
                   help="intermediate (pre-ReLU) bounds: full CROWN (default) or IBP (cheaper CROWN-IBP)")
    g.add_argument("--alpha-steps", type=int, default=20, help="Adam steps of alpha-CROWN (default 20)")
    g.add_argument("--time-limit", type=float, default=30.0, help="MILP time limit per sample in seconds (default 30)")
    g.add_argument("--batch-size", type=int, default=128, help="samples per bound batch (default 128)")
    r = p.add_argument_group("linear-region radius")
    r.add_argument("--linear-region-radius", action="store_true",
                   help="also find, per sample, the largest radius whose ball the bounds show inside one linear region "
                        "(bisection; about 14 bound passes per sample, so opt-in); adds 'linear_region_radius' to "
                        "certify.json")
    r.add_argument("--linear-region-max", type=float, metavar="R",
                   help="upper end of the bisection (default: the ball then covers the whole input cube: 1 for Linf, "
                        "sqrt(number of inputs) for L2); samples that reach it are reported as capped")
    r.add_argument("--linear-region-tol", type=float, metavar="T",
                   help="bisection tolerance (default 1e-4 times the upper end)")
    s = p.add_argument_group("randomized smoothing")
    s.add_argument("--sigma", type=float, help="noise level of the smoothed classifier (required for smoothing)")
    s.add_argument("--n0", type=int, default=100, help="selection samples (default 100)")
    s.add_argument("--mc-n", type=int, default=10000, help="estimation samples per input (default 10000)")
    s.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    p.add_argument("--out", required=True, help="output directory for certify.json")
    p.add_argument("--json", action="store_true", help="print certify.json to stdout instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import logging
    import math
    import sys
    import time
    from pathlib import Path

    from robkd.cli.common import model_kwargs
    from robkd.data import dataset_info, eval_subset, load_dataset
    from robkd.errors import DataError, IncompatibleModelsError, UsageError
    from robkd.models import load_model
    from robkd.types import Norm, format_radius, parse_eps_list
    from robkd.utils.io import atomic_write_json
    from robkd.utils.outdir import check_out_dir
    from robkd.utils.progress import progress_task

    log = logging.getLogger("robkd.certify")
    budget = None
    if getattr(args, "budget", None) is not None:
        from robkd.bounds.budget import Budget

        if args.method is not None:
            raise UsageError("--budget picks the method per sample: drop --method")
        budget = Budget.parse(args.budget)
        args.method = "budget"
    elif args.method is None:
        args.method = "crown"
    if args.batch_size is not None and args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    if args.alpha_steps < 0:
        raise UsageError(f"--alpha-steps must be >= 0, got {args.alpha_steps}")
    if not args.time_limit > 0:
        raise UsageError(f"--time-limit must be > 0, got {args.time_limit}")
    lr_max = getattr(args, "linear_region_max", None)
    lr_tol = getattr(args, "linear_region_tol", None)
    want_lr = bool(getattr(args, "linear_region_radius", False))
    if (lr_max is not None or lr_tol is not None) and not want_lr:
        raise UsageError("--linear-region-max / --linear-region-tol need --linear-region-radius")
    if lr_max is not None and not (math.isfinite(lr_max) and lr_max > 0):
        raise UsageError(f"--linear-region-max must be a finite number > 0, got {lr_max}")
    if lr_tol is not None and not (math.isfinite(lr_tol) and lr_tol > 0):
        raise UsageError(f"--linear-region-tol must be a finite number > 0, got {lr_tol}")
    norm = Norm.parse(args.norm)
    if args.method == "milp" and norm is not Norm.LINF:
        raise UsageError("--method milp supports --norm Linf only")
    if args.method == "smoothing":
        if args.sigma is None or not args.sigma > 0:
            raise UsageError("--method smoothing needs --sigma > 0")
        norm = Norm.L2  # smoothing certifies L2 radii
    if args.bounds_backend == "auto_lirpa" and args.method in ("milp", "smoothing", "budget"):
        raise UsageError("--bounds-backend auto_lirpa applies to ibp/crown/alpha-crown only")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    check_out_dir(out_dir)
    radii = parse_eps_list(args.eps) if args.eps is not None else None  # bad radii fail before any model loads
    if args.eps is None and args.method == "smoothing":
        raise UsageError("--method smoothing certifies L2 radii: give them with --eps (e.g. 0.25,0.5,1.0); "
                         "the dataset's usual radius is an Linf radius")
    if args.eps is None and norm is not Norm.LINF:
        raise UsageError(f"--norm {norm.value} needs radii: give them with --eps (the datasets' usual radii are Linf radii)")
    if radii is not None and norm is Norm.LINF and max(radii) > 1:
        raise UsageError(f"Linf radius {max(radii):g} is larger than the whole [0,1] pixel range: radii are in "
                         "[0,1] pixel space (e.g. 8/255, not 8)")

    def _data(name: str):
        return load_dataset(name, args.split or "test", data_dir=args.data_dir, download=args.download, img_size=args.img_size)

    data = _data(args.data) if args.data else None  # first, so it can complete a plain state_dict's architecture
    model = load_model(args.model, dataset=data, **model_kwargs(args))
    data_name = args.data or model.meta.dataset
    if not data_name:
        raise UsageError("no dataset: pass --data (the model file does not name one)")
    if data is None:
        data = _data(data_name)
    seed = 0 if args.seed is None else args.seed
    subset = eval_subset(data, 100 if args.n is None else args.n, seed)
    if model.meta.input_shape is not None and tuple(model.meta.input_shape) != subset.input_shape:
        raise IncompatibleModelsError(
            f"the model takes inputs of shape {list(model.meta.input_shape)} but {data.name} has {list(subset.input_shape)}"
        )
    if args.eps is None:
        info = dataset_info(data_name)
        if info is None:
            raise UsageError("--eps is required for this dataset")
        radii = [info.default_eps]
    x, y = subset.float_x(), subset.y
    if int(y.min()) < 0 or int(y.max()) >= (model.meta.num_classes or 10**9):
        raise DataError(f"labels span [{int(y.min())}, {int(y.max())}] but the model has {model.meta.num_classes} classes")

    t0 = time.perf_counter()
    results: list[dict] = []
    from robkd.bounds.records import milp_entry, smoothing_entry
    if args.method == "smoothing":
        from robkd.bounds.smoothing import certify_smoothing

        sres = certify_smoothing(model, x, y, sigma=args.sigma, n0=args.n0, n=args.mc_n, alpha=args.alpha,
                                 batch_size=args.batch_size, seed=seed)
        for eps in radii:
            results.append(smoothing_entry(sres, eps, sres.seconds))
        detail = sres.to_dict(radii)
    elif args.method == "milp":
        from robkd.bounds.milp import verify_milp

        detail = {}
        for eps in radii:
            t_eps = time.perf_counter()
            with progress_task(f"certify: milp eps={format_radius(eps)}", len(y)) as advance:
                outs = verify_milp(model, x, y, eps, time_limit=args.time_limit)
                advance(len(outs))
            results.append(milp_entry(outs, eps, norm, time.perf_counter() - t_eps))
    elif args.method == "budget":
        from robkd.bounds.budget import certify_budget

        detail = {"budget": budget.to_dict()}
        for eps in radii:
            with progress_task(f"certify: budget eps={format_radius(eps)}", len(y)) as advance:
                res = certify_budget(model, x, y, eps, budget, norm=norm, alpha_steps=args.alpha_steps,
                                     batch_size=args.batch_size)
                advance(len(y))
            results.append(res.to_dict())
    else:
        from robkd.bounds import certify

        detail = {}
        for eps in radii:
            with progress_task(f"certify: {args.method} eps={format_radius(eps)}", len(y)) as advance:
                res = certify(model, x, y, eps, norm=norm, method=args.method, backend=args.bounds_backend,
                              intermediate=args.intermediate, alpha_steps=args.alpha_steps, batch_size=args.batch_size)
                advance(len(y))
            results.append(res.to_dict())
            log.debug("eps %s: certified %.3f in %.1fs", format_radius(eps), res.certified_accuracy, res.seconds)
    lr_block = None
    if want_lr:
        from robkd.bounds import (
            default_radius_cap,
            default_radius_tol,
            linear_region_radius,
            linear_region_radius_summary,
        )

        lr_method = args.method if args.method in ("ibp", "crown", "alpha-crown") else "crown"
        hi = lr_max if lr_max is not None else default_radius_cap(norm, math.prod(subset.input_shape))
        tol = lr_tol if lr_tol is not None else default_radius_tol(hi)
        if not tol < hi:
            raise UsageError(f"--linear-region-tol ({tol}) must be below the upper end {hi}")
        t_lr = time.perf_counter()
        with progress_task(f"certify: linear-region radius ({lr_method})", len(y)) as advance:
            lr = linear_region_radius(model, x, norm=norm, hi=hi, tol=tol, method=lr_method, batch_size=args.batch_size)
            advance(len(y))
        lr_block = linear_region_radius_summary(lr, hi=hi, tol=tol, norm=norm, method=lr_method)
        lr_block["seconds"] = time.perf_counter() - t_lr
    import robkd
    from robkd.bounds.records import CONFIDENCE, SCHEMA
    from robkd.models.identity import model_sha256
    from robkd.report.schema.certify import check_certify

    payload = {
        "schema": SCHEMA,
        "robkd_version": robkd.__version__,
        "command": list(getattr(args, "_robkd_argv", None) or ["robkd"] + sys.argv[1:]),
        "model": str(args.model),
        "model_sha256": model_sha256(model),
        "method": args.method,
        "budget": budget.to_dict() if budget is not None else None,
        "backend": args.bounds_backend if args.method in ("ibp", "crown", "alpha-crown") else None,
        "intermediate": args.intermediate if args.method in ("crown", "alpha-crown") else None,
        "norm": norm.value,
        "data": data.name,
        "split": args.split or "test",
        "n": len(subset),
        "seed": seed,
        "sample_indices": subset.indices.tolist(),
        "labels": [int(v) for v in y.tolist()],
        "radii": [float(r) for r in radii],
        "confidence": CONFIDENCE,
        "results": results,
        "detail": detail,
        "linear_region_radius": lr_block,
        "seconds": time.perf_counter() - t0,
    }
    check_certify(payload)  # a payload breaking its own schema is a robkd bug (exit 4), never written
    atomic_write_json(out_dir / "certify.json", payload)
    if args.json:
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return 0
    from rich.console import Console

    table = certify_table(payload)
    Console().print(table)
    if lr_block is not None:
        Console().print(
            f"linear-region radius ({lr_block['norm']}, {lr_block['method']}): mean {lr_block['mean']:.4g}, "
            f"median {lr_block['median']:.4g}; {lr_block['capped']}/{lr_block['n']} at the cap {lr_block['hi']:.4g}"
        )
    Console().print(f"wrote {out_dir / 'certify.json'}")
    return 0


def _pct(f: dict | None) -> str:
    """``85.0% [62.1, 96.8]`` (95% Clopper-Pearson interval, as the audit prints); ``n/a`` when undefined."""
    if not f or f.get("value") is None:
        return "n/a"
    return f"{100 * f['value']:.1f}% [{100 * f['ci_low']:.1f}, {100 * f['ci_high']:.1f}]"


def certify_table(doc: dict):
    """The terminal table of a certify.json document (rich)."""
    from rich.markup import escape
    from rich.table import Table

    method = doc["method"]
    table = Table(title=escape(f"robkd certify ({method}, {doc['norm']}, n={doc['n']}; 95% intervals)"))
    for title in ("radius", "certified acc.", "clean acc.", "falsified", "unknown"):
        table.add_column(title, justify="left" if title == "radius" else "right", no_wrap=True)
    bound = method in ("ibp", "crown", "alpha-crown", "budget")
    if bound:
        table.add_column("linear region", justify="right")
        table.add_column("unstable ReLUs", justify="right")
    if method == "budget":
        table.add_column("decided by")
    for r in doc["results"]:
        cells = [r["eps_str"], _pct(r["certified_fraction"]), _pct(r["clean_fraction"]), str(r["falsified"]),
                 str(r["unknown"])]
        if bound:
            lin = r.get("linear_region_fraction")
            cells += ["n/a" if lin is None else f"{100 * lin:.1f}%",
                      "n/a" if r.get("mean_unstable_relus") is None else f"{r['mean_unstable_relus']:.1f}"]
        if method == "budget":
            cells.append(", ".join(f"{k} {v}" for k, v in r.get("decided_counts", {}).items()))
        table.add_row(*cells)
    return table
