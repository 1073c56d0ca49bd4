"""Start-up cost of the command line: ``robkd --help`` wall time in a fresh interpreter.

Measured as the median of several fresh ``python -m robkd --help`` subprocesses
(the console script does the same import), against a bare ``python -c pass``
of the same interpreter, whose start-up is the floor. The target is absolute
(0.5 s, from the issue): it is the one figure here that is not a ratio, so the
machine load during the run matters; the note gives both medians.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.common import Config, Row, judge, median

FAMILY = "cli"


def _time(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr[-400:]}")
    return dt


def run(cfg: Config) -> list[Row]:
    reps = 5 if cfg.quick else 9
    help_t, bare_t = [], []
    for _ in range(reps):
        help_t.append(_time([sys.executable, "-m", "robkd", "--help"]))
        bare_t.append(_time([sys.executable, "-c", "pass"]))
    torch_loaded = subprocess.run([sys.executable, "-c", "import sys, robkd.cli.main as m; "
                                   "m.build_parser() if hasattr(m, 'build_parser') else None; "
                                   "print('torch' in sys.modules)"], capture_output=True, text=True).stdout.strip()
    h, b = median(help_t), median(bare_t)
    return [
        Row(FAMILY, "python -m robkd --help (fresh process)", "wall time in seconds (absolute)", h, "<= 0.5",
            judge(h, "<= 0.5"), check=f"torch imported by the CLI parser: {torch_loaded}",
            check_ok=(torch_loaded == "False") if torch_loaded in ("True", "False") else None,
            note=f"median of {reps}; bare interpreter start-up {b:.3f} s",
            timings={"robkd_help": help_t, "python_bare": bare_t}, unit="s"),
        Row(FAMILY, "python -m robkd --help (fresh process)", "robkd --help / bare interpreter start", h / b,
            timings={"robkd_help": help_t, "python_bare": bare_t}),
    ]
