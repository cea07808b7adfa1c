"""GBNF as llama.cpp reads it, translated to what each backend takes.

The parser follows llama.cpp's grammar parser (src/llama-grammar.cpp) and its guide (grammars/README.md): rules
`name ::= alternatives`, string literals, character classes (negated with `^`, ranges with `-`, escapes `\\xXX`
`\\uXXXX` `\\UXXXXXXXX` `\\t` `\\r` `\\n` `\\\\` `\\"` `\\[` `\\]`), `.` (any character, newline included), groups,
`*` `+` `?` `{m}` `{m,}` `{m,n}`, empty alternatives (`ws ::= | " "`), comments, newlines after `|` and inside
parentheses, a later definition of a rule replacing an earlier one, and token matches `<[id]>`, `<token>`,
`!<[id]>`, `!<token>`. The tree is written back out as xgrammar's EBNF (which lacks `.`, empty alternatives and
tokens) or as llguidance's Lark (which has all three).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

MAX_REPETITION = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD


@dataclass
class Lit:
    text: str


@dataclass
class CharClass:
    negated: bool
    ranges: list[tuple[int, int]]


@dataclass
class AnyChar:
    pass


@dataclass
class Ref:
    name: str


@dataclass
class Token:
    negated: bool
    token_id: int | None  # <[id]>
    text: str | None  # <token>: resolved against the tokenizer by the backend


@dataclass
class Group:
    alternatives: list[list["Item"]]


@dataclass
class Item:
    node: object
    min: int = 1
    max: int | None = 1  # None: unbounded


@dataclass
class Grammar:
    rules: dict[str, list[list[Item]]] = field(default_factory=dict)  # name -> alternatives, in definition order

    @property
    def uses_tokens(self) -> bool:
        return any(isinstance(n, Token) for n in _walk(self))


def _walk(grammar: Grammar):
    stack = [seq for alts in grammar.rules.values() for seq in alts]
    while stack:
        for item in stack.pop():
            yield item.node
            if isinstance(item.node, Group):
                stack.extend(item.node.alternatives)


_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SIMPLE_ESCAPES = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\", '"': '"', "[": "[", "]": "]"}


class _Parser:
    def __init__(self, text: str):
        self.s, self.pos = text, 0

    def error(self, msg: str, pos: int | None = None):
        pos = self.pos if pos is None else pos
        line = self.s.count("\n", 0, pos) + 1
        col = pos - (self.s.rfind("\n", 0, pos) + 1) + 1
        raise ValueError(f"line {line}, column {col}: {msg}")

    def peek(self, k: int = 0) -> str:
        i = self.pos + k
        return self.s[i] if i < len(self.s) else ""

    def space(self, newline_ok: bool) -> None:
        while self.pos < len(self.s):
            c = self.s[self.pos]
            if c == "#":
                while self.pos < len(self.s) and self.s[self.pos] not in "\r\n":
                    self.pos += 1
            elif c in " \t" or (newline_ok and c in "\r\n"):
                self.pos += 1
            else:
                break

    def name(self) -> str:
        m = _NAME.match(self.s, self.pos)
        if not m:
            self.error("expecting a rule name")
        self.pos = m.end()
        return m.group()

    def integer(self) -> int:
        m = re.compile(r"[0-9]+").match(self.s, self.pos)
        if not m:
            self.error("expecting an integer")
        self.pos = m.end()
        return int(m.group())

    def char(self) -> int:
        c = self.peek()
        if not c:
            self.error("unexpected end of input")
        if c != "\\":
            self.pos += 1
            return ord(c)
        e = self.peek(1)
        if e in _SIMPLE_ESCAPES:
            self.pos += 2
            return ord(_SIMPLE_ESCAPES[e])
        width = {"x": 2, "u": 4, "U": 8}.get(e)
        if width is None:
            self.error(f"unknown escape \\{e}")
        digits = self.s[self.pos + 2:self.pos + 2 + width]
        if len(digits) != width or not re.fullmatch(r"[0-9a-fA-F]+", digits):
            self.error(f"expecting {width} hex digits after \\{e}")
        value = int(digits, 16)
        if value > 0x10FFFF:
            self.error(f"code point {value:#x} is beyond Unicode")
        self.pos += 2 + width
        return value

    def token(self) -> Token:
        negated = self.peek() == "!"
        if negated:
            self.pos += 1
        if self.peek() != "<":
            self.error("expecting '<' after '!'")
        start = self.pos
        self.pos += 1
        if self.peek() == "[":
            self.pos += 1
            token_id = self.integer()
            if self.peek() != "]" or self.peek(1) != ">":
                self.error("expecting ']>' after a token id")
            self.pos += 2
            return Token(negated, token_id, None)
        end = self.s.find(">", self.pos)
        if end < 0:
            self.error("expecting '>' to close the token", start)
        self.pos = end + 1
        return Token(negated, None, self.s[start:end + 1])

    def sequence(self, nested: bool) -> list[Item]:
        seq: list[Item] = []
        while self.pos < len(self.s):
            c = self.peek()
            if c == '"':
                self.pos += 1
                chars = []
                while self.peek() != '"':
                    if not self.peek():
                        self.error("unexpected end of input in a string")
                    chars.append(chr(self.char()))
                self.pos += 1
                seq.append(Item(Lit("".join(chars))))
            elif c == "[":
                self.pos += 1
                negated = self.peek() == "^"
                if negated:
                    self.pos += 1
                ranges = []
                while self.peek() != "]":
                    if not self.peek():
                        self.error("unexpected end of input in a character class")
                    lo = self.char()
                    hi = lo
                    if self.peek() == "-" and self.peek(1) not in ("]", ""):
                        self.pos += 1
                        hi = self.char()
                    if hi < lo:
                        self.error(f"character range {chr(lo)!r}-{chr(hi)!r} is reversed")
                    ranges.append((lo, hi))
                self.pos += 1
                seq.append(Item(CharClass(negated, ranges)))
            elif c in "<!":
                seq.append(Item(self.token()))
            elif _NAME.match(c):
                seq.append(Item(Ref(self.name())))
            elif c == "(":
                self.pos += 1
                self.space(True)
                alts = self.alternatives(nested=True)
                if self.peek() != ")":
                    self.error("expecting ')'")
                self.pos += 1
                seq.append(Item(Group(alts)))
            elif c == ".":
                self.pos += 1
                seq.append(Item(AnyChar()))
            elif c in "*+?{":
                if not seq:
                    self.error(f"expecting an item before {c!r}")
                lo, hi = self.repetition(nested)
                last = seq[-1]
                if (last.min, last.max) != (1, 1):  # x** and friends: repeat the repeated item
                    last = Item(Group([[last]]))
                    seq[-1] = last
                last.min, last.max = lo, hi
                continue  # repetition() already skipped the space after it
            else:
                break
            self.space(nested)
        return seq

    def repetition(self, nested: bool) -> tuple[int, int | None]:
        c = self.peek()
        self.pos += 1
        if c != "{":
            self.space(nested)
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        self.space(nested)
        lo, hi = self.integer(), None
        self.space(nested)
        if self.peek() == "}":
            hi = lo
        elif self.peek() == ",":
            self.pos += 1
            self.space(nested)
            if self.peek().isdigit():
                hi = self.integer()
                self.space(nested)
            if self.peek() != "}":
                self.error("expecting '}'")
        else:
            self.error("expecting ',' or '}'")
        self.pos += 1
        self.space(nested)
        if lo > MAX_REPETITION or (hi is not None and hi > MAX_REPETITION):
            self.error(f"repetition count above {MAX_REPETITION}")
        if hi is not None and hi < lo:
            self.error(f"repetition {{{lo},{hi}}}: the maximum is below the minimum")
        return lo, hi

    def alternatives(self, nested: bool) -> list[list[Item]]:
        alts = [self.sequence(nested)]
        while self.peek() == "|":
            self.pos += 1
            self.space(True)
            alts.append(self.sequence(nested))
        return alts

    def grammar(self) -> Grammar:
        g = Grammar()
        self.space(True)
        while self.pos < len(self.s):
            name = self.name()
            self.space(False)
            if not self.s.startswith("::=", self.pos):
                self.error("expecting '::='")
            self.pos += 3
            self.space(True)
            g.rules.pop(name, None)  # a later definition replaces an earlier one, as in llama.cpp
            g.rules[name] = self.alternatives(nested=False)
            if self.peek() == "\r":
                self.pos += 2 if self.peek(1) == "\n" else 1
            elif self.peek() == "\n":
                self.pos += 1
            elif self.pos < len(self.s):
                self.error(f"expecting a newline or the end, got {self.peek()!r}")
            self.space(True)
        return g


def parse_gbnf(text: str) -> Grammar:
    """The grammar tree, or a ValueError with line, column and what was expected."""
    g = _Parser(text).grammar()
    if "root" not in g.rules:
        raise ValueError("the grammar has no 'root' rule")
    for node in _walk(g):
        if isinstance(node, Ref) and node.name not in g.rules:
            raise ValueError(f"rule {node.name!r} is used but never defined")
    return g


# ---- writers ----------------------------------------------------------------------------------------------
def _rule_names(g: Grammar, pattern: str, prefix: str, root: str) -> dict[str, str]:
    """Names every backend accepts (llama.cpp allows `1x` and `UPPER-CASE`; Lark wants lowercase)."""
    out, used = {}, set()
    for name in g.rules:
        new = root if name == "root" else (
            name if re.fullmatch(pattern, name) else prefix + re.sub(r"[^a-z0-9_]", "_", name.lower()))
        while new in used or (name != "root" and new == root):
            new += "_"
        used.add(new)
        out[name] = new
    return out


def _quant(lo: int, hi: int | None) -> str:
    if (lo, hi) == (1, 1):
        return ""
    return {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((lo, hi)) or (
        f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}" if lo != hi else f"{{{lo}}}")


def _class_char(cp: int) -> str:
    return chr(cp) if 0x20 < cp < 0x7F and chr(cp) not in "\\]-^[\"/" else (
        f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}")


def to_xgrammar(g: Grammar) -> str:
    """EBNF that xgrammar compiles: `.` becomes the class of every code point, an empty alternative `""`."""
    if g.uses_tokens:
        raise ValueError("token matches (<[id]>, <token>) need the guidance backend")
    names = _rule_names(g, r"[A-Za-z_][A-Za-z0-9_-]*", "r_", "root")

    def seq(items: list[Item]) -> str:
        return " ".join(item(i) for i in items) if items else '""'

    def item(i: Item) -> str:
        n = i.node
        if isinstance(n, Lit):
            body = json.dumps(n.text, ensure_ascii=False) if n.text else '""'
        elif isinstance(n, CharClass):
            inner = "".join(_class_char(a) if a == b else f"{_class_char(a)}-{_class_char(b)}" for a, b in n.ranges)
            if inner:
                body = f"[{'^' if n.negated else ''}{inner}]"
            else:  # [^] is any character, [] none (xgrammar has neither spelling)
                body = "[\\u0000-\\U0010ffff]" if n.negated else "[^\\u0000-\\U0010ffff]"
        elif isinstance(n, AnyChar):
            body = "[\\u0000-\\U0010ffff]"
        elif isinstance(n, Ref):
            body = names[n.name]
        else:
            body = "(" + " | ".join(seq(a) for a in n.alternatives) + ")"
        q = _quant(i.min, i.max)
        return f"({body}){q}" if q and not isinstance(n, (Group, CharClass, AnyChar, Ref)) else body + q

    return "\n".join(f"{names[name]} ::= " + " | ".join(seq(a) for a in alts) for name, alts in g.rules.items())


def _regex_class_char(cp: int) -> str:
    return chr(cp) if 0x20 < cp < 0x7F and chr(cp).isalnum() else f"\\u{{{cp:x}}}"


def to_lark(g: Grammar, token_id_of=None) -> str:
    """llguidance's Lark: rule `start`, classes and `.` as regex terminals, tokens as `<[id]>` / `<[^id]>`.
    `token_id_of(text)` resolves `<token>` to an id (ValueError unless it is exactly one token)."""
    names = _rule_names(g, r"[a-z_][a-z0-9_]*", "r_", "start")

    def seq(items: list[Item]) -> str:
        return " ".join(item(i) for i in items) if items else '""'

    def item(i: Item) -> str:
        n = i.node
        if isinstance(n, Lit):
            body = json.dumps(n.text, ensure_ascii=False)
        elif isinstance(n, CharClass):
            inner = "".join(_regex_class_char(a) if a == b else f"{_regex_class_char(a)}-{_regex_class_char(b)}"
                            for a, b in n.ranges)
            body = f"/[{'^' if n.negated else ''}{inner}]/" if inner else ("/(?s:.)/" if n.negated else "/[^\\s\\S]/")
        elif isinstance(n, AnyChar):
            body = "/(?s:.)/"
        elif isinstance(n, Ref):
            body = names[n.name]
        elif isinstance(n, Token):
            tid = n.token_id
            if tid is None:
                if token_id_of is None:
                    raise ValueError(f"token {n.text} needs a tokenizer")
                tid = token_id_of(n.text)
            body = f"<[{'^' if n.negated else ''}{tid}]>"
        else:
            body = "(" + " | ".join(seq(a) for a in n.alternatives) + ")"
        return body + _quant(i.min, i.max)

    return "\n".join(f"{names[name]}: " + " | ".join(seq(a) for a in alts) for name, alts in g.rules.items())
