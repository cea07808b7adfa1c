"""Where a JSON value ends in a text that may still be growing (the model is writing it token by token)."""
from __future__ import annotations

_WS = " \t\r\n"


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def value_end(text: str, i: int) -> int | None:
    """Index just past the JSON value that starts at text[i] (leading whitespace skipped), or None while it is
    unfinished. Only brackets and strings are tracked: a malformed value is caught later by json.loads."""
    i = skip_ws(text, i)
    if i >= len(text):
        return None
    if text[i] not in "{[\"":  # a number, true, false or null: ends at a delimiter
        j = i
        while j < len(text) and text[j] not in _WS + ",]}":
            j += 1
        return j if j < len(text) else None
    depth, in_str, escaped = 0, False, False
    for j in range(i, len(text)):
        ch = text[j]
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
                if depth == 0:
                    return j + 1
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


def held_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`: streamed text keeps it back
    until the next token says whether a tool call begins there."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def escape_controls(text: str) -> str:
    """Raw control characters inside JSON strings written as \\u00XX escapes. Some schema grammars (a string
    with maxLength) let them through, and strict JSON readers refuse them. Depends only on the text before
    each character, so the escaped prefix of a growing text stays a prefix."""
    out, in_str, escaped = [], False, False
    for ch in text:
        if in_str and not escaped and ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
            continue
        out.append(ch)
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
    return "".join(out)
