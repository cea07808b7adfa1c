"""Forwarding one request: choose an instance, send, and retry once elsewhere if it fails before its first
token. A stream whose instance dies after that is resumed on another one (router/migration.py) or ends with an
OpenAI-shaped error event; in no case does the client wait on a dead instance."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import httpx
from fastapi.responses import Response, StreamingResponse

from frontierlm.logger import init_logger
from frontierlm.router import disagg, migration
from frontierlm.router.instances import RETRYABLE, Instance, is_gone
from frontierlm.router.metrics import RouterMetrics
from frontierlm.router.policies import make_policy
from frontierlm.router.sse import DONE, encode, is_role_event, is_token_event, sse_events, strip_token_ids, \
    token_ids_of
from frontierlm.server.errors import APIError

logger = init_logger(__name__)



def upstream_error(why: str) -> APIError:
    return APIError(503, f"no instance could serve the request: {why}", "service_unavailable",
                    code="upstream_error", reason=None)


def no_instance(tried: list) -> APIError:
    return APIError(503, "no healthy instance can take the request" + (" (the others failed it)" if tried else ""),
                    "service_unavailable", code="no_instance", reason=None)


@dataclass
class Opened:
    """A stream that has produced its first token (or ended before one)."""
    inst: Instance
    response: httpx.Response
    events: object  # the rest of the stream (an async iterator)
    buffered: list = field(default_factory=list)


@dataclass
class StreamState:
    """What the client has been sent, so a stream can be resumed elsewhere."""
    arrival: float
    token_ids: list[int] = field(default_factory=list)
    text_chars: int = 0  # characters of text sent: a resumed stream starts after them (resume_text_chars)
    tool_calls: list = field(default_factory=list)  # [id, arguments characters sent] per tool call index
    tracks_tokens: bool = True  # every event so far carried its token ids
    first_token: float | None = None
    last_token: float | None = None
    num_token_events: int = 0
    role_sent: bool = False
    migrations: int = 0
    resumable: bool = False  # router/migration.py: may this stream move to another instance


class Router:
    def __init__(self, workers: list[Instance], prefills: list[Instance], decodes: list[Instance], policy: str,
                 client: httpx.AsyncClient, metrics: RouterMetrics, upstream_timeout: float | None = 600.0,
                 max_migrations: int = 1):
        self.pd = bool(prefills)
        self.targets = decodes if self.pd else workers
        self.prefills = prefills
        self.policy, self.prefill_policy = make_policy(policy), make_policy(policy)
        self.client, self.metrics = client, metrics
        self.timeout = httpx.Timeout(upstream_timeout, connect=5.0)
        self.max_migrations = max_migrations

    def choose(self, pool: list[Instance], prompt: str, exclude: list[Instance], policy=None) -> Instance | None:
        """The instance the policy picks among the available ones not in `exclude` (None: there is none)."""
        candidates = [i for i in pool if i.available and i not in exclude]
        if not candidates:
            return None
        policy = policy or self.policy
        inst = policy.choose(candidates, prompt)
        policy.on_routed(inst, prompt)
        self.metrics.requests.labels(inst.url, inst.role).inc()
        return inst

    def pick(self, pool: list[Instance], prompt: str, exclude: list[Instance], policy=None) -> Instance:
        inst = self.choose(pool, prompt, exclude, policy)
        if inst is None:
            raise no_instance(exclude)
        return inst

    async def post_with_retry(self, pool: list[Instance], policy, path: str, body: dict,
                              prompt: str) -> tuple[httpx.Response | None, str, list[Instance]]:
        """POST `body` to the instance the policy picks; a dropped connection or a retryable status moves it once
        to another instance. Returns the last answer (None: no instance answered), why the attempts failed, and
        the instances tried. Plain requests and the prefill leg of disaggregated ones both go this way."""
        tried: list[Instance] = []
        answer, why = None, "no instance is available"
        for attempt in range(2):
            inst = self.choose(pool, prompt, tried, policy)
            if inst is None:
                break
            if attempt:
                self.metrics.retries.inc()
            tried.append(inst)
            inst.in_flight += 1
            try:
                answer = await self.client.post(inst.url + path, json=body, timeout=self.timeout)
            except httpx.TransportError as e:
                if is_gone(e):
                    inst.mark_failed(f"{type(e).__name__}: {e}")
                answer, why = None, f"{inst.url}: {type(e).__name__}"
                continue
            finally:
                inst.in_flight -= 1
            if answer.status_code not in RETRYABLE:
                break
            why = f"{inst.url} answered {answer.status_code}"
        return answer, why, tried

    # ---- one JSON answer ---------------------------------------------------------------------------------
    async def complete(self, path: str, body: dict, prompt: str) -> Response:
        arrival = time.monotonic()
        body = await self._with_prefill(path, body, prompt)
        if isinstance(body, Response):
            return body
        answer, why, tried = await self.post_with_retry(self.targets, self.policy, path, body, prompt)
        if answer is None:
            if not tried:
                raise no_instance(tried)
            self.metrics.failures.labels("upstream_error").inc()
            raise upstream_error(why)
        self.metrics.e2e.observe(time.monotonic() - arrival)
        return Response(answer.content, answer.status_code, media_type=answer.headers.get("content-type"))

    def _pick_target(self, prompt: str, tried: list[Instance], attempt: int) -> Instance:
        if attempt:
            self.metrics.retries.inc()
        return self.pick(self.targets, prompt, tried)

    async def _with_prefill(self, path: str, body: dict, prompt: str) -> dict | Response:
        if not self.pd:
            return body
        return await disagg.prefill(self, path, body, prompt)

    # ---- a stream ------------------------------------------------------------------------------------------
    async def stream(self, path: str, body: dict, prompt: str) -> Response:
        state = StreamState(time.monotonic(), resumable=migration.resumable(body))
        client_wants_ids = body.get("return_token_ids") is True
        body = await self._with_prefill(path, body, prompt)
        if isinstance(body, Response):
            return body
        upstream_body = {**body, "return_token_ids": True}  # so a stream can be resumed elsewhere
        opened = await self._open(path, upstream_body, prompt, [])
        if isinstance(opened, Response):
            return opened
        return StreamingResponse(self._relay(path, body, prompt, opened, state, client_wants_ids),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _open(self, path: str, body: dict, prompt: str, tried: list[Instance],
                    attempts: int = 2) -> Opened | Response:
        """Open a stream and read it up to its first token; a failure before that moves to another instance."""
        why = "no attempt"
        for attempt in range(attempts):
            inst = self._pick_target(prompt, tried, attempt)
            tried.append(inst)
            try:
                response = await self.client.send(self.client.build_request(
                    "POST", inst.url + path, json=body, timeout=self.timeout), stream=True)
            except httpx.TransportError as e:
                if is_gone(e):
                    inst.mark_failed(f"{type(e).__name__}: {e}")
                why = f"{inst.url}: {type(e).__name__}"
                continue
            if response.status_code != 200:
                content = await response.aread()
                await response.aclose()
                if response.status_code in RETRYABLE and attempt + 1 < attempts:
                    why = f"{inst.url} answered {response.status_code}"
                    continue
                return Response(content, response.status_code, media_type=response.headers.get("content-type"))
            inst.streams.add(response)
            inst.in_flight += 1
            opened = Opened(inst, response, sse_events(response))
            try:
                async for event in opened.events:
                    opened.buffered.append(event)
                    if event == DONE or "error" in event or is_token_event(event):
                        break
            except (httpx.TransportError, httpx.StreamError) as e:
                await self._close(opened)
                if is_gone(e):
                    inst.mark_failed(f"{type(e).__name__}: {e}")
                why = f"{inst.url}: {type(e).__name__} before the first token"
                continue
            last = opened.buffered[-1] if opened.buffered else None
            if (last is None or (isinstance(last, dict) and "error" in last)) and attempt + 1 < attempts:
                await self._close(opened)  # ended or failed before any token: the next instance may serve it
                why = f"{inst.url}: {'an error event' if last else 'the stream ended'} before the first token"
                continue
            return opened
        self.metrics.failures.labels("upstream_error").inc()
        raise upstream_error(why)

    async def _close(self, opened: Opened) -> None:
        opened.inst.streams.discard(opened.response)
        opened.inst.in_flight -= 1
        await opened.response.aclose()

    async def _relay(self, path, body, prompt, opened: Opened, state: StreamState, client_wants_ids: bool):
        dead: list[Instance] = []
        try:
            while True:
                ended = _Pumped(self, opened, state, client_wants_ids)
                async for piece in ended.pieces:
                    yield piece
                if ended.done:
                    yield encode(DONE)
                    break
                dead.append(opened.inst)
                await self._close(opened)
                resumed = await migration.resume(self, path, body, prompt, state, dead, ended.why)
                if isinstance(resumed, str):  # could not: the client gets an error event and the end
                    self.metrics.failures.labels("upstream_gone").inc()
                    yield resumed
                    yield encode(DONE)
                    break
                opened = resumed
        finally:
            if opened.response in opened.inst.streams:
                await self._close(opened)
            self._record(state)

    def observe(self, event: dict, state: StreamState) -> None:
        ids = token_ids_of(event)
        if ids is None:
            state.tracks_tokens = state.tracks_tokens and not is_token_event(event)
        else:
            state.token_ids += ids
        text = _text_of(event)
        state.text_chars += len(text)
        _note_tool_calls(event, state.tool_calls)
        if not is_token_event(event) or not (ids or text):
            return
        now = time.monotonic()
        if state.first_token is None:
            state.first_token = now
            self.metrics.ttft.observe(now - state.arrival)
        else:
            self.metrics.itl.observe(now - state.last_token)
        state.last_token = now
        state.num_token_events += 1

    def _record(self, state: StreamState) -> None:
        self.metrics.e2e.observe(time.monotonic() - state.arrival)
        n = len(state.token_ids) if state.tracks_tokens else state.num_token_events
        if state.first_token is not None and n > 1:
            self.metrics.tpot.observe((state.last_token - state.first_token) / (n - 1))


def _text_of(event: dict) -> str:
    """The text an event adds (streams that can be resumed have one choice)."""
    out = []
    for c in event.get("choices") or []:
        delta = c.get("delta")
        out.append((c.get("text") if delta is None else delta.get("content")) or "")
    return "".join(out)


def _note_tool_calls(event: dict, calls: list) -> None:
    """Count the tool-call deltas an event sends: a call's first delta has its id, the rest add arguments."""
    for c in event.get("choices") or []:
        for item in (c.get("delta") or {}).get("tool_calls") or ():
            index = item.get("index", len(calls))
            if index == len(calls):
                calls.append([item.get("id"), 0])
            if 0 <= index < len(calls):
                calls[index][1] += len((item.get("function") or {}).get("arguments") or "")


