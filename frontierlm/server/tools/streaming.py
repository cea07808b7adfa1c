"""Streamed chat choices with tools: OpenAI's `delta.content` and `delta.tool_calls` from outputs that grow."""
from __future__ import annotations

from frontierlm.server.tools.plan import ToolPlan, call_id


class ToolStreamer:
    """One per choice. feed(text so far, final) -> the delta of this chunk ({} when nothing new is sure yet).
    A call is announced (index, id, type, name) once its name is complete; its arguments follow as they are
    written, each piece a continuation of the last, so a client that concatenates them gets the JSON text."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.content_sent = 0
        self.calls_sent: list[list] = []  # [id, arguments length sent] per call index
        self.num_calls = 0

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
