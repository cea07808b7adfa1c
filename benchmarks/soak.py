"""Soak test of `frontierlm serve` (not part of CI): many streaming requests at high concurrency, a share of them
cancelled at random points; afterwards the server must be healthy with zero KV blocks in use, and every request
that was not cancelled must have completed.

    python benchmarks/soak.py                         # builds a tiny model, starts a server, 2,000 requests
    python benchmarks/soak.py --model DIR --num-requests 2000 --concurrency 64 --cancel-share 0.2
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int) -> subprocess.Popen:
    env = dict(os.environ, FRONTIERLM_LOG_LEVEL="WARNING")
    cmd = [sys.executable, "-m", "frontierlm.cli", "serve", model, "--port", str(port), "--served-model-name",
           "soak", "--uvicorn-log-level", "warning"]
    return subprocess.Popen(cmd, env=env, cwd=ROOT)


async def wait_healthy(client: httpx.AsyncClient, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError("server did not become healthy")


async def one_request(client: httpx.AsyncClient, rng: random.Random, cancel_share: float, max_tokens: int) -> str:
    """Returns 'completed', 'cancelled' or 'failed: ...'."""
    cancel_after = None
    n_tokens = rng.randint(1, max_tokens)
    if rng.random() < cancel_share:
        # a request to cancel runs long and is cut within its first half, so the cut lands mid-stream even when
        # the server packs several tokens into one chunk
        n_tokens = max_tokens
        cancel_after = rng.randint(0, max_tokens // 2)
    body = {"model": "soak", "prompt": [rng.randrange(10, 500) for _ in range(rng.randint(4, 64))],
            "max_tokens": n_tokens, "temperature": 1.0, "ignore_eos": True, "stream": True}
    chunks = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return f"failed: HTTP {r.status_code} {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if cancel_after is not None and chunks >= cancel_after:
                    return "cancelled"  # leaving the context manager closes the connection mid-stream
                if line == "data: [DONE]":
                    return "completed"
                event = json.loads(line[6:])
                if "error" in event:
                    return f"failed: {event['error']}"
                chunks += 1
        return "failed: stream ended without [DONE]"
    except httpx.HTTPError as e:
        return f"failed: {e!r}"


async def soak(base_url: str, num_requests: int, concurrency: int, cancel_share: float, max_tokens: int,
               seed: int) -> dict:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
        await wait_healthy(client)
        sem = asyncio.Semaphore(concurrency)

        async def bounded(i: int) -> str:
            async with sem:
                return await one_request(client, random.Random(rng.random() + i), cancel_share, max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(num_requests)))
        wall = time.perf_counter() - t0
        await asyncio.sleep(1.0)  # let the engine loop process the last aborts
        health = (await client.get("/health")).status_code
        state = (await client.get("/dashboard/state")).json()
    failed = [r for r in results if r.startswith("failed")]
    return {
        "num_requests": num_requests, "concurrency": concurrency, "wall_s": round(wall, 1),
        "completed": results.count("completed"), "cancelled": results.count("cancelled"),
        "failed": len(failed), "failures": failed[:5], "health_after": health,
        "kv_blocks_in_use_after": state["blocks"].count("1"), "kv_blocks_total": len(state["blocks"]),
        "running_after": state["stats"]["num_running"], "waiting_after": state["stats"]["num_waiting"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model dir (default: build a tiny random Llama)")
    p.add_argument("--base-url", default=None, help="soak an already running server instead of starting one")
    p.add_argument("--num-requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--cancel-share", type=float, default=0.2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    server = None
    base_url = args.base_url
    if base_url is None:
        model = args.model
        if model is None:
            sys.path.insert(0, str(ROOT / "tests"))
            import factories

            model = str(factories.make_model_dir(Path(tempfile.mkdtemp()) / "tiny", "llama"))
        port = free_port()
        server = start_server(model, port)
        base_url = f"http://127.0.0.1:{port}"
    try:
        report = asyncio.run(soak(base_url, args.num_requests, args.concurrency, args.cancel_share,
                                  args.max_tokens, args.seed))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    ok = (report["failed"] == 0 and report["health_after"] == 200 and report["kv_blocks_in_use_after"] == 0
          and report["completed"] + report["cancelled"] == report["num_requests"])
    report["ok"] = ok
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
