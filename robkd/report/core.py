"""Render a results dict (``AuditResult.to_dict()`` or a loaded results.json) into report.md (+ SVG files)
and a self-contained report.html.

Only the dict is needed: no model, no torch. The values are read through the typed view of the results
schema (:class:`~robkd.report.schema.Results`); the sections come from :mod:`robkd.report.summary` (always
present) and :mod:`robkd.report.sections` (optional: certification, LLM / Proposition 2, linear regions,
training log, before/after), rendered when present and skipped when absent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable

from robkd.errors import OutputError, UsageError
from robkd.report import doc as D
from robkd.report import diagnostics, repair_auto, robustness_extra, sections, summary
from robkd.report.escape import esc_text
from robkd.report.format import model_names
from robkd.report.schema import RESULTS_FILE, SAMPLES_FILE, Results, check_schema
from robkd.utils.io import atomic_write_bytes, atomic_write_text, json_text, read_json
from robkd.utils.outdir import check_out_dir

log = logging.getLogger(__name__)

FORMATS = ("md", "html")
TRAINING_LOG_FILE = "training_log.json"


def build_blocks(result: dict[str, Any], samples: str | Path | None = None) -> tuple[str, list[D.Block]]:
    """(title, blocks) of the report for a results dict (:class:`ResultsError` unless it passes :func:`check_schema`);
    ``samples``: its ``samples.safetensors`` (for the gallery of lost samples; None or absent: the section says so)."""
    res = Results(check_schema(result))
    names = model_names(res)
    title, subtitle = summary.title_and_subtitle(res, names)
    blocks: list[D.Block] = [D.Heading(1, title, "top"), D.Para(subtitle, "muted"), summary.verdict(res)]
    if res.is_repair:  # the decision-maker's question first: did the repair work?
        blocks += sections.before_after_section(res, names)
    blocks += summary.robust_section(res, names)
    blocks += robustness_extra.robustness_extra_sections(res, names)  # transfer attack, self-test, corruptions
    blocks += diagnostics.per_class_section(res, names)
    blocks += diagnostics.gallery_section(res, names, samples)
    blocks += sections.certification_section(res, names)
    blocks += sections.llm_section(res, names)
    blocks += sections.linear_region_section(res, names)
    blocks += repair_auto.auto_section(res)
    blocks += sections.training_section(res, names)
    if not res.is_repair:
        blocks += sections.before_after_section(res, names)
    blocks += summary.sanity_section(res)
    blocks += summary.provenance_section(res)
    blocks += summary.command_section(res)
    return title, blocks


def render(result_dict: dict[str, Any], out_dir: str | Path, formats: Iterable[str] = ("md", "html"), *,
           samples: str | Path | None = None) -> list[Path]:
    """Write report.md (+ its SVG figures and PNG images), report.html and results.json into ``out_dir``.

    ``samples`` is the result's ``samples.safetensors`` (default: the one in ``out_dir``), read for the
    gallery of the samples the student lost.

    A ``training_log.json`` already in ``out_dir`` (written by ``robkd repair``) is shown
    as the training section when the dict has no ``training`` key. Returns the written paths. ``result_dict`` is ``AuditResult.to_dict()`` (or a
    loaded results.json); raises :class:`ResultsError` on an unknown schema version, :class:`OutputError`
    when ``out_dir`` cannot be written (checked before rendering; a write that fails midway removes the
    files and folders this call created, and every file is written atomically).
    """
    fmts = [str(f).strip().lower() for f in formats]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise UsageError(f"unknown report format(s) {bad or fmts}: use {', '.join(FORMATS)}")
    check_schema(result_dict)
    out = check_out_dir(out_dir)
    title, blocks = build_blocks(with_training_log(result_dict, out), out / SAMPLES_FILE if samples is None else samples)
    files: dict[str, str | bytes] = {}  # everything is rendered before the first byte is written
    if not _same_json(out / RESULTS_FILE, result_dict):
        files[RESULTS_FILE] = json_text(result_dict)
    names = [RESULTS_FILE]
    if "md" in fmts:
        fig_paths: dict[str, str] = {}
        for b in blocks:
            if isinstance(b, D.Figure):
                name = f"report-{b.stem}.svg"
                files[name] = b.svg + "\n"
                fig_paths[b.stem] = name
                names.append(name)
        for img in D.images(blocks):
            name = f"report-{img.stem}.png"
            files[name] = img.png
            fig_paths[img.stem] = name
            names.append(name)
        files["report.md"] = D.to_markdown(blocks, fig_paths)
        names.append("report.md")
    if "html" in fmts:
        files["report.html"] = D.to_html(blocks, title=title)
        names.append("report.html")
    _write_files(out, files)
    if "md" in fmts:
        _remove_stale_images(out, set(files))
    written = [out / n for n in names]
    log.debug("report files: %s", ", ".join(esc_text(p, keep="") for p in written))
    return written


def _write_files(out: Path, files: dict[str, str | bytes]) -> None:
    """Write ``files`` (name -> text or bytes) into ``out`` atomically, one by one. On a failure (disk full, file-size
    limit, a directory in the way) remove what this call created and raise :class:`OutputError`."""
    made_dirs = [d for d in [out, *out.parents] if not os.path.lexists(d)][::-1]
    created: list[Path] = []
    target = out
    try:
        for target in made_dirs:
            target.mkdir()
            created.append(target)
        for name, text in files.items():
            target = out / name
            existed = os.path.lexists(target)
            if isinstance(text, bytes):
                atomic_write_bytes(target, text)
            else:
                atomic_write_text(target, text)
            if not existed:
                created.append(target)
    except BaseException as exc:
        for p in reversed(created):
            with contextlib.suppress(OSError):
                if p.is_dir():
                    p.rmdir()
                else:
                    p.unlink()
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {esc_text(target, keep='')}: {exc.strerror or exc}") from exc
        raise


def _remove_stale_images(out: Path, keep: set[str]) -> None:
    """Remove gallery thumbnails (``report-lost-<k>.png``) an earlier render left that this one did not write."""
    for p in out.glob("report-lost-*.png"):
        if p.name not in keep and re.fullmatch(r"report-lost-\d+\.png", p.name):
            with contextlib.suppress(OSError):
                p.unlink()


def with_training_log(result: dict[str, Any], directory: str | Path) -> dict[str, Any]:
    """``result`` plus ``training`` read from ``directory/training_log.json`` when it has none.

    ``robkd repair`` writes the trainer's epoch log (``TrainLog.to_dict()``) beside the
    audit's results.json; the report shows it as the training section.
    """
    if result.get("training"):
        return result
    path = Path(directory) / TRAINING_LOG_FILE
    if not path.is_file():
        return result
    try:
        log_dict = read_json(path, what="training log")
    except ValueError as exc:
        log.warning("ignoring the training log: %s", esc_text(exc, keep=""))
        return result
    if not isinstance(log_dict, (dict, list)):
        return result
    return {**result, "training": log_dict}


def _same_json(path: Path, obj: Any) -> bool:
    if not path.is_file():
        return False
    try:
        return read_json(path) == json.loads(json.dumps(obj))
    except ValueError:
        return False
