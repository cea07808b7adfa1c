"""ASGI layers around the app: a request id on every response, OpenAI-shaped 500s for unexpected exceptions,
and the request-body size limit (413). Plain ASGI classes rather than BaseHTTPMiddleware, which would get
between streaming responses and the handlers' disconnect detection."""
from __future__ import annotations

import uuid

from starlette.exceptions import HTTPException as StarletteHTTPException

from frontierlm.logger import init_logger
from frontierlm.server.errors import APIError

logger = init_logger(__name__)

# on every /health answer: an id drawn when the server starts, so a router sees a restart (a new id) even when
# it never saw the instance fail (its prefix-cache knowledge of the old process is void)
START_ID_HEADER = "X-FrontierLM-Start-Id"


def request_id_of(scope) -> str | None:
    return (scope.get("state") or {}).get("request_id")


def internal_error(request_id: str | None) -> APIError:
    return APIError(500, f"internal server error (request id {request_id}); the server log has the details",
                    "internal_error", code="internal_error", reason="internal")


class RequestIdMiddleware:
    """Gives each HTTP request an id (`X-Request-Id` on the response, `request.state.request_id` for the
    handlers) and turns any exception that escapes the app into a 500 in OpenAI's shape that names it; the
    traceback goes to the log under the same id. `on_failure(reason)` counts it."""

    def __init__(self, app, on_failure=None):
        self.app, self.on_failure = app, on_failure

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error in %s %s (request id %s)", scope["method"], scope["path"], rid)
            if self.on_failure is not None:
                self.on_failure("internal")
            if started:  # the status line is out; all that is left is to end the connection
                raise
            await internal_error(rid).response()(scope, receive, send_with_id)


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the server accepts ({limit} bytes; "
                              "--max-request-body-bytes)")
        self.api_error = APIError(413, self.detail, code="request_too_large", reason="request_too_large")


class BodySizeLimitMiddleware:
    """413 for bodies over `limit` bytes: at once from Content-Length, or as soon as a body sent without one
    (chunked) passes the limit, so the server never buffers more than `limit` bytes of one request."""

    def __init__(self, app, limit: int, on_failure=None):
        self.app, self.limit, self.on_failure = app, limit, on_failure

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.limit:
            err = BodyTooLarge(self.limit).api_error
            if self.on_failure is not None:
                self.on_failure(err.reason)
            return await err.response()(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)  # answered by the app's HTTPException handler
            return message

        await self.app(scope, counted_receive, send)
