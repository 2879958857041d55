"""Untrusted text made safe to print on a terminal or in a log line.

Text that others wrote (a rule's id, author and comment, a record key, a reason quoting them) can carry
control characters: ESC starts a terminal escape sequence (recolour, move the cursor, retitle the window),
CR and LF forge a second log line, and Unicode's bidirectional controls (U+202E and friends) show text in
another order than it is stored. `printable` writes every character Python does not call printable
(`str.isprintable`: the C0 and C1 controls, format characters such as the bidi controls and zero-width
joiners, line and paragraph separators, unassigned and private-use code points) as a visible escape, the
way `repr` does. Letters of every script, and backslashes (often already repr's escapes), stay as they are.
"""

from __future__ import annotations


def printable(text: str, *, json: bool = False) -> str:
    """`text` with every non-printable character escaped: \\x1b, \\n, \\u202e. `json`: `text` is a JSON
    document (json.dumps with ensure_ascii=False), and stays one with the same value: \\u escapes only
    (JSON itself escapes the C0 controls, but not the C1 ones, the bidi controls or U+2028)."""
    if text.isprintable():
        return text  # the common case: nothing to do
    return "".join(_json_escape(c) if json else _escape(c) for c in text)


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    if c in _SHORT:
        return _SHORT[c]
    if c.isprintable():
        return c
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _json_escape(c: str) -> str:
    if c.isprintable() or c in " \n":  # outside strings, JSON has spaces and newlines only (indent)
        return c
    code = ord(c)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # a UTF-16 surrogate pair, as JSON writes a code point beyond the first plane
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
