"""Named grammars shipped with the package (`grammar="builtin:json"`) and checking a text against a grammar."""
from __future__ import annotations

import re
from pathlib import Path

GRAMMAR_DIR = Path(__file__).parent / "grammars"
BUILTIN_PREFIX = "builtin:"
# The fixed registry: name -> file, listed once from the package. A name from a request is only ever a key
# into this dict, never part of a path, so no request can make the server read any other file (or learn
# whether one exists).
_REGISTRY: dict[str, Path] = {p.stem: p for p in sorted(GRAMMAR_DIR.glob("*.gbnf"))}


def builtin_names() -> list[str]:
    return sorted(_REGISTRY)


def resolve_grammar(spec: str) -> str:
    """GBNF text for `builtin:NAME` (NAME from the registry); any other string is already GBNF."""
    if not spec.startswith(BUILTIN_PREFIX):
        return spec
    name = spec[len(BUILTIN_PREFIX):]
    path = _REGISTRY.get(name)
    if path is None:
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise ValueError(f"unknown builtin grammar {shown!r}; builtin grammars: {', '.join(builtin_names())}")
    return path.read_text()


def compiler_message(e: Exception) -> str:
    """xgrammar's message without its '[time] file.cc:line:' prefix (it keeps 'line L, column C')."""
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(e)).strip()


def compile_for_check(grammar: str | None = None, json_schema: str | None = None, backend: str = "auto"):
    """A checker for texts (matched character by character), built through the normalisation and backend choice
    a request gets; a ValueError naming what does not compile."""
    from frontierlm.structured.backend import checker

    return checker(json_schema if json_schema is not None else grammar, json_schema is not None, backend)


def check_text(checker, text: str) -> tuple[bool, int | None]:
    """(accepted, None) or (False, position of the first character the grammar cannot take; len(text) when the
    text is a valid but unfinished prefix)."""
    return checker(text)
