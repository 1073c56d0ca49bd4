"""A tiny document model rendered to both Markdown and self-contained HTML.

The report is built once as a list of blocks (headings, paragraphs, tables,
figures, code, the verdict box); :func:`to_markdown` and :func:`to_html` turn
that list into text. Every text fragment is escaped by the backend, so section
builders never escape by hand (and cannot forget to).
"""

from __future__ import annotations

import base64
import dataclasses
import re
from typing import Any, Sequence, Union

from robkd.report.escape import esc_html, esc_md, md_code_block, md_code_span

# inline text: a plain string, or a list of (style, text) runs with style in {"", "b", "i", "code"}
Inline = Union[str, Sequence[tuple[str, str]]]


def _runs(text: Inline) -> list[tuple[str, str]]:
    if isinstance(text, str):
        return [("", text)]
    return [(str(s), str(t)) for s, t in text]


def inline_md(text: Inline) -> str:
    """Markdown for inline runs (escaped)."""
    out = []
    for style, t in _runs(text):
        if style == "code":
            out.append(md_code_span(t))
        elif style in ("b", "i") and t.strip():
            mark = "**" if style == "b" else "*"
            core = t.strip()
            lead, trail = t[: len(t) - len(t.lstrip())], t[len(t.rstrip()):]
            out.append(f"{esc_md(lead)}{mark}{esc_md(core)}{mark}{esc_md(trail)}")
        else:
            out.append(esc_md(t))
    return "".join(out)


def inline_html(text: Inline) -> str:
    """HTML for inline runs (escaped)."""
    tags = {"b": "strong", "i": "em", "code": "code"}
    out = []
    for style, t in _runs(text):
        tag = tags.get(style)
        out.append(f"<{tag}>{esc_html(t)}</{tag}>" if tag else esc_html(t))
    return "".join(out)


@dataclasses.dataclass
class Heading:
    level: int
    text: str
    anchor: str = ""


@dataclasses.dataclass
class Para:
    text: Inline
    kind: str = ""  # "" | "note" | "warn" | "muted"


@dataclasses.dataclass
class Bullets:
    items: list[Inline]


@dataclasses.dataclass
class Table:
    """A table from a pandas DataFrame (cells are converted with ``str``; None/NaN -> '–')."""

    df: Any
    caption: str = ""
    index: bool = False
    align: str = "right"  # "right": numbers right-aligned (first column left); "left": all left


@dataclasses.dataclass
class Figure:
    """An SVG figure: written to ``<stem>.svg`` beside report.md, inlined in report.html."""

    stem: str
    svg: str
    caption: str = ""


@dataclasses.dataclass
class Code:
    text: str
    lang: str = ""


@dataclasses.dataclass
class Verdict:
    """The decision box at the top: status in {"pass", "fail", "none"}."""

    status: str
    headline: str
    lines: list[Inline]
    tiles: list[tuple[str, str, str]]  # (label, value, sub-text)
    warnings: list[Inline]


@dataclasses.dataclass
class Image:
    """A PNG image: written to ``<stem>.png`` beside report.md, a data URI in report.html."""

    stem: str
    png: bytes
    alt: str = ""


@dataclasses.dataclass
class ImageTable:
    """A table whose cells are text or :class:`Image` (a gallery with its labels)."""

    header: list[str]
    rows: list[list[Union[str, Image]]]
    caption: str = ""


Block = Union[Heading, Para, Bullets, Table, Figure, Code, Verdict, ImageTable]


def images(blocks: Sequence[Block]) -> list[Image]:
    """Every :class:`Image` of the blocks, in order."""
    return [c for b in blocks if isinstance(b, ImageTable) for row in b.rows for c in row if isinstance(c, Image)]


def slug(text: str) -> str:
    """A lowercase ASCII anchor/file stem."""
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return s or "section"


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and v != v:
        return "–"
    return str(v)


def _table_rows(t: Table) -> tuple[list[str], list[list[str]]]:
    df = t.df
    if t.index:
        df = df.reset_index()
    header = [_cell(c) for c in df.columns]
    rows = [[_cell(v) for v in row] for row in df.itertuples(index=False, name=None)]
    return header, rows


