"""Resuming a stream whose instance died: the router sends the same request to another instance with the
tokens the client already has (`resume_token_ids`) and how many characters of text it was sent
(`resume_text_chars`). That instance takes the tokens as output already generated: they count toward
max_tokens and the penalties, a grammar's matcher is advanced over them, text the dead instance was still
holding back (engine/resume.py) is sent on, and decoding goes on from there, so the client reads one stream. Greedy requests continue exactly; a seeded sampled one
continues with fresh random draws. A chat stream with tools also carries what the client has of its content
and of each call's arguments (`resume_tool_stream`): that instance parses the whole output again, the resumed
tokens included, and sends only what follows, so no tool-call delta is repeated or lost. Requests with n > 1 or
logprobs are not resumed (their streamed state is more than the tokens): they end with an error event."""
from __future__ import annotations

from fastapi.responses import Response

from frontierlm.router.sse import encode
from frontierlm.server.errors import APIError


def resumable(body: dict) -> bool:
    return (body.get("n") in (None, 1) and not body.get("logprobs") and not body.get("top_logprobs")
            and not body.get("prompt_logprobs"))


def can_resume(router, state) -> bool:
    return state.resumable and state.tracks_tokens and state.migrations < router.max_migrations


def _error_event(message: str, code: str = "upstream_gone") -> str:
    return encode({"error": APIError(503, message, "service_unavailable", code=code).body()})


async def resume(router, path: str, body: dict, prompt: str, state, dead: list, why: str):
    """An Opened stream on another instance, or the SSE error event to end the client's stream with."""
    lost = f"the instance serving this stream failed ({why})"
    if not can_resume(router, state):
        return _error_event(lost)
    state.migrations += 1
    router.metrics.migrations.inc()
    # the text count matters where the dead instance was holding text back (what may start a stop string, an
    # incomplete character): the new one streams that text too, after the characters the client has
    resume_body = {**body, "stream": True, "return_token_ids": True, "resume_token_ids": list(state.token_ids),
                   "resume_text_chars": state.text_chars}
    if body.get("tools"):
        resume_body["resume_tool_stream"] = {"content_chars": state.text_chars, "calls": [
            {"id": cid, "arguments_chars": n} for cid, n in state.tool_calls]}
    resume_body.pop("kv_transfer_params", None)  # the new instance prefills locally
    try:
        opened = await router._open(path, resume_body, prompt, list(dead), attempts=1)
    except APIError as e:
        return _error_event(f"{lost}, and resuming it failed: {e.message}")
    if isinstance(opened, Response):
        return _error_event(f"{lost}, and resuming it failed: {opened.body.decode(errors='replace')[:300]}")
    return opened
