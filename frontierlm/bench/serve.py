"""`frontierlm bench serve`: load any OpenAI-compatible server with Poisson arrivals of streaming completions and
report throughput, TTFT / TPOT / ITL / end-to-end latency percentiles and goodput under an SLO.

Prompts are random token-id lists (exact input lengths without a client-side tokenizer; OpenAI's completions API
accepts token arrays). `ignore_eos` is sent so every request produces --output-len tokens where the server
supports it (vLLM and FrontierLM do); the report counts the tokens actually received.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model name to send")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--request-rate", default="inf", help="requests per second (Poisson arrivals), or inf")
    p.add_argument("--dataset", choices=["random"], default="random")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no bound)")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: a request must meet this TTFT")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: and this time per output token")
    p.add_argument("--token-id-max", type=int, default=500, help="random prompt token ids are drawn below this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--json-out", default=None, help="write the report (and per-request rows) here")


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


async def _one(client, url: str, body: dict, timeout: float) -> Result:
    res = Result(prompt_tokens=len(body["prompt"]))
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, timeout=timeout) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    res.error = str(data["error"].get("message"))
                    return res
                if data.get("usage"):
                    res.output_tokens = data["usage"].get("completion_tokens", res.output_tokens)
                if not data.get("choices") or not (data["choices"][0].get("text") or
                                                   data["choices"][0].get("finish_reason")):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    res.ttft = now - start
                else:
                    res.itls.append(now - last)
                last, chunks = now, chunks + 1
    except Exception as e:  # a bench reports failures, it does not stop at the first one
        res.error = repr(e)
        return res
    res.e2e = time.perf_counter() - start
    res.output_tokens = res.output_tokens or chunks
    res.ok = chunks > 0
    return res


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    v = sorted(values)

    def pct(q):  # linear interpolation between closest ranks
        k = (len(v) - 1) * q
        lo, hi = int(k), min(int(k) + 1, len(v) - 1)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    return {"mean": sum(v) / len(v), "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}


def summarize(results: list[Result], duration: float, args) -> dict:
    ok = [r for r in results if r.ok]
    ms = lambda xs: {k: (None if x is None else round(x * 1e3, 3)) for k, x in _stats(xs).items()}  # noqa: E731
    good = [r for r in ok if (args.slo_ttft_ms is None or r.ttft * 1e3 <= args.slo_ttft_ms)
            and (args.slo_tpot_ms is None or (r.tpot or 0.0) * 1e3 <= args.slo_tpot_ms)]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": round(duration, 3),
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "total_input_tokens": sum(r.prompt_tokens for r in ok), "total_output_tokens": out_tokens,
        "ttft_ms": ms([r.ttft for r in ok]), "tpot_ms": ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": ms([x for r in ok for x in r.itls]), "e2e_ms": ms([r.e2e for r in ok]),
        "goodput": len(good) / duration, "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
        "config": {k: getattr(args, k) for k in ("base_url", "model", "num_requests", "request_rate", "input_len",
                                                  "output_len", "max_concurrency", "dataset", "seed")},
    }


async def run_bench(args) -> dict:
    import httpx

    rng = random.Random(args.seed)
    rate = float(args.request_rate)
    url = args.base_url.rstrip("/") + "/v1/completions"
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    limits = httpx.Limits(max_connections=args.max_concurrency or args.num_requests)

    async def guarded(client, body):
        if sem is None:
            return await _one(client, url, body, args.timeout)
        async with sem:
            return await _one(client, url, body, args.timeout)

    async with httpx.AsyncClient(limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        for i in range(args.num_requests):
            prompt = [rng.randrange(10, args.token_id_max) for _ in range(args.input_len)]
            body = {"model": args.model, "prompt": prompt, "max_tokens": args.output_len, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            tasks.append(asyncio.ensure_future(guarded(client, body)))
            if rate != float("inf") and i + 1 < args.num_requests:
                await asyncio.sleep(rng.expovariate(rate))  # Poisson process: exponential gaps
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return {**summarize(results, duration, args), "requests": [r.__dict__ | {"tpot": r.tpot} for r in results]}


def print_report(rep: dict, out=None) -> None:
    out = out or sys.stdout  # looked up per call: the stream may be replaced after import
    w = out.write
    w(f"{'completed / failed':<28}{rep['completed']} / {rep['failed']}\n")
    for e in rep["errors"]:
        w(f"  error: {e}\n")
    w(f"{'duration (s)':<28}{rep['duration_s']:.2f}\n")
    w(f"{'request throughput (req/s)':<28}{rep['request_throughput']:.2f}\n")
    w(f"{'output throughput (tok/s)':<28}{rep['output_throughput']:.1f}\n")
    w(f"{'total throughput (tok/s)':<28}{rep['total_token_throughput']:.1f}\n")
    w(f"{'goodput (req/s)':<28}{rep['goodput']:.2f}   SLO {rep['slo']}\n")
    w(f"{'(ms)':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}\n")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        row = rep[key]
        w(f"{key[:-3].upper():<10}" + "".join(f"{'-' if row[k] is None else f'{row[k]:.2f}':>10}"
                                             for k in ("mean", "p50", "p90", "p99")) + "\n")


def main(args) -> int:
    if args.request_rate != "inf":
        try:
            if float(args.request_rate) <= 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"--request-rate must be a positive number or inf, got {args.request_rate!r}") from None
    rep = asyncio.run(run_bench(args))
    print_report(rep)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rep, f, indent=1)
    return 0 if rep["completed"] else 1
