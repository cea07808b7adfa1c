"""`frontierlm router`: one OpenAI-compatible endpoint over many instances. The same routes as `frontierlm
serve` (completions and chat, streaming, `/v1/models`, `/health`, `/metrics`), errors in OpenAI's shape
(server/errors.py), and the request itself forwarded untouched to the instance the policy picks."""
from __future__ import annotations

import contextlib
import json

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

import frontierlm
from frontierlm.router.instances import HealthMonitor, Instance
from frontierlm.router.metrics import RouterMetrics
from frontierlm.router.proxy import Router
from frontierlm.server.errors import APIError
from frontierlm.server.middleware import RequestIdMiddleware


def routing_text(path: str, body: dict) -> str:
    """The text a request's cache affinity is judged by: the prompt, or the messages in order."""
    if path.endswith("/chat/completions"):
        return json.dumps(body.get("messages"), ensure_ascii=False, separators=(",", ":"), default=str)
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else json.dumps(prompt, separators=(",", ":"), default=str)


def build_router_app(workers: list[str] = (), prefills: list[str] = (), decodes: list[str] = (),
                     policy: str = "cache_aware", health_interval: float = 1.0,
                     upstream_timeout: float | None = 600.0, max_migrations: int = 1) -> FastAPI:
    instances = ([Instance(u.rstrip("/"), "worker") for u in workers] + [Instance(u.rstrip("/"), "prefill")
                 for u in prefills] + [Instance(u.rstrip("/"), "decode") for u in decodes])
    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=4096, max_keepalive_connections=256))
    metrics = RouterMetrics(instances)
    router = Router([i for i in instances if i.role == "worker"], [i for i in instances if i.role == "prefill"],
                    [i for i in instances if i.role == "decode"], policy, client, metrics, upstream_timeout,
                    max_migrations)
    monitor = HealthMonitor(instances, client, interval=health_interval)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await monitor.poll_all()  # know who is up before the first request
        monitor.start()
        yield
        await monitor.stop()
        await client.aclose()

    app = FastAPI(title="FrontierLM router", version=frontierlm.__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.router, app.state.instances, app.state.monitor = router, instances, monitor
    app.add_middleware(RequestIdMiddleware, on_failure=lambda reason: None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    async def body_of(raw: Request) -> dict:
        try:
            body = json.loads(await raw.body())
        except ValueError as e:
            metrics.failures.labels("bad_request").inc()
            raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            metrics.failures.labels("bad_request").inc()
            raise APIError(400, "the request body must be a JSON object")
        # between the router and its instances only
        for name in ("resume_token_ids", "resume_text_chars", "resume_tool_stream", "kv_transfer_params"):
            if name in body:
                metrics.failures.labels("bad_request").inc()
                raise APIError(400, f"{name} is set by the router only", param=name)
        return body

    async def forward(path: str, raw: Request):
        body = await body_of(raw)
        text = routing_text(path, body)
        if body.get("stream") is True:
            return await router.stream(path, body, text)
        return await router.complete(path, body, text)

    @app.post("/v1/completions")
    async def completions(raw: Request):
        return await forward("/v1/completions", raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(raw: Request):
        return await forward("/v1/chat/completions", raw)

    @app.get("/v1/models")
    async def models():
        for inst in router.targets:
            if inst.available:
                try:
                    r = await client.get(inst.url + "/v1/models", timeout=5.0)
                except httpx.TransportError:
                    continue
                return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))
        raise APIError(503, "no healthy instance", "service_unavailable", code="no_instance", reason=None)

    @app.get("/health")
    async def health():
        if any(i.available for i in router.targets):
            return {"status": "ok"}
        return JSONResponse({"status": "no_healthy_instance"}, status_code=503)

    @app.get("/version")
    async def version():
        return {"version": frontierlm.__version__}

    @app.get("/metrics")
    async def prometheus():
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/router/instances")
    async def state():
        return {"policy": policy, "instances": [
            {"url": i.url, "role": i.role, "healthy": i.healthy, "draining": i.draining, "in_flight": i.in_flight,
             "num_running": i.num_running, "num_waiting": i.num_waiting, "kv_usage": i.kv_usage}
            for i in instances]}

    return app


def run_router(args) -> int:
    import uvicorn

    from frontierlm.router.args import check_router_args

    check_router_args(args)
    app = build_router_app(args.worker or [], args.prefill or [], args.decode or [], args.policy,
                           args.health_interval, args.upstream_timeout, args.max_migrations)
    print(f"router: {args.policy} over {len(app.state.instances)} instances at http://{args.host}:{args.port}/v1",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level)
    return 0
