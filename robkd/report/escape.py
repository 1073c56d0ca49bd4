"""Escaping of user-supplied strings for HTML (incl. SVG text) and Markdown.

Every string that comes from the user (model names, paths, labels, gate text,
class names, the command line) goes through one of these before it is placed
in a report.
"""

from __future__ import annotations

import html
import re
from typing import Any

# characters with an inline meaning in CommonMark/GFM (emphasis, code, links, tables, strikethrough)
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")
# constructs that only mean something at the start of a line: ATX headings, list items and
# quotes (``#``, ``-``, ``+``, ``1.``, ``1)`` followed by a space, ``>``), setext underlines
_MD_LINE_START = re.compile(r"^(\s*)(?:(\d{1,9})([.)])(?=\s|$)|([#>+\-=])(?=[\s#>=\-]|$)|(>))")


# characters XML 1.0 forbids (C0 controls other than tab/newline/CR, lone surrogates, U+FFFE/U+FFFF):
# one of them in a path would make an SVG file invalid XML (and the image unreadable)
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def esc_html(value: Any) -> str:
    """HTML-escape ``value`` (``&``, ``<``, ``>``, both quotes); valid inside SVG text too.

    Characters that XML forbids become U+FFFD, so standalone SVG files stay well-formed."""
    text = _XML_INVALID.sub("\ufffd", "" if value is None else str(value))
    return html.escape(text, quote=True)


def esc_md(value: Any) -> str:
    """Escape ``value`` for Markdown inline text or a table cell.

    Inline Markdown punctuation is backslash-escaped, and so is a line-start
    construct (heading, list, quote); ``&``/``<`` become entities (raw HTML in
    Markdown is live HTML in most viewers); newlines become spaces.
    """
    text = "" if value is None else str(value)
    text = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    text = _MD_SPECIAL.sub(r"\\\1", text)
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    return _MD_LINE_START.sub(_escape_line_start, text, count=1)


def _escape_line_start(m: "re.Match[str]") -> str:
    lead = m.group(1)
    if m.group(2):
        return f"{lead}{m.group(2)}\\{m.group(3)}"
    return f"{lead}\\{m.group(4) or m.group(5)}"


def md_code_block(text: str, lang: str = "") -> str:
    """A fenced code block holding ``text`` verbatim (the fence outgrows any backtick run inside)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


def md_code_span(text: str) -> str:
    """An inline code span holding ``text`` verbatim (newlines become spaces)."""
    text = str(text).replace("\n", " ")
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"