def _says_nothing(event: dict) -> bool:
    """A chat chunk that only carried the token ids the router asked for (a tool call's markup may be starting):
    stripped of them, the client has no use for it."""
    choices = event.get("choices") or []
    return bool(choices) and event.get("usage") is None and all(
        c.get("delta") == {} and c.get("finish_reason") is None and c.get("logprobs") is None for c in choices)


class _Pumped:
    """Relays one upstream stream: `pieces` yields the SSE text for the client; afterwards `done` says whether
    it ended with [DONE], else `why` it broke off (the instance closed or failed the connection, or sent an
    error event saying it is going away)."""

    GONE_CODES = {"shutdown", "engine_error", "internal_error"}

    def __init__(self, router: Router, opened: Opened, state: StreamState, client_wants_ids: bool):
        self.router, self.opened, self.state, self.wants_ids = router, opened, state, client_wants_ids
        self.done, self.why = False, "the stream ended without [DONE]"

    @property
    def pieces(self):
        return self._pieces()

    async def _pieces(self):
        opened, state = self.opened, self.state

        async def events():
            while opened.buffered:
                yield opened.buffered.pop(0)
            async for event in opened.events:
                yield event

        try:
            async for event in events():
                if event == DONE:
                    self.done = True
                    return
                if "error" in event:
                    code = (event.get("error") or {}).get("code")
                    if code in self.GONE_CODES and migration.can_resume(self.router, state):
                        self.why = f"error event {code}"
                        return
                    yield encode(event)
                    continue
                if is_role_event(event) and not is_token_event(event):
                    if state.role_sent:
                        continue  # a resumed stream opens with the role again
                    state.role_sent = True
                self.router.observe(event, state)
                if self.wants_ids:
                    yield encode(event)
                elif not _says_nothing(event):
                    yield encode(strip_token_ids(event))
        except (httpx.TransportError, httpx.StreamError) as e:
            if is_gone(e):
                opened.inst.mark_failed(f"{type(e).__name__} mid-stream")
            self.why = f"{type(e).__name__}: {e}"
