"""Soak test of `frontierlm serve` (not part of CI): many streaming requests at high concurrency, a share of them
cancelled at random points; afterwards the server must be healthy with zero KV blocks in use, and every request
that was not cancelled must have completed. The server's resident memory (RSS, from /proc) is sampled as the
requests finish, so growth after warm-up shows up as a slope.

    python benchmarks/soak.py                         # builds a tiny model, starts a server, 2,000 requests
    python benchmarks/soak.py --model DIR --num-requests 2000 --concurrency 64 --cancel-share 0.2
    python benchmarks/soak.py --model demo --num-requests 20000 --workload mixed   # the packaged demo model
    python benchmarks/soak.py --model demo --serve-args="--no-enable-prefix-caching"   # extra serve flags
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
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


def rss_mib(pid: int) -> float | None:
    """Resident set size of a process in MiB (Linux /proc; None elsewhere or once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _slope_per_1k(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (requests, MiB) points, in MiB per 1,000 requests."""
    xs, ys = [n for n, _ in points], [m for _, m in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-9, sum((x - mx) ** 2 for x in xs))


def rss_summary(samples: list[tuple[int, float]], warmup: int) -> dict:
    """Growth after warm-up: first and last sample past `warmup` requests and a least-squares slope; and the
    slope over the second half of the run alone, since caches that fill up over time (the prefix cache's
    block keys, kernels per batch shape) make growth that levels off, where a leak keeps its slope."""
    after = [(n, m) for n, m in samples if n >= warmup]
    if len(after) < 2:
        return {}
    ys = [m for _, m in after]
    summary = {"rss_at_warmup_mib": round(ys[0], 1), "rss_final_mib": round(ys[-1], 1),
               "rss_max_after_warmup_mib": round(max(ys), 1), "rss_growth_after_warmup_mib": round(ys[-1] - ys[0], 1),
               "rss_slope_mib_per_1k_requests": round(_slope_per_1k(after), 2)}
    second_half = [(n, m) for n, m in samples if n >= samples[-1][0] / 2]
    if len(second_half) >= 2:
        summary["rss_slope_second_half_mib_per_1k_requests"] = round(_slope_per_1k(second_half), 2)
    return summary


def start_server(model: str, port: int, extra_args: tuple[str, ...] = ()) -> subprocess.Popen:
    env = dict(os.environ, FRONTIERLM_LOG_LEVEL="WARNING")
    cmd = [sys.executable, "-m", "frontierlm.cli", "serve", model, "--port", str(port), "--served-model-name",
           "soak", "--uvicorn-log-level", "warning", *extra_args]
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


WORDS = ("the class statement defines a new object type with methods and attributes while import binds names "
         "from modules and every expression has a value").split()


def request_body(rng: random.Random, workload: str, n_tokens: int) -> tuple[str, dict]:
    """(path, body): token-id completions, or with `mixed` a third each of token ids, text and chat, so the
    tokenizer and the chat template are exercised too."""
    kind = "ids" if workload == "ids" else rng.choice(("ids", "text", "chat"))
    body = {"model": "soak", "max_tokens": n_tokens, "temperature": 1.0, "ignore_eos": True, "stream": True}
    if kind == "ids":
        return "/v1/completions", {**body, "prompt": [rng.randrange(10, 500) for _ in range(rng.randint(4, 64))]}
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 48)))
    if kind == "text":
        return "/v1/completions", {**body, "prompt": text}
    return "/v1/chat/completions", {**body, "messages": [{"role": "system", "content": "Answer briefly."},
                                                         {"role": "user", "content": text}]}


async def one_request(client: httpx.AsyncClient, rng: random.Random, cancel_share: float, max_tokens: int,
                      workload: str = "ids") -> str:
    """Returns 'completed', 'cancelled' or 'failed: ...'."""
    cancel_after = None
    n_tokens = rng.randint(1, max_tokens)
    if rng.random() < cancel_share:
        # a request to cancel runs long and is cut within its first half, so the cut lands mid-stream even when
        # the server packs several tokens into one chunk
        n_tokens = max_tokens
        cancel_after = rng.randint(0, max_tokens // 2)
    path, body = request_body(rng, workload, n_tokens)
    chunks = 0
    try:
        async with client.stream("POST", path, json=body) as r:
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
               seed: int, workload: str = "ids", server_pid: int | None = None, rss_every: int = 500) -> dict:
    rng = random.Random(seed)
    samples: list[tuple[int, float]] = []  # (requests finished, server RSS in MiB)
    finished = 0
    limits = httpx.Limits(max_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
        await wait_healthy(client)
        sem = asyncio.Semaphore(concurrency)

        def sample() -> None:
            if server_pid is not None and (m := rss_mib(server_pid)) is not None:
                samples.append((finished, round(m, 1)))
                print(f"{finished} requests, {time.perf_counter() - t_start:.0f}s: server RSS {m:.1f} MiB",
                      file=sys.stderr, flush=True)  # progress, and figures even if the run is cut short

        async def bounded(i: int) -> str:
            nonlocal finished
            async with sem:
                result = await one_request(client, random.Random(rng.random() + i), cancel_share, max_tokens,
                                           workload)
            finished += 1
            if finished % rss_every == 0:
                sample()
            return result

        t_start = time.perf_counter()
        sample()
        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(num_requests)))
        wall = time.perf_counter() - t0
        await asyncio.sleep(1.0)  # let the engine loop process the last aborts
        sample()
        health = (await client.get("/health")).status_code
        state = (await client.get("/dashboard/state")).json()
    failed = [r for r in results if r.startswith("failed")]
    return {
        "num_requests": num_requests, "concurrency": concurrency, "wall_s": round(wall, 1),
        "completed": results.count("completed"), "cancelled": results.count("cancelled"),
        "failed": len(failed), "failures": failed[:5], "health_after": health,
        "kv_blocks_in_use_after": state["blocks"].count("1"), "kv_blocks_total": len(state["blocks"]),
        "running_after": state["stats"]["num_running"], "waiting_after": state["stats"]["num_waiting"],
        "workload": workload, "rss_mib": samples,
        # warm-up: the first tenth of the requests (KV blocks and allocator arenas get touched for the first time)
        **rss_summary(samples, num_requests // 10),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="model dir, or 'demo' for the packaged demo model (default: build a tiny random Llama)")
    p.add_argument("--base-url", default=None, help="soak an already running server instead of starting one")
    p.add_argument("--num-requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--cancel-share", type=float, default=0.2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workload", choices=("ids", "mixed"), default="ids",
                   help="ids: token-id completions; mixed: a third each of token ids, text prompts and chat")
    p.add_argument("--rss-every", type=int, default=500, help="sample the server's RSS every N finished requests")
    p.add_argument("--server-pid", type=int, default=None, help="with --base-url: the server process to sample")
    p.add_argument("--serve-args", default="",
                   help="more `frontierlm serve` flags in one string: --serve-args='--no-enable-prefix-caching'")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    server = None
    base_url = args.base_url
    if base_url is None:
        model = args.model
        if model == "demo":
            sys.path.insert(0, str(ROOT))
            from frontierlm.assets import default_model

            model = default_model()
        elif model is None:
            sys.path.insert(0, str(ROOT / "tests"))
            import factories

            model = str(factories.make_model_dir(Path(tempfile.mkdtemp()) / "tiny", "llama"))
        port = free_port()
        server = start_server(model, port, tuple(shlex.split(args.serve_args)))
        base_url = f"http://127.0.0.1:{port}"
    try:
        pid = server.pid if server is not None else args.server_pid
        report = asyncio.run(soak(base_url, args.num_requests, args.concurrency, args.cancel_share,
                                  args.max_tokens, args.seed, args.workload, pid, args.rss_every))
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
