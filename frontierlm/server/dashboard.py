"""GET /dashboard (one static page) and GET /dashboard/state (a JSON snapshot taken on the engine thread)."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse



PAGE = Path(__file__).parent / "dashboard.html"


def _request_row(req, now: float) -> dict:
    return {"id": req.request_id, "status": req.status.value, "priority": req.priority,
            "prompt_tokens": req.num_prompt_tokens, "output_tokens": req.num_output_tokens,
            "max_tokens": req.max_tokens, "computed_tokens": req.num_computed_tokens, "tokens": req.num_tokens,
            "age_s": round(now - req.arrival_time, 3)}


def snapshot(engine) -> dict:
    """Block map ('0' free, '1' in use, '2' free but holding a cached prefix) and the request queues."""
    now = time.monotonic()
    blocks = "".join("1" if b.ref_cnt > 0 else ("2" if b.block_hash is not None else "0")
                     for b in engine.kv.pool.blocks)
    sched = engine.scheduler
    return {"blocks": blocks, "block_size": engine.kv.block_size, "stats": engine.get_stats(),
            "running": [_request_row(r, now) for r in sched.running],
            "waiting": [_request_row(r, now) for r in sched.waiting],
            "max_model_len": engine.max_model_len,
            # MoE: tokens per expert per MoE layer ([] for dense models); one device-to-host copy per poll
            "expert_load": engine.expert_load(),
            "expert_layers": engine.expert_layers(),  # the model's own layer number of each row
            "expert_load_per_rank": engine.expert_load_per_rank()}  # expert parallelism: tokens per rank and layer


def add_routes(app: FastAPI, ctx) -> None:
    @app.get("/dashboard/state")
    async def state():
        # shielded: a client that goes away must not cancel the command queued on the engine thread
        snap = await asyncio.shield(ctx.engine.call(snapshot)) if ctx.engine.is_ready else {
            "blocks": "", "running": [], "waiting": [], "stats": {}, "expert_load": [], "expert_layers": []}
        snap["model"] = ctx.served_model_name
        snap["series"] = ctx.metrics.recent_series() if hasattr(ctx.metrics, "recent_series") else {}
        return snap

    @app.get("/dashboard", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text() if PAGE.exists() else "<h1>dashboard missing</h1>")



