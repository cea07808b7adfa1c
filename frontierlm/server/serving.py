"""/v1/completions and /v1/chat/completions: admission, streaming (SSE) and response bodies.

Engine outputs are cumulative (text only grows); the SSE writer turns them into deltas per choice.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from frontierlm.engine.async_engine import AsyncEngine, RequestAborted
from frontierlm.logger import init_logger
from frontierlm.outputs import RequestOutput
from frontierlm.server.errors import APIError
from frontierlm.server.logprobs import chat_logprobs, completion_logprobs
from frontierlm.server.middleware import internal_error
from frontierlm.server.options import ServeOptions
from frontierlm.server.protocol import ChatCompletionRequest, CompletionRequest, now, random_id, usage
from frontierlm.server.tools import ToolStreamer, plan_tools, prepare_resume
from frontierlm.server.tools.plan import call_id, tool_call_json

logger = init_logger(__name__)


@dataclass
class ServerContext:
    engine: AsyncEngine
    served_model_name: str
    max_queue: int | None
    request_timeout: float | None
    tokenizer: object
    metrics: object
    shutting_down: bool = False
    tokenizer_pool: object = None  # tokenization.TokenizerPool, made with the tokenizer
    parse_special_tokens_in_content: bool = False
    admitting: int = 0  # sequences past the queue check whose adds the engine has not confirmed yet
    options: ServeOptions = field(default_factory=ServeOptions)


async def _merge(engine: AsyncEngine, tracks, deadline: float | None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yield (prompt index, latest output) across several requests until all finish; on timeout abort them."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i, track):
        try:
            async for out in engine.stream(track):
                merged.put_nowait((i, out))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # hand errors (aborts, engine death) to the consumer
            merged.put_nowait((i, e))

    tasks = [asyncio.ensure_future(pump(i, t)) for i, t in enumerate(tracks)]
    remaining = len(tracks)
    try:
        while remaining:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                i, item = await asyncio.wait_for(merged.get(), timeout)
            except asyncio.TimeoutError:
                for t in tracks:  # queued before the pumps' own disconnect aborts, so counted as timeouts
                    engine.abort(t.request_id, "timeout")
                raise RequestAborted("timeout") from None
            if isinstance(item, BaseException):
                raise item
            yield i, item
            remaining -= item.finished
    finally:
        for task in tasks:
            task.cancel()


async def _wait_disconnect(raw: HTTPRequest) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


# ---- admission --------------------------------------------------------------------------------------------
def _context_tokens(ctx: ServerContext) -> int:
    eng = ctx.engine.engine
    return min(eng.max_model_len, eng.kv.num_blocks * eng.kv.block_size)


def _max_prompt_tokens(ctx: ServerContext, params) -> int:
    return _context_tokens(ctx) - (params.max_tokens or 1)


def _check_fits(ctx: ServerContext, prompts: list, params) -> None:
    """The engine's add-time checks, repeated here so that a request that can never run gets its 400 even
    when the queue is full (the engine still checks again)."""
    eng = ctx.engine.engine
    vocab, limit = eng.model_config.vocab_size, eng.max_model_len
    capacity = eng.kv.num_blocks * eng.kv.block_size
    APIError.wrap(lambda: eng.check_token_ids(params))
    for p in prompts:
        ids = p["prompt_token_ids"]
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt token ids out of range [0, {vocab}): {bad[:5]}", param="prompt")
        total = len(ids) + (params.max_tokens or 1)
        if total > min(limit, capacity):
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                           f"the context ({min(limit, capacity)} tokens)", param="prompt",
                           code="context_length_exceeded")


RETRY_AFTER_S = 1  # what a 429 tells clients to wait (the queue drains at the engine's pace, not a fixed one)


def _check_queue(ctx: ServerContext, num_seqs: int, n: int) -> None:
    """--max-queue bounds the sequences (prompts x n) that would wait for a slot: those that start at once
    in a free slot (max_num_seqs) do not count, and a request too big to ever pass is a 400, not a 429."""
    if ctx.max_queue is None:
        return
    eng = ctx.engine
    slots = eng.engine.config.max_num_seqs
    if num_seqs > ctx.max_queue + slots:
        raise APIError(400, f"this request has {num_seqs} sequences (prompts x n = {n}); at most {slots} run at "
                       f"once and {ctx.max_queue} may wait (--max-queue), so it could never be admitted: split it",
                       param="n", code="too_many_sequences")
    waiting = eng.num_waiting + ctx.admitting + num_seqs - max(0, slots - eng.num_running)
    if waiting > ctx.max_queue:
        raise APIError(429, f"the request queue is full ({ctx.max_queue} sequences may wait, --max-queue); "
                       f"retry later", "rate_limit_error", code="queue_full", reason="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)})


async def _tokenize_bad_words(ctx: ServerContext, params) -> None:
    """bad_words become token ids here, on a tokenizer worker, so the engine thread never tokenizes."""
    if params.bad_words:
        if ctx.tokenizer is None:
            raise APIError(400, "bad_words needs a tokenizer; this model has none", param="bad_words")
        await ctx.tokenizer_pool.tokenize_bad_words(params)


async def _admit(ctx: ServerContext, prompts: list, params, priority: int, prefix: str,
                 constraint_field: str = "structured_outputs") -> list:
    _check_fits(ctx, prompts, params)
    await _tokenize_bad_words(ctx, params)  # before the queue check: no await between it and the reservation
    num_seqs = len(prompts) * params.n
    _check_queue(ctx, num_seqs, params.n)
    ctx.admitting += num_seqs  # no await since the check: concurrent requests see this reservation
    tracks = []
    try:
        for i, prompt in enumerate(prompts):
            rid = prefix if len(prompts) == 1 else f"{prefix}-{i}"
            tracks.append(await ctx.engine.add_request(rid, prompt, params, priority))
    except ValueError as e:
        for t in tracks:  # siblings of a rejected prompt: not failures of their own
            ctx.engine.abort(t.request_id, None)
        err = APIError.from_value_error(e)
        if err.param == "structured_outputs":  # the engine's name; the client may have sent grammar / json_schema
            err.param = constraint_field
        raise err from None
    finally:
        ctx.admitting -= num_seqs  # the adds are in the engine's waiting count by now
    if ctx.options.log_requests:
        so = params.structured_outputs
        constraint = next((k for k in so._KINDS if getattr(so, k) not in (None, False)), None) if so else None
        logger.info("request %s: prompt tokens %s, n=%d, max_tokens=%s, temperature=%g, constraint=%s", prefix,
                    [len(p["prompt_token_ids"]) for p in prompts], params.n, params.max_tokens, params.temperature,
                    constraint)
    return tracks


async def _encode(ctx: ServerContext, prompt, params) -> dict:
    if isinstance(prompt, str):
        if ctx.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send prompts as token ids", param="prompt")
        ids = await ctx.tokenizer_pool.encode(prompt, _max_prompt_tokens(ctx, params))
        return {"prompt": prompt, "prompt_token_ids": ids}
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    return {"prompt": None, "prompt_token_ids": list(prompt)}


def _deadline(ctx: ServerContext) -> float | None:
    return None if ctx.request_timeout is None else time.monotonic() + ctx.request_timeout


async def _collect(ctx: ServerContext, raw: HTTPRequest, tracks) -> list[RequestOutput]:
    """Wait for every request to finish; a client that hangs up aborts them."""
    finals: list[RequestOutput | None] = [None] * len(tracks)

    async def run():
        async for i, out in _merge(ctx.engine, tracks, _deadline(ctx)):
            finals[i] = out

    task, watcher = asyncio.ensure_future(run()), asyncio.ensure_future(_wait_disconnect(raw))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # disconnected: cancelling the merge aborts the requests
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise APIError(499, "client disconnected", reason=None)
    task.result()  # re-raise RequestAborted / engine errors
    return finals


def _abort_error(ctx: ServerContext, e: RequestAborted) -> APIError:
    if e.reason == "timeout":
        return APIError(504, f"request timed out after {ctx.request_timeout}s (--request-timeout)", "timeout_error",
                        code="timeout", reason=None)
    return APIError(503, f"request aborted: {e.reason}", "service_unavailable", code=e.reason, reason=None)


# ---- endpoints ----------------------------------------------------------------------------------------------
async def create_completion(ctx: ServerContext, req: CompletionRequest, raw: HTTPRequest):
    if req.echo or req.suffix is not None or (req.best_of is not None and req.best_of != req.n):
        raise APIError(400, "echo, suffix and best_of != n are not supported", param="echo")
    params = APIError.wrap(lambda: req.sampling_params(ctx.options.sampling_defaults, ctx.options.max_logprobs))
    prompts = req.prompts()
    if not prompts:
        raise APIError(400, "prompt is empty", param="prompt")
    encoded = list(await asyncio.gather(*(_encode(ctx, p, params) for p in prompts)))
    rid = random_id("cmpl")
    tracks = await _admit(ctx, encoded, params, req.priority, rid, req.constraint_field())
    base = {"id": rid, "object": "text_completion", "created": now(), "model": ctx.served_model_name}
    n_lp = req.logprobs
    num_prompt = sum(len(e["prompt_token_ids"]) for e in encoded)

    def choice(i, c, text, entries, offset, finish):
        return {"index": i * params.n + c.index, "text": text, "finish_reason": finish,
                "stop_reason": c.stop_reason if finish else None,
                "logprobs": completion_logprobs(entries, n_lp, offset) if n_lp is not None else None}

    if not req.stream:
        try:
            finals = await _collect(ctx, raw, tracks)
        except RequestAborted as e:
            raise _abort_error(ctx, e) from None
        choices = [choice(i, c, c.text, c.logprobs or [], 0, c.finish_reason)
                   for i, out in enumerate(finals) for c in out.outputs]
        gen = sum(len(c.token_ids) for out in finals for c in out.outputs)
        return JSONResponse({**base, "choices": _with_ids(choices, finals, req), "usage": usage(num_prompt, gen),
                             **_transfer(finals)})

    def chunk(i, c, prev_text, prev_tokens, finish):
        return choice(i, c, c.text[len(prev_text):], (c.logprobs or [])[prev_tokens:], len(prev_text), finish)

    return _stream(ctx, raw, tracks, base, chunk, req.stream_options, num_prompt, first=None,
                   token_chunks=n_lp is not None, req=req)


async def create_chat_completion(ctx: ServerContext, req: ChatCompletionRequest, raw: HTTPRequest):
    tok, opts = ctx.tokenizer, ctx.options
    template = opts.chat_template or getattr(tok, "chat_template", None)
    if tok is None or not template:
        raise APIError(400, "this model has no chat template; use /v1/completions or serve with --chat-template",
                       param="messages")
    params = APIError.wrap(lambda: req.sampling_params(opts.sampling_defaults, opts.max_logprobs))
    plan = APIError.wrap(lambda: plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls,
                                            parser_name=opts.tool_parser, enable_auto=opts.enable_auto_tool_choice,
                                            chat_template=template))
    if plan is not None and plan.mode != "none":
        if params.structured_outputs is not None:
            raise APIError(400, "give tools or a structured output (response_format, structured_outputs, "
                           "grammar, json_schema), not both", param="tools")
        params.structured_outputs = plan.structured_outputs()
    else:
        plan = None  # tool_choice "none": the template still shows the tools, the output is plain text
    APIError.wrap(lambda: prepare_resume(plan, req.resume_tool_stream, params))  # a stream the router moved here
    messages = [m.template_dict() for m in req.messages]
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    # rendered and tokenized on a worker thread; special-token text in messages stays text (chat_template.py)
    text, ids = await ctx.tokenizer_pool.render_chat(messages, _max_prompt_tokens(ctx, params),
                                                     req.add_generation_prompt, ctx.parse_special_tokens_in_content,
                                                     tools=tools, chat_template=opts.chat_template)
    encoded = {"prompt": text, "prompt_token_ids": ids}
    rid = random_id("chatcmpl")
    tracks = await _admit(ctx, [encoded], params, req.priority, rid,
                          "tools" if plan is not None else req.constraint_field())
    base = {"id": rid, "object": "chat.completion", "created": now(), "model": ctx.served_model_name}
    n_lp = params.logprobs
    num_prompt = len(encoded["prompt_token_ids"])

    def message(c) -> tuple[dict, str | None]:
        if plan is None:
            return {"role": "assistant", "content": c.text}, c.finish_reason
        content, calls = plan.split(c.text, final=True)
        msg = {"role": "assistant", "content": content or None}
        if calls:
            msg["tool_calls"] = [tool_call_json(call, call_id()) for call in calls]
        return msg, plan.finish_reason(calls, c.finish_reason)

    if not req.stream:
        try:
            (out,) = await _collect(ctx, raw, tracks)
        except RequestAborted as e:
            raise _abort_error(ctx, e) from None
        choices = []
        for c in out.outputs:
            msg, finish = message(c)
            choices.append({"index": c.index, "message": msg,
                            "logprobs": chat_logprobs(c.logprobs or [], n_lp) if n_lp is not None else None,
                            "finish_reason": finish, "stop_reason": c.stop_reason})
        gen = sum(len(c.token_ids) for c in out.outputs)
        return JSONResponse({**base, "choices": _with_ids(choices, [out], req), "usage": usage(num_prompt, gen),
                             **_transfer([out])})

    streamers: dict[int, ToolStreamer] = {}

    def chunk(i, c, prev_text, prev_tokens, finish):
        if plan is None:
            delta = {"content": c.text[len(prev_text):]}
        else:
            streamer = streamers.setdefault(c.index, ToolStreamer(plan, req.resume_tool_stream))
            delta = streamer.feed(c.text, finish is not None)
            if finish is not None:
                finish = plan.finish_reason([None] * streamer.num_calls, finish)
            elif not delta and n_lp is None and not req.return_token_ids:
                return None  # nothing certain yet (a marker may be starting); the router still wants the ids
        return {"index": c.index, "delta": delta, "finish_reason": finish,
                "logprobs": chat_logprobs((c.logprobs or [])[prev_tokens:], n_lp) if n_lp is not None else None}

    first = lambda i: {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None}
    return _stream(ctx, raw, tracks, {**base, "object": "chat.completion.chunk"}, chunk, req.stream_options,
                   num_prompt, first=first, n=params.n, token_chunks=n_lp is not None, req=req)


def _with_ids(choices: list, finals: list, req) -> list:
    """return_token_ids: each choice with its generated token ids (after any resumed ones)."""
    if not req.return_token_ids:
        return choices
    ids = [c.token_ids[len(req.resume_token_ids or ()):] for out in finals for c in out.outputs]
    return [{**ch, "token_ids": t} for ch, t in zip(choices, ids)]


def _transfer(finals: list) -> dict:
    """A KV producer's answer names where the prompt's blocks wait (vLLM's kv_transfer_params)."""
    params = finals[0].kv_transfer_params if len(finals) == 1 else None
    return {"kv_transfer_params": params} if params is not None else {}


def _stream(ctx, raw, tracks, base, chunk, stream_options, num_prompt, first, n=1, token_chunks=False, req=None):
    """SSE response. A chunk goes out when a choice's text grows or it finishes; with logprobs also when only
    tokens arrived (their text may be held back while it could still become a stop string). With
    return_token_ids every new token is sent with its id; a resumed stream (resume_token_ids) sends only what
    follows the tokens the client has."""
    include_usage = bool(stream_options and stream_options.include_usage)
    return_ids = bool(req is not None and req.return_token_ids)
    token_chunks = token_chunks or return_ids
    resumed = len(req.resume_token_ids or ()) if req is not None else 0

    async def events():
        sent: dict[tuple[int, int], tuple[str, int, bool]] = {}  # (prompt, sample) -> (text, tokens, finished)
        extra = {"usage": None} if include_usage else {}
        if first is not None:  # chat: the role comes first, once per choice
            yield _sse({**base, "choices": [first(i) for i in range(n)], **extra})
        gen_tokens = resumed  # usage counts the whole output, also what another instance generated
        try:
            async for i, out in _merge(ctx.engine, tracks, _deadline(ctx)):
                choices = []
                for c in out.outputs:
                    text, ntok, done = sent.get((i, c.index), ("", resumed, False))
                    finish = c.finish_reason if not done else None
                    grew = len(c.text) > len(text) or (token_chunks and len(c.token_ids) > ntok)
                    if done or not (grew or finish):
                        continue
                    piece = chunk(i, c, text, ntok, finish)
                    if piece is not None:
                        if return_ids:
                            piece["token_ids"] = c.token_ids[ntok:]
                        choices.append(piece)
                    gen_tokens += len(c.token_ids) - ntok
                    sent[(i, c.index)] = (c.text, len(c.token_ids), finish is not None)
                if choices:
                    yield _sse({**base, "choices": choices, **extra})
        except RequestAborted as e:
            err = _abort_error(ctx, e)
            yield _sse({"error": err.body()})
        except Exception:  # a bug after the 200 went out: end the stream with an error event that names it
            rid = raw.state.request_id if hasattr(raw.state, "request_id") else None
            logger.exception("stream failed (request id %s)", rid)
            err = internal_error(rid)
            ctx.metrics.on_failure(err.reason)
            yield _sse({"error": err.body()})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": usage(num_prompt, gen_tokens)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
