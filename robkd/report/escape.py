r"""Escaping of user-supplied strings: one function per output format.

Every string that comes from the user (model names, paths, labels, gate text,
class names, the command line, anything read from results.json) goes through one
of these before it is placed in a report: :func:`esc_md` / :func:`md_code_block` /
:func:`md_code_span` (Markdown), :func:`esc_html` (HTML), :func:`esc_svg` (SVG text),
:func:`esc_text` (plain text: terminal, log and error lines).

All of them first make invisible or terminal-active characters visible as text
(``\x1b``, ``\u202e``): C0/C1 controls and DEL (ESC, BEL, NUL, ...), format characters
(bidi overrides and isolates U+202A-U+202E / U+2066-U+2069, LRM/RLM, zero-width
characters, BOM, tag characters), line/paragraph separators and lone surrogates.
A reader then sees exactly the characters the string holds, in logical order.
"""

from __future__ import annotations

import html
import re
import unicodedata
from typing import Any

# candidates for :func:`_unsafe`: everything but printable ASCII
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")
# Unicode categories shown escaped: controls, format characters, surrogates, line/paragraph separators
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

# characters with an inline meaning in CommonMark/GFM (emphasis, code, links, tables, strikethrough)
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")
# constructs that only mean something at the start of a line: ATX headings, list items and
# quotes (``#``, ``-``, ``+``, ``1.``, ``1)`` followed by a space, ``>``), setext underlines
_MD_LINE_START = re.compile(r"^(\s*)(?:(\d{1,9})([.)])(?=\s|$)|([#>+\-=])(?=[\s#>=\-]|$)|(>))")


# characters XML 1.0 forbids (C0 controls other than tab/newline/CR, lone surrogates, U+FFFE/U+FFFF):
# one of them in a path would make an SVG file invalid XML (and the image unreadable)
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _visible(ch: str) -> str:
    r"""``\x1b``, ``\u202e`` or ``\U000e0041``: the character's code as text."""
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _unsafe(ch: str) -> bool:
    return unicodedata.category(ch) in _UNSAFE_CATEGORIES or ch in "\ufffe\uffff"


def esc_text(value: Any, keep: str = "\t\n") -> str:
    r"""``value`` as text with control, format (bidi, zero-width), separator and surrogate characters
    written out as ``\xNN`` / ``\uNNNN`` (the characters of ``keep`` stay as they are)."""
    text = "" if value is None else str(value)

    def sub(m: "re.Match[str]") -> str:
        ch = m.group()
        return ch if ch in keep or not _unsafe(ch) else _visible(ch)

    return _NOT_PRINTABLE_ASCII.sub(sub, text)


def esc_html(value: Any) -> str:
    """HTML-escape ``value`` (``&``, ``<``, ``>``, both quotes) after :func:`esc_text`."""
    return html.escape(esc_text(value), quote=True)


def esc_svg(value: Any) -> str:
    """Escape ``value`` for SVG text: characters that XML forbids become U+FFFD (so standalone SVG
    files stay well-formed), the rest as :func:`esc_html`."""
    return esc_html(_XML_INVALID.sub("\ufffd", "" if value is None else str(value)))


def esc_md(value: Any) -> str:
    """Escape ``value`` for Markdown inline text or a table cell.

    Inline Markdown punctuation is backslash-escaped, and so is a line-start
    construct (heading, list, quote); ``&``/``<`` become entities (raw HTML in
    Markdown is live HTML in most viewers); newlines become spaces.
    """
    text = "" if value is None else str(value)
    text = esc_text(text.replace("\r\n", " ").replace("\n", " ").replace("\r", " "))
    text = _MD_SPECIAL.sub(r"\\\1", text)
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    return _MD_LINE_START.sub(_escape_line_start, text, count=1)


def _escape_line_start(m: "re.Match[str]") -> str:
    lead = m.group(1)
    if m.group(2):
        return f"{lead}{m.group(2)}\\{m.group(3)}"
    return f"{lead}\\{m.group(4) or m.group(5)}"


def md_code_block(text: str, lang: str = "") -> str:
    """A fenced code block holding ``text`` verbatim (the fence outgrows any backtick run inside), but for
    the characters :func:`esc_text` makes visible."""
    text = esc_text(text)
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


def md_code_span(text: str) -> str:
    """An inline code span holding ``text`` verbatim (newlines become spaces; see :func:`esc_text`)."""
    text = esc_text(str(text).replace("\n", " "))
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"
