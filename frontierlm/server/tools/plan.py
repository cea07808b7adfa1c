"""What a chat request's tools ask of the engine: the mode, the parser, and the grammar that makes every call
parse and validate against its function's schema."""
from __future__ import annotations

import functools
import json
import uuid
from dataclasses import dataclass

from frontierlm.sampling_params import StructuredOutputsParams
from frontierlm.server.tools.jsonscan import held_suffix
from frontierlm.server.tools.parsers import PartialCall, ToolParser, detect_parser, get_parser
from frontierlm.server.tools.protocol import NamedToolChoice, Tool

AUTO_NEEDS_FLAG = '"auto" tool choice requires the server to run with --enable-auto-tool-choice'


@dataclass
class ToolPlan:
    tools: list[Tool]
    mode: str            # none | auto | required | named
    parser: ToolParser
    parallel: bool
    named: str | None = None  # the function a named tool_choice forces

    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.mode == "none":
            return None
        names = [t.function.name for t in self.tools]
        tools = self.tools if self.mode != "named" else [self.tools[names.index(self.named)]]
        # jump_forward: the call's fixed text (markers, the name, the keys) is appended, not sampled
        return StructuredOutputsParams(structural_tag=_structural_tag(
            self.parser.names[0], self.mode, self.parallel,
            json.dumps([t.model_dump(exclude_none=True) for t in tools])), jump_forward=True)

    # ---- reading the output ------------------------------------------------------------------------------
    def split(self, text: str, final: bool) -> tuple[str, list[PartialCall]]:
        """(content, calls) of an output so far. Content is the text outside call markup, stripped (a tail
        that could still become a call's marker, or trailing whitespace, waits while `final` is false); calls
        are those whose name is known (complete ones only when `final`). A call left open at the end is
        content, not a call: only complete calls are reported."""
        if self.mode == "none":
            return (text if final else text.rstrip()).lstrip(), []
        pieces, calls, pos = [], [], 0
        sep = self.parser.separator.strip()
        regions = self.parser.regions(text)
        for r in regions:
            pieces.append(text[pos:r.start])
            complete = r.end is not None and r.ok and r.calls and all(c.done for c in r.calls)
            if complete or (r.ok and not final):
                calls += [c for c in r.calls if c.name is not None]
            else:  # not a call after all, or cut off by max_tokens
                pieces.append(text[r.start:r.end])
            pos = r.end if r.end is not None else len(text)
        tail = text[pos:]
        if not final:
            tail = tail[:len(tail) - held_suffix(tail, self.parser.trigger)]
        pieces.append(tail)
        if self.mode != "auto":  # the grammar allows calls only: what is left is a call cut short
            return "", calls
        content = "".join(p for p in pieces if not (sep and p.strip() == sep)).lstrip()
        return content.rstrip(), calls

    def finish_reason(self, calls: list, finish: str | None) -> str | None:
        # OpenAI: "tool_calls" when the model chose to call; a forced (named) call finishes with "stop"
        if calls and finish == "stop" and self.mode in ("auto", "required"):
            return "tool_calls"
        return finish


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call_json(call: PartialCall, cid: str) -> dict:
    return {"id": cid, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


@functools.lru_cache(maxsize=64)
def _structural_tag(parser_name: str, mode: str, parallel: bool, tools_json: str) -> str:
    """The call format as xgrammar's structural tag (JSON, what StructuredOutputsParams.structural_tag takes),
    checked once and cached per tool set."""
    import xgrammar as xgr

    tools = [Tool.model_validate(t) for t in json.loads(tools_json)]
    tag = get_parser(parser_name).structural_tag(tools, mode, parallel)
    try:
        xgr.Grammar.from_structural_tag(tag)
        return tag.model_dump_json()
    except Exception as e:  # xgrammar's schema errors: RuntimeError / InvalidStructuralTagError
        raise ValueError(f"tools: a function's parameters schema could not be compiled: {e}") from None


def plan_tools(tools: list[Tool] | None, tool_choice, parallel: bool | None, *, parser_name: str | None,
               enable_auto: bool, chat_template: str | None) -> ToolPlan | None:
    """None when the request has no tools. Raises ValueError (a 400) for an unusable combination."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ValueError("tool_choice needs tools: the request lists none")
        return None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError(f"tools: function names must be unique, got {names}")
    choice = "auto" if tool_choice is None else tool_choice
    parser = get_parser(parser_name or detect_parser(chat_template))
    plan = ToolPlan(list(tools), "named" if isinstance(choice, NamedToolChoice) else choice, parser,
                    True if parallel is None else parallel)
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise ValueError(f"tool_choice: function {choice.function.name!r} is not among the tools "
                             f"({', '.join(names)})")
        plan.named = choice.function.name
    elif choice == "auto" and not enable_auto:
        raise ValueError(AUTO_NEEDS_FLAG)
    plan.structured_outputs()  # compile errors surface now, as a 400
    return plan
