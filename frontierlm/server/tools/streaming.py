"""Streamed chat choices with tools: OpenAI's `delta.content` and `delta.tool_calls` from outputs that grow."""
from __future__ import annotations

from frontierlm.server.tools.plan import ToolPlan, call_id
from frontierlm.server.tools.protocol import ResumeToolStream


class ToolStreamer:
    """One per choice. feed(text so far, final) -> the delta of this chunk ({} when nothing new is sure yet).
    A call is announced (index, id, type, name) once its name is complete; its arguments follow as they are
    written, each piece a continuation of the last, so a client that concatenates them gets the JSON text.
    A resumed stream's streamer starts from what the client has (`resumed`) and is fed the whole output, the
    resumed tokens' text included, so it sends only what follows, in the same parse state."""

    def __init__(self, plan: ToolPlan, resumed: ResumeToolStream | None = None):
        self.plan = plan
        self.content_sent = 0
        self.calls_sent: list[list] = []  # [id, arguments length sent] per call index
        if resumed is not None:  # a stream moved here: the client has this much (fed the whole output, too)
            self.content_sent = resumed.content_chars
            self.calls_sent = [[c.id, c.arguments_chars] for c in resumed.calls]
        self.num_calls = len(self.calls_sent)

    def feed(self, text: str, final: bool) -> dict:
        content, calls = self.plan.split(text, final)
        delta: dict = {}
        if len(content) > self.content_sent:
            delta["content"] = content[self.content_sent:]
            self.content_sent = len(content)
        items = []
        for index, call in enumerate(calls):
            if index == len(self.calls_sent):
                self.calls_sent.append([call_id(), 0])
                item = {"index": index, "id": self.calls_sent[index][0], "type": "function",
                        "function": {"name": call.name, "arguments": ""}}
            else:
                item = {"index": index, "function": {"arguments": ""}}
            sent = self.calls_sent[index][1]
            if len(call.arguments) > sent or "id" in item:
                item["function"]["arguments"] = call.arguments[sent:]
                self.calls_sent[index][1] = len(call.arguments)
                items.append(item)
        if items:
            delta["tool_calls"] = items
        self.num_calls = len(self.calls_sent)
        return delta


def prepare_resume(plan: ToolPlan | None, resumed: ResumeToolStream | None, params) -> None:
    """A resumed stream with tools: its streamer reads the whole output, the resumed tokens' text included, so
    none of that text counts as streamed to the detokenizer (the streamer knows what the client has). Without a
    tool plan (tool_choice "none") the stream is plain text and resume_text_chars stands."""
    if resumed is None:
        return
    if (params.extra_args or {}).get("resume_token_ids") is None:
        raise ValueError("resume_tool_stream goes with resume_token_ids")
    if plan is not None:
        params.extra_args["resume_text_chars"] = 0