# ----------------------------------------------------------------------------- markdown
def to_markdown(blocks: Sequence[Block], figure_paths: dict[str, str]) -> str:
    """Markdown text; figures are linked as ``![caption](figure_paths[stem])``."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + esc_md(b.text))
        elif isinstance(b, Para):
            prefix = {"warn": "> **Warning:** ", "note": "> "}.get(b.kind, "")
            out.append(prefix + inline_md(b.text))
        elif isinstance(b, Bullets):
            out.append("\n".join("- " + inline_md(i) for i in b.items))
        elif isinstance(b, Table):
            header, rows = _table_rows(b)
            lines = []
            if b.caption:
                lines.append("*" + esc_md(b.caption) + "*\n")
            lines.append("| " + " | ".join(esc_md(h) for h in header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            for r in rows:
                lines.append("| " + " | ".join(esc_md(c) for c in r) + " |")
            out.append("\n".join(lines))
        elif isinstance(b, Figure):
            path = figure_paths.get(b.stem, f"{b.stem}.svg")
            out.append(f"![{esc_md(b.stem.replace('-', ' '))}]({path})")
            if b.caption:
                out.append("*" + esc_md(b.caption) + "*")
        elif isinstance(b, Code):
            out.append(md_code_block(b.text, b.lang))
        elif isinstance(b, ImageTable):
            def md_cell(c: Union[str, Image]) -> str:
                if isinstance(c, Image):
                    return f"![{esc_md(c.alt or c.stem)}]({figure_paths.get(c.stem, c.stem + '.png')})"
                return esc_md(c)

            lines = ["*" + esc_md(b.caption) + "*\n"] if b.caption else []
            lines.append("| " + " | ".join(esc_md(h) for h in b.header) + " |")
            lines.append("|" + "|".join("---" for _ in b.header) + "|")
            lines += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Verdict):
            word = {"pass": "PASS", "fail": "FAIL"}.get(b.status, "NO GATES")
            lines = [f"> ## Verdict: {word}", ">", "> **" + esc_md(b.headline) + "**"]
            if b.lines:
                lines.append(">")
                lines += ["> - " + inline_md(x) for x in b.lines]
            for w in b.warnings:
                lines += [">", "> **Warning:** " + inline_md(w)]
            out.append("\n".join(lines))
            if b.tiles:
                out.append("| " + " | ".join(esc_md(t[0]) for t in b.tiles) + " |\n|"
                           + "|".join("---" for _ in b.tiles) + "|\n| "
                           + " | ".join(esc_md(t[1] + (f" ({t[2]})" if t[2] else "")) for t in b.tiles) + " |")
        else:  # pragma: no cover - programming error
            raise TypeError(f"unknown block {type(b).__name__}")
    return "\n\n".join(out) + "\n"


# ----------------------------------------------------------------------------- HTML
CSS = """
*{box-sizing:border-box}
body{font-family:Helvetica,Arial,sans-serif;color:#1b1b1b;background:#f4f5f7;margin:0;line-height:1.45}
main{max-width:1080px;margin:0 auto;padding:24px 28px 60px;background:#fff;min-height:100vh}
h1{font-size:26px;margin:0 0 4px} h2{font-size:20px;margin:34px 0 10px;padding-bottom:4px;border-bottom:2px solid #e4e6ea}
h3{font-size:16px;margin:22px 0 8px}
.sub{color:#555;margin:0 0 18px}
.verdict{border-radius:10px;padding:18px 22px;margin:16px 0 8px;border:3px solid}
.verdict.pass{background:#e9f7ef;border-color:#1e8449} .verdict.fail{background:#fdecea;border-color:#c0392b}
.verdict.none{background:#eef2f7;border-color:#5d6d7e}
.verdict .word{font-size:34px;font-weight:800;letter-spacing:1px;margin:0}
.verdict.pass .word{color:#1e8449} .verdict.fail .word{color:#c0392b} .verdict.none .word{color:#34495e}
.verdict .headline{font-size:18px;font-weight:600;margin:4px 0 10px}
.verdict ul{margin:6px 0 0 0;padding-left:20px}
.tiles{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0 4px}
.tile{flex:1 1 150px;background:#fff;border:1px solid #d5d8dc;border-radius:8px;padding:8px 12px}
.tile .label{font-size:12px;color:#555;text-transform:uppercase;letter-spacing:.4px}
.tile .value{font-size:22px;font-weight:700} .tile .subt{font-size:12px;color:#666}
.warn{background:#fff8e1;border-left:5px solid #f39c12;padding:10px 14px;margin:12px 0;border-radius:4px}
.note{background:#f0f4f8;border-left:5px solid #7f8c8d;padding:8px 14px;margin:10px 0;border-radius:4px}
.muted{color:#666}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #d5d8dc;padding:4px 9px;text-align:right;vertical-align:top}
th{background:#f2f3f5} td:first-child,th:first-child{text-align:left}
table.left td,table.left th{text-align:left}
caption{caption-side:top;text-align:left;font-style:italic;color:#444;padding:2px 0 6px}
figure{margin:10px 0 18px} figcaption{font-size:13px;color:#444;margin-top:2px}
svg{max-width:100%;height:auto}
pre{background:#1f2330;color:#f0f0f0;padding:12px 14px;border-radius:6px;overflow-x:auto;white-space:pre-wrap;word-break:break-all}
code{font-family:Menlo,Consolas,monospace;font-size:13px}
.ok{color:#1e8449;font-weight:700} .bad{color:#c0392b;font-weight:700}
table.gallery td{text-align:left;vertical-align:middle} table.gallery img{display:block;image-rendering:pixelated;max-width:100%}
"""


def _svg_inline(svg: str) -> str:
    """Drop the fixed width/height so the inline SVG scales with the page."""
    return re.sub(r'^<svg ([^>]*?)width="\d+" height="\d+"', r"<svg \1", svg, count=1)


def to_html(blocks: Sequence[Block], *, title: str) -> str:
    """A self-contained HTML page (inline CSS and SVG, no scripts, no external assets)."""
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lvl = min(max(b.level, 1), 6)
            anchor = f' id="{esc_html(b.anchor or slug(b.text))}"'
            body.append(f"<h{lvl}{anchor}>{esc_html(b.text)}</h{lvl}>")
        elif isinstance(b, Para):
            cls = f' class="{b.kind}"' if b.kind in ("warn", "note", "muted") else ""
            prefix = "<strong>Warning:</strong> " if b.kind == "warn" else ""
            body.append(f"<p{cls}>{prefix}{inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            header, rows = _table_rows(b)
            cap = f"<caption>{esc_html(b.caption)}</caption>" if b.caption else ""
            import pandas as pd

            frame = pd.DataFrame([[esc_html(c) for c in r] for r in rows], columns=[esc_html(h) for h in header])
            html_table = frame.to_html(index=False, escape=False, border=0, na_rep="–")
            cls = ' class="left"' if b.align == "left" else ""
            html_table = re.sub(r"^<table[^>]*>", f"<table{cls}>" + cap, html_table, count=1)
            html_table = html_table.replace(' style="text-align: right;"', "")
            body.append(html_table)
        elif isinstance(b, Figure):
            cap = f"<figcaption>{esc_html(b.caption)}</figcaption>" if b.caption else ""
            body.append(f'<figure id="fig-{esc_html(b.stem)}">{_svg_inline(b.svg)}{cap}</figure>')
        elif isinstance(b, Code):
            body.append(f"<pre><code>{esc_html(b.text)}</code></pre>")
        elif isinstance(b, ImageTable):
            def html_cell(c: Union[str, Image]) -> str:
                if isinstance(c, Image):
                    data = base64.b64encode(c.png).decode("ascii")
                    return f'<img src="data:image/png;base64,{data}" alt="{esc_html(c.alt or c.stem)}">'
                return esc_html(c)

            cap = f"<caption>{esc_html(b.caption)}</caption>" if b.caption else ""
            head = "".join(f"<th>{esc_html(h)}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{html_cell(c)}</td>" for c in r) + "</tr>" for r in b.rows)
            body.append(f'<table class="gallery">{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>')
        elif isinstance(b, Verdict):
            status = b.status if b.status in ("pass", "fail", "none") else "none"
            word = {"pass": "PASS", "fail": "FAIL"}.get(status, "NO GATES")
            parts = [f'<section class="verdict {status}" id="verdict">', f'<p class="word">Verdict: {word}</p>',
                     f'<p class="headline">{esc_html(b.headline)}</p>']
            if b.lines:
                parts.append("<ul>" + "".join(f"<li>{inline_html(x)}</li>" for x in b.lines) + "</ul>")
            if b.tiles:
                parts.append('<div class="tiles">' + "".join(
                    f'<div class="tile"><div class="label">{esc_html(lab)}</div><div class="value">{esc_html(val)}</div>'
                    f'<div class="subt">{esc_html(sub)}</div></div>' for lab, val, sub in b.tiles) + "</div>")
            parts += [f'<div class="warn"><strong>Warning:</strong> {inline_html(w)}</div>' for w in b.warnings]
            parts.append("</section>")
            body.append("\n".join(parts))
        else:  # pragma: no cover
            raise TypeError(f"unknown block {type(b).__name__}")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\n"
        f"<title>{esc_html(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )
