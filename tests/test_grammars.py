"""Tests for the builtin GBNF grammar library (frontierlm/structured/grammars)."""

from pathlib import Path

import pytest
import frontierlm
from frontierlm.structured.grammars_lib import check_text, compile_for_check

pytest.importorskip("xgrammar")

GRAMMARS = Path(frontierlm.__file__).parent / "structured" / "grammars"


def accepts(grammar_text: str, s: str) -> bool:
    """True iff the whole string is a complete sentence of the grammar (the check `frontierlm grammar check` uses)."""
    return check_text(compile_for_check(grammar=grammar_text), s) == (True, None)


CASES = {
    "json": (
        ['{"a": 1, "b": [true, false, null]}', "{}", '{"s": "x\\n\\u00e9", "n": -1.5e3}', ' {"o": {"p": []}} '],
        ['{"a": 1,}', "{a: 1}", '{"a": 01}', '{"a": "x"'],
    ),
    "json_array": (
        ["[]", "[1, 2, 3]", '[{"a": "b"}, [null], "s", -0.5]', "[\n  true\n]"],
        ["{}", "[1, 2,]", "[1 2]", "1"],
    ),
    "arithmetic": (
        ["1+2", "3.5 * (2 - 1) / 4", "((7))", "-2 * -3"],
        ["1 +", "(1 + 2", "1 ++ 2", "a + 1"],
    ),
    "list": (
        ["- one", "- one\n- two\n- three", "- a\n", "- item with - dash"],
        ["one", "-no space", "- a\n\n- b", "* a"],
    ),
    "email": (
        ["alice@example.com", "first.last+tag@mail.example.co.uk", "x_y-z@a-b.org", "a1@b2.io"],
        ["alice@example", "@example.com", "a..b@example.com", "alice example.com"],
    ),
    "url": (
        [
            "http://example.com",
            "https://example.com:8080/path/to?x=1&y=2#frag",
            "https://localhost/",
            "http://192.168.0.1/a%20b",
        ],
        ["ftp://example.com", "https//example.com", "http://", "http://exa mple.com"],
    ),
    "datetime": (
        ["2024-02-29T13:45:00Z", "1999-12-31T23:59:59+05:30", "2024-01-01T00:00:00.123Z", "2024-06-15T08:30:15-07:00"],
        ["2024-13-01T00:00:00Z", "2024-02-32T00:00:00Z", "2024-02-29T24:00:00Z", "2024-02-29T13:60:00Z"],
    ),
    "sql_select": (
        [
            "SELECT * FROM users",
            "SELECT id, name FROM users WHERE age >= 18 AND name != 'bob' ORDER BY name DESC LIMIT 10;",
            "SELECT a FROM t WHERE x = 'it''s' OR y < 3.5",
            "SELECT a,b FROM t ORDER BY a;",
        ],
        ["SELECT FROM users", "SELECT * users", "SELECT * FROM users WHERE", "SELECT * FROM t LIMIT x"],
    ),
    "chess": (
        ["e4", "e4 e5 Nf3 Nc6 Bb5", "exd5 O-O O-O-O Qxf7#", "e8=Q+ Rae1 dxc8=N"],
        ["e9", "Nz3", "e4  e5", "O-O-O-O"],
    ),
}


def _text(name: str) -> str:
    return (GRAMMARS / f"{name}.gbnf").read_text()


def test_every_grammar_file_has_cases():
    files = {p.stem for p in GRAMMARS.glob("*.gbnf")}
    assert files == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_grammar_compiles(name):
    # by name, the way requests use them; a grammar that fails to compile raises ValueError here
    assert compile_for_check(grammar=f"builtin:{name}") is not None


@pytest.mark.parametrize(
    "name,s",
    [(n, s) for n, (good, _) in sorted(CASES.items()) for s in good],
)
def test_accepts(name, s):
    assert accepts(_text(name), s), f"{name} should accept {s!r}"


@pytest.mark.parametrize(
    "name,s",
    [(n, s) for n, (_, bad) in sorted(CASES.items()) for s in bad],
)
def test_rejects(name, s):
    assert not accepts(_text(name), s), f"{name} should reject {s!r}"
