"""Tool-call formats under vLLM's `--tool-call-parser` names: how each model family writes a call, how to read
calls back out of the generated text (also while it is still growing), and the grammar that makes the model
write them correctly (an xgrammar structural tag: free text until a call begins, the function's JSON schema
inside it).

    hermes (also qwen3, qwen2_5)  <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>
    llama3_json (also llama)      {"name": "f", "parameters": {...}}; {"name": ...}
    mistral                       [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]
    deepseek_v3                   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\\n```json\\n{...}\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
"""
from __future__ import annotations

import abc
import json
import re
from dataclasses import dataclass, field
from typing import ClassVar

from frontierlm.server.tools.jsonscan import escape_controls, skip_ws, value_end



@dataclass
class PartialCall:
    name: str | None      # None until the model has written the whole name
    arguments: str = ""   # the arguments' JSON text so far: always a prefix of the final text
    done: bool = False    # the call is closed and its arguments parse as JSON


@dataclass
class Region:
    """One stretch of tool-call markup in the output: [start, end) (end None while it is still open)."""
    start: int
    end: int | None
    calls: list[PartialCall] = field(default_factory=list)
    ok: bool = True       # False: not a well-formed call after all; its text is content


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


def json_call(text: str, i: int) -> tuple[int | None, PartialCall | None]:
    """A {"name": ..., "arguments" | "parameters": ...} object at text[i]: (its end or None while open, call)."""
    m = _HEAD.match(text, i)
    end = value_end(text, i)
    if m is None:
        if end is None:
            return None, PartialCall(None)
        try:  # keys in another order: read it whole
            obj = json.loads(text[i:end], strict=False)
            args = obj.get("arguments", obj.get("parameters", {}))
            return end, PartialCall(str(obj["name"]), json.dumps(args), isinstance(args, dict))
        except (ValueError, KeyError, TypeError, AttributeError):
            return end, None
    name = json.loads(f'"{m.group(1)}"')
    args_end = value_end(text, m.end())
    if args_end is None or end is None:
        return None, PartialCall(name, escape_controls(text[m.end():args_end]))
    args = escape_controls(text[m.end():args_end])
    try:
        ok = isinstance(json.loads(text[i:end], strict=False), dict) and isinstance(json.loads(args), dict)
    except ValueError:
        ok = False
    return end, PartialCall(name, args, True) if ok else None


def _expect(text: str, j: int, literal: str) -> int | None:
    """Index after `literal` at text[j]; None while the text is a prefix of it; -1 if it is not there."""
    if text.startswith(literal, j):
        return j + len(literal)
    return None if literal.startswith(text[j:]) else -1


def _schema(tool) -> dict:
    return tool.function.parameters if tool.function.parameters is not None else {"type": "object"}


class ToolParser(abc.ABC):
    """A model family's call format. Subclasses give the trigger (where a call region begins), how to read a
    region, and the tags of the grammar."""

    names: ClassVar[tuple[str, ...]]
    trigger: ClassVar[str]
    separator: ClassVar[str]  # between calls when several are written back to back

    # ---- reading the output -----------------------------------------------------------------------------
    @abc.abstractmethod
    def parse_region(self, text: str, start: int) -> Region:
        """The call region that starts at `start` (where the trigger was found)."""

    def regions(self, text: str) -> list[Region]:
        out, pos = [], 0
        while (i := text.find(self.trigger, pos)) >= 0:
            region = self.parse_region(text, i)
            out.append(region)
            if region.end is None:
                break
            pos = max(region.end, i + 1)
        return out

    # ---- the grammar ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def call_tag(self, tool):
        """TagFormat of one call of `tool` (begin, the arguments' schema, end)."""

    def block(self, tags, at_least_one: bool, parallel: bool):
        """One or more calls back to back: the content of a region."""
        from xgrammar.structural_tag import TagsWithSeparatorFormat

        return TagsWithSeparatorFormat(tags=tags, separator=self.separator, at_least_one=at_least_one,
                                       stop_after_first=not parallel)

    def structural_tag(self, tools: list, mode: str, parallel: bool):
        """mode: "auto" (text or calls, constrained once a call begins), "required" (only calls, at least one)
        or "named" (exactly one call of tools[0])."""
        from xgrammar import StructuralTag
        from xgrammar.structural_tag import TriggeredTagsFormat

        tags = [self.call_tag(t) for t in tools]
        if mode == "named":
            fmt = tags[0]
        elif mode == "required":
            fmt = self.block(tags, at_least_one=True, parallel=parallel)
        else:
            fmt = TriggeredTagsFormat(triggers=[self.trigger], tags=tags, stop_after_first=not parallel)
        return StructuralTag(format=fmt)

    def _json_tag(self, tool, begin: str, end: str):
        """Arguments as JSON in the separators `tojson` and json.dumps write (", " and ": ", no other
        whitespace): the style chat templates show the model, and a model cannot drift into spaces."""
        import xgrammar as xgr
        from xgrammar.structural_tag import GrammarFormat, TagFormat

        args = xgr.Grammar.from_json_schema(json.dumps(_schema(tool)), any_whitespace=False)
        return TagFormat(begin=begin, content=GrammarFormat(grammar=str(args)), end=end)


class HermesParser(ToolParser):
    names = ("hermes", "qwen3", "qwen2_5")
    trigger = "<tool_call>"
    close = "</tool_call>"
    separator = "\n"

    def call_tag(self, tool):
        return self._json_tag(tool, f'<tool_call>\n{{"name": "{tool.function.name}", "arguments": ',
                              "}\n</tool_call>")

    def parse_region(self, text, start):
        end, call = json_call(text, start + len(self.trigger))
        if end is None:
            return Region(start, None, [call] if call and call.name else [])
        if call is None:
            return Region(start, end, ok=False)
        j = _expect(text, skip_ws(text, end), self.close)
        if j is None:
            return Region(start, None, [PartialCall(call.name, call.arguments)])
        if j < 0:
            return Region(start, end, ok=False)
        return Region(start, j, [call])


