"""Text that is safe to print: control characters shown as escapes, for terminals and logs."""

from __future__ import annotations

import re

# C0, DEL and C1 controls, the Unicode line and paragraph separators, and the
# bidirectional overrides and isolates (which reorder what a terminal shows).
CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
CONTROLS_AND_BACKSLASH = re.compile(CONTROLS.pattern[:-1] + "\\\\]")


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
