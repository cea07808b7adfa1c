"""POST /v1/responses: OpenAI's Responses API, text in and text out, whole or streamed as its typed events
(response.created ... response.output_text.delta ... response.completed). Nothing is stored, so
`previous_response_id` is refused; tools are served on /v1/chat/completions."""
from __future__ import annotations

import json
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from frontierlm.engine.async_engine import RequestAborted
from frontierlm.server.errors import APIError
from frontierlm.server.protocol import ChatCompletionRequest, now, random_id
from frontierlm.server.serving import _abort_error, _admit, _collect, _deadline, _max_prompt_tokens, _merge


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Body):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(_Body):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[ContentPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ResponsesRequest(_Body):
    model: Optional[str] = None
    input: Union[str, list[InputMessage]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stream: bool = False
    previous_response_id: Optional[str] = None
    tools: Optional[list] = None
    text: Optional[dict] = None

    def messages(self) -> list[dict]:
        msgs = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        return msgs + [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in items]

    def check_supported(self) -> None:
        if self.previous_response_id is not None:
            raise APIError(400, "previous_response_id: this server stores no responses; send the whole input",
                           param="previous_response_id")
        if self.tools:
            raise APIError(400, "tools on /v1/responses are not supported yet; use /v1/chat/completions",
                           param="tools")
        fmt = (self.text or {}).get("format") or {}
        if fmt.get("type", "text") != "text":
            raise APIError(400, "text.format other than text is not supported yet on /v1/responses",
                           param="text")


def add_routes(app: FastAPI, ctx, ready_context, check_model) -> None:
    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, raw: Request):
        check_model(body.model)
        c = await ready_context()
        body.check_supported()
        tok, opts = c.tokenizer, c.options
        if tok is None or not (opts.chat_template or getattr(tok, "chat_template", None)):
            raise APIError(400, "this model has no chat template", param="input")
        chat = APIError.wrap(lambda: ChatCompletionRequest.model_validate({
            "messages": body.messages(), "temperature": body.temperature, "top_p": body.top_p,
            **({"max_tokens": body.max_output_tokens} if body.max_output_tokens is not None else {})}))
        params = APIError.wrap(lambda: chat.sampling_params(opts.sampling_defaults, opts.max_logprobs))
        # on a worker thread, special-token text kept as text, as for chat completions (tokenization.py)
        text, ids = await c.tokenizer_pool.render_chat(body.messages(), _max_prompt_tokens(c, params), True,
                                                       c.parse_special_tokens_in_content,
                                                       chat_template=opts.chat_template)
        encoded = {"prompt": text, "prompt_token_ids": ids}
        rid = random_id("resp")
        tracks = await _admit(c, [encoded], params, 0, rid)
        shape = _Shape(rid, random_id("msg"), now(), c.served_model_name, body, len(encoded["prompt_token_ids"]))
        if not body.stream:
            try:
                (out,) = await _collect(c, raw, tracks)
            except RequestAborted as e:
                raise _abort_error(c, e) from None
            o = out.outputs[0]
            return JSONResponse(shape.response(o.text, len(o.token_ids), o.finish_reason))
        return StreamingResponse(_events(c, tracks, shape), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


class _Shape:
    """The Response object and its items, in the fields the openai client reads."""

    def __init__(self, rid, msg_id, created, model, req: ResponsesRequest, prompt_tokens: int):
        self.rid, self.msg_id, self.created, self.model, self.req = rid, msg_id, created, model, req
        self.prompt_tokens = prompt_tokens

    def part(self, text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def item(self, text: str | None, status: str) -> dict:
        return {"type": "message", "id": self.msg_id, "role": "assistant", "status": status,
                "content": [] if text is None else [self.part(text)]}

    def response(self, text: str | None, output_tokens: int | None, finish: str | None) -> dict:
        status = "in_progress" if finish is None else ("incomplete" if finish == "length" else "completed")
        return {"id": self.rid, "object": "response", "created_at": self.created, "model": self.model,
                "status": status, "output": [] if text is None else [self.item(text, status)],
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                "temperature": self.req.temperature, "top_p": self.req.top_p,
                "max_output_tokens": self.req.max_output_tokens, "instructions": self.req.instructions,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "error": None, "metadata": {}, "text": {"format": {"type": "text"}},
                "usage": None if output_tokens is None else {
                    "input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": self.prompt_tokens + output_tokens}}


async def _events(ctx, tracks, shape: _Shape):
    seq = 0

    def event(kind: str, **fields) -> str:
        nonlocal seq
        seq += 1
        data = {"type": kind, "sequence_number": seq - 1, **fields}
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

    where = {"item_id": shape.msg_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=shape.response(None, None, None))
    yield event("response.in_progress", response=shape.response(None, None, None))
    yield event("response.output_item.added", output_index=0, item=shape.item(None, "in_progress"))
    yield event("response.content_part.added", part=shape.part(""), **where)
    sent, final = "", None
    try:
        async for _, out in _merge(ctx.engine, tracks, _deadline(ctx)):
            o = out.outputs[0]
            if len(o.text) > len(sent):
                yield event("response.output_text.delta", delta=o.text[len(sent):], logprobs=[], **where)
                sent = o.text
            if out.finished:
                final = o
    except RequestAborted as e:
        err = _abort_error(ctx, e)
        yield event("error", code=err.code, message=err.message, param=None)
        return
    done = shape.response(sent, len(final.token_ids), final.finish_reason)
    yield event("response.output_text.done", text=sent, logprobs=[], **where)
    yield event("response.content_part.done", part=shape.part(sent), **where)
    yield event("response.output_item.done", output_index=0, item=done["output"][0])
    yield event("response.incomplete" if done["status"] == "incomplete" else "response.completed", response=done)
