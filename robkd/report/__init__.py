"""Reports: results.json -> report.md (+ SVG figures) and a self-contained report.html.

``render(result_dict, out_dir, formats=("md", "html"))`` is what ``robkd audit`` and
``robkd repair`` call; ``robkd report results.json`` re-renders from the file
alone (no model, no torch import). The results schema (reader, validator, typed
access, :class:`ResultsError`) is :mod:`robkd.report.schema`.
"""

from __future__ import annotations

from robkd.report.core import FORMATS, build_blocks, render, with_training_log
from robkd.report.schema import SUPPORTED_SCHEMA_VERSIONS, ResultsError, check_schema, load_results

__all__ = ["FORMATS", "SUPPORTED_SCHEMA_VERSIONS", "ResultsError", "build_blocks", "check_schema", "load_results", "render", "with_training_log"]
