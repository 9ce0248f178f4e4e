"""Text that is safe to print: control characters shown as escapes, for terminals and logs."""

from __future__ import annotations

import re

# C0, DEL and C1 controls, the Unicode line and paragraph separators, and the
# bidirectional overrides and isolates (which reorder what a terminal shows).
# NOT_C0 is what JSON leaves unescaped.
NOT_C0 = "\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
CONTROLS = re.compile(f"[\x00-\x1f{NOT_C0}]")
CONTROLS_AND_BACKSLASH = re.compile(f"[\x00-\x1f{NOT_C0}\\\\]")
CONTROLS_NOT_C0 = re.compile(f"[{NOT_C0}]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str, *, backslash: bool = True) -> str:
    r"""``text`` on one line with nothing a terminal acts on: ``"a\nb"`` becomes ``a\x0ab``.

    A backslash is doubled too (unless ``backslash`` is false), so an escape in
    the output always stands for a control character in the value, never for
    text that looks like one.
    """
    pattern = CONTROLS_AND_BACKSLASH if backslash else CONTROLS
    return pattern.sub(_escape, text)