class Llama3JsonParser(ToolParser):
    names = ("llama3_json", "llama")
    trigger = '{"name": '
    separator = "; "

    def call_tag(self, tool):
        return self._json_tag(tool, f'{{"name": "{tool.function.name}", "parameters": ', "}")

    def parse_region(self, text, start):
        end, call = json_call(text, start)
        if end is None:
            return Region(start, None, [call] if call and call.name else [])
        return Region(start, end, [call]) if call else Region(start, end, ok=False)


class MistralParser(ToolParser):
    names = ("mistral",)
    trigger = "[TOOL_CALLS]"
    separator = ", "

    def call_tag(self, tool):
        return self._json_tag(tool, f'{{"name": "{tool.function.name}", "arguments": ', "}")

    def structural_tag(self, tools, mode, parallel):
        from xgrammar import StructuralTag
        from xgrammar.structural_tag import TagFormat, TriggeredTagsFormat

        tags = [self.call_tag(t) for t in tools]
        region = TagFormat(begin=self.trigger + "[", content=self.block(tags[:1] if mode == "named" else tags,
                                                                         True, parallel and mode != "named"),
                           end="]")
        if mode != "auto":
            return StructuralTag(format=region)
        return StructuralTag(format=TriggeredTagsFormat(triggers=[self.trigger], tags=[region],
                                                        stop_after_first=True))

    def parse_region(self, text, start):
        j = _expect(text, skip_ws(text, start + len(self.trigger)), "[")
        if j is None:
            return Region(start, None)
        if j < 0:
            return Region(start, start + len(self.trigger), ok=False)
        calls = []
        while True:
            j = skip_ws(text, j)
            if j >= len(text):
                return Region(start, None, calls)
            if text[j] == "]":
                return Region(start, j + 1, calls, ok=bool(calls))
            if calls and text[j] == ",":
                j += 1
                continue
            end, call = json_call(text, j)
            if end is None:
                return Region(start, None, calls + ([call] if call and call.name else []))
            if call is None:
                return Region(start, end, ok=False)
            calls.append(call)
            j = end


class DeepSeekV3Parser(ToolParser):
    names = ("deepseek_v3",)
    trigger = "<｜tool▁calls▁begin｜>"
    close = "<｜tool▁calls▁end｜>"
    call_begin, sep, call_end = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
    separator = "\n"

    def call_tag(self, tool):
        return self._json_tag(tool, f"{self.call_begin}function{self.sep}{tool.function.name}\n```json\n",
                              f"\n```{self.call_end}")

    def structural_tag(self, tools, mode, parallel):
        from xgrammar import StructuralTag
        from xgrammar.structural_tag import TagFormat, TriggeredTagsFormat

        tags = [self.call_tag(t) for t in tools]
        region = TagFormat(begin=self.trigger, content=self.block(tags[:1] if mode == "named" else tags,
                                                                   True, parallel and mode != "named"),
                           end=self.close)
        if mode != "auto":
            return StructuralTag(format=region)
        return StructuralTag(format=TriggeredTagsFormat(triggers=[self.trigger], tags=[region],
                                                        stop_after_first=True))

    def parse_region(self, text, start):
        j, calls = start + len(self.trigger), []
        while True:
            j = skip_ws(text, j)
            k = _expect(text, j, self.close)
            if k is None:
                return Region(start, None, calls)  # the text so far could still become either marker
            if k is not None and k >= 0:
                return Region(start, k, calls, ok=bool(calls))
            for lit in (self.call_begin, "function", self.sep):
                j = _expect(text, j, lit)
                if j is None:
                    return Region(start, None, calls)
                if j < 0:
                    return Region(start, start + len(self.trigger), ok=False)
            nl = text.find("\n", j)
            if nl < 0:
                return Region(start, None, calls)
            name = text[j:nl]
            j = _expect(text, nl, "\n```json\n")
            if j is None or j < 0:
                return Region(start, None, calls) if j is None else Region(start, nl, ok=False)
            args_end = value_end(text, j)
            if args_end is None:
                return Region(start, None, calls + [PartialCall(name, escape_controls(text[j:]))])
            args = escape_controls(text[j:args_end])
            k = _expect(text, args_end, f"\n```{self.call_end}")
            if k is None:
                return Region(start, None, calls + [PartialCall(name, args)])
            try:
                valid = k > 0 and isinstance(json.loads(args), dict)
            except ValueError:
                valid = False
            if not valid:
                return Region(start, args_end, ok=False)
            calls.append(PartialCall(name, args, True))
            j = k


PARSERS: dict[str, type[ToolParser]] = {name: cls for cls in (HermesParser, Llama3JsonParser, MistralParser,
                                                              DeepSeekV3Parser) for name in cls.names}


def get_parser(name: str) -> ToolParser:
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(sorted(PARSERS))}")
    return PARSERS[name]()


def detect_parser(chat_template: str | None) -> str:
    """The format a chat template writes calls in (its markers), hermes when it shows none."""
    template = chat_template or ""
    for cls in (DeepSeekV3Parser, MistralParser, HermesParser):
        if cls.trigger in template:
            return cls.names[0]
    if "<|python_tag|>" in template or '"parameters": ' in template:
        return "llama3_json"
    return "hermes"
