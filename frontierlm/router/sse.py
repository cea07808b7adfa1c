"""Reading an instance's server-sent events, and what the router needs to know about each one."""
from __future__ import annotations

import json
from typing import AsyncIterator

import httpx

DONE = "[DONE]"


async def sse_events(response: httpx.Response) -> AsyncIterator[dict | str]:
    """Each `data:` payload as a dict, or DONE. Ends when the instance closes the stream (normally right after
    DONE; without it, the instance went away mid-stream)."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == DONE:
            yield DONE
            return
        try:
            event = json.loads(payload)
        except ValueError:
            continue  # not ours to judge; the client would not parse it either
        if isinstance(event, dict):
            yield event


def encode(event: dict | str) -> str:
    if event == DONE:
        return f"data: {DONE}\n\n"
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n"


def token_ids_of(event: dict) -> list[int] | None:
    """The token ids an event carries (instances stream them when asked with return_token_ids), or None."""
    choices = event.get("choices") or []
    if not choices or "token_ids" not in choices[0]:
        return None
    return list(choices[0]["token_ids"] or [])


def is_token_event(event: dict) -> bool:
    """Does this event carry generated output (text, tokens or a finish)? A chat stream's first event, the
    assistant role, does not."""
    for c in event.get("choices") or []:
        delta = c.get("delta")
        text = c.get("text") if delta is None else (delta.get("content") or delta.get("tool_calls"))
        if text or c.get("token_ids") or c.get("finish_reason"):
            return True
    return False


def is_role_event(event: dict) -> bool:
    return any((c.get("delta") or {}).get("role") and not (c.get("delta") or {}).get("content")
               and not c.get("token_ids") for c in event.get("choices") or [])


def strip_token_ids(event: dict) -> dict:
    """The event without the token ids the router asked for on its own account."""
    if not any("token_ids" in c for c in event.get("choices") or []):
        return event
    return {**event, "choices": [{k: v for k, v in c.items() if k != "token_ids"} for c in event["choices"]]}
