"""The FastAPI app: OpenAI-compatible endpoints, health, version, Prometheus metrics and the dashboard."""
from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import frontierlm
from frontierlm.engine.async_engine import AsyncEngine, EngineDeadError
from frontierlm.logger import init_logger
from frontierlm.server import dashboard, responses, routes
from frontierlm.server.errors import APIError
from frontierlm.server.metrics import ServerMetrics
from frontierlm.server.middleware import START_ID_HEADER, BodySizeLimitMiddleware, BodyTooLarge, RequestIdMiddleware
from frontierlm.server.options import ServeOptions
from frontierlm.server.protocol import ChatCompletionRequest, CompletionRequest, FieldError
from frontierlm.server.security import SecurityOptions, add_api_key_check, add_cors, docs_kwargs
from frontierlm.server.serving import ServerContext, create_chat_completion, create_completion
from frontierlm.server.tokenization import TokenizerPool

logger = init_logger(__name__)


def _validation_error(exc: RequestValidationError) -> APIError:
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {err.get('msg')}", code="invalid_json")
    msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):  # raised by a model-level validator, which pydantic gives no location
        return APIError(400, msg, param=cause.param)
    # param is the top-level field; the message keeps the full path (which names union members too)
    return APIError(400, f"{'.'.join(loc)}: {msg}" if loc else msg, param=loc[0] if loc else None)


def build_app(async_engine: AsyncEngine, served_model_name: str, max_queue: int | None = None,
              request_timeout: float | None = None, options: ServeOptions | None = None,
              security: SecurityOptions | None = None) -> FastAPI:
    """App around a started AsyncEngine (the model may still be loading: /health answers 503 until ready).
    `options` carries the serve flags that shape requests (more served names, chat template, tools...),
    `security` the keys, CORS, docs and limits (security.py)."""
    options = options or ServeOptions()
    names = options.served_model_names = options.served_model_names or [served_model_name]
    served_model_name = names[0]
    metrics = async_engine.stats
    if not isinstance(metrics, ServerMetrics):
        metrics = async_engine.stats = ServerMetrics(served_model_name)
    opts = security or SecurityOptions()
    ctx = ServerContext(async_engine, served_model_name, max_queue, request_timeout, None, metrics, options=options,
                        parse_special_tokens_in_content=opts.parse_special_tokens_in_content)
    app = FastAPI(title="FrontierLM", version=frontierlm.__version__, **docs_kwargs(opts))
    app.state.ctx = ctx
    _add_middleware(app, opts, metrics)
    tokenizer_lock = asyncio.Lock()

    async def ready_context() -> ServerContext:
        if ctx.shutting_down:
            raise APIError(503, "the server is shutting down", "service_unavailable", code="shutting_down",
                           reason="shutting_down")
        if not async_engine.is_ready:
            raise APIError(503, "the model is still loading" if async_engine.dead is None else "the engine died",
                           "service_unavailable", code="not_ready", reason=None)
        async with tokenizer_lock:
            if ctx.tokenizer is None and async_engine.engine.tokenizer is not None:
                # the HTTP side gets its own tokenizer (HF fast tokenizers must not be shared across threads),
                # loaded off the event loop
                from frontierlm.engine.tokenizer import load_tokenizer

                cfg = async_engine.engine.config
                tok = await asyncio.to_thread(load_tokenizer, cfg.tokenizer or cfg.model)
                ctx.tokenizer_pool = await asyncio.to_thread(TokenizerPool, tok)
                ctx.tokenizer = tok
        return ctx

    def check_model(name: str | None) -> None:
        if name is not None and name not in names:
            raise APIError(400, f"model {name!r} does not exist; this server serves "
                           f"{', '.join(map(repr, names))}", param="model", code="model_not_found")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        if exc.reason is not None:
            metrics.on_failure(exc.reason)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return await _api_error(request, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc, BodyTooLarge):  # a body sent without Content-Length passed the limit
            return await _api_error(request, exc.api_error)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind, reason=None).response()

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, exc: EngineDeadError):
        return await _api_error(request, APIError(500, str(exc), "internal_error", reason="engine_error"))

    start_id = {START_ID_HEADER: uuid.uuid4().hex}  # middleware.py: a router tells a restart by it

    @app.get("/health")
    async def health():
        if async_engine.load_error is not None or async_engine.dead is not None:
            return JSONResponse({"status": "error"}, status_code=503, headers=start_id)
        if ctx.shutting_down:
            return JSONResponse({"status": "shutting_down"}, status_code=503, headers=start_id)
        if not async_engine.is_ready:
            return JSONResponse({"status": "loading"}, status_code=503, headers=start_id)
        return JSONResponse({"status": "ok"}, headers=start_id)

    @app.get("/version")
    async def version():
        return {"version": frontierlm.__version__}

    @app.get("/v1/models")
    async def models():
        c = await ready_context()
        return {"object": "list", "data": [model_card(c, name) for name in names]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        check_model(body.model)
        return await create_completion(await ready_context(), body, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        check_model(body.model)
        return await create_chat_completion(await ready_context(), body, raw)

    @app.get("/metrics")
    async def prometheus():
        await metrics.refresh_expert_load(async_engine)  # MoE models: a fresh snapshot, taken on the engine thread
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    dashboard.add_routes(app, ctx)
    routes.add_routes(app, ctx, ready_context, check_model)
    responses.add_routes(app, ctx, ready_context, check_model)
    return app


def _add_middleware(app: FastAPI, opts: SecurityOptions, metrics: ServerMetrics) -> None:
    """Outermost last: CORS, then request ids and the 500 boundary, the key check, the body-size limit."""
    if opts.max_request_body_bytes is not None:
        app.add_middleware(BodySizeLimitMiddleware, limit=opts.max_request_body_bytes, on_failure=metrics.on_failure)
    add_api_key_check(app, opts, on_reject=metrics.on_failure)
    app.add_middleware(RequestIdMiddleware, on_failure=metrics.on_failure)
    add_cors(app, opts)


def model_card(ctx: ServerContext, name: str) -> dict:
    # root names the model as clients know it: the directory's path stays private to the host
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "frontierlm",
            "root": name, "max_model_len": ctx.engine.engine.max_model_len}
