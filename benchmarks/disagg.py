"""Disaggregated prefill / decode and data parallelism behind `frontierlm router`, on this machine's CPU.

    python benchmarks/disagg.py [--model DIR] [--rounds 1] [--json-out disagg.json]

1. Mixed workload: short requests decoding (Poisson) while long prompts arrive (Poisson), measured by the load
   generator of `frontierlm bench serve` (frontierlm/bench/serve.py) on each stream. Colocated: one instance;
   disaggregated: one prefill + one decode instance behind the router (KV over torch.distributed / gloo). The
   figure of merit is the short requests' TPOT p99 / p50 (a long prefill inside a decode step stalls every
   stream in it). Colocated and disaggregated alternate, `--rounds` times each.
2. Data parallel: one instance vs two behind the router, on a shared-prefix workload (4 system prompts), with
   the prefix-cache hit rate each policy gets (from the instances' own prefix_cache counters).

Every process is pinned to the CPUs in --cpus (default: 1, the core this project's benchmarks may use) with
one torch thread each, so the instances share the core(s) by time slicing: say so beside any figure.
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
import time
from pathlib import Path
from types import SimpleNamespace

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from frontierlm.bench.serve import _one, summarize  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, args: list[str], cpus: str, log: Path):
        env = dict(os.environ, FRONTIERLM_LOG_LEVEL="WARNING", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        self.log = open(log, "w")
        self.p = subprocess.Popen(["taskset", "-c", cpus, sys.executable, "-m", "frontierlm.cli", *args], env=env,
                                  stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(20)
        except subprocess.TimeoutExpired:
            self.p.kill()


def serve(model: str, cpus: str, log: Path, kv: dict | None = None, extra=(), threads: int = 1) -> tuple[Proc, str]:
    port = free_port()
    args = ["serve", model, "--port", str(port), "--served-model-name", "m", "--num-threads", str(threads),
            "--disable-log-requests", "--uvicorn-log-level", "warning", *extra]
    if kv:
        args += ["--kv-transfer-config", json.dumps(kv)]
    return Proc(args, cpus, log), f"http://127.0.0.1:{port}"


def router(urls: dict, policy: str, cpus: str, log: Path) -> tuple[Proc, str]:
    port = free_port()
    args = ["router", "--port", str(port), "--policy", policy, "--health-interval", "0.5"]
    for flag, us in urls.items():
        for u in us:
            args += [f"--{flag}", u]
    return Proc(args, cpus, log), f"http://127.0.0.1:{port}"


def wait_healthy(urls: list[str], timeout: float = 600) -> None:
    deadline = time.time() + timeout
    for u in urls:
        while True:
            try:
                if httpx.get(u + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit(f"{u} did not become healthy")
            time.sleep(0.5)


async def poisson_stream(client, url: str, prompts: list[list[int]], rate: float, output_len: int, seed: int):
    rng = random.Random(seed)
    tasks = []
    for prompt in prompts:
        body = {"model": "m", "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        tasks.append(asyncio.ensure_future(_one(client, url + "/v1/completions", body, 600.0)))
        await asyncio.sleep(rng.expovariate(rate))
    return await asyncio.gather(*tasks)


def report(results, duration, slo_ttft_ms=None, slo_tpot_ms=None) -> dict:
    args = SimpleNamespace(slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, base_url="", model="m",
                           num_requests=len(results), request_rate="poisson", input_len=None, output_len=None,
                           max_concurrency=None, dataset="custom", seed=0)
    rep = summarize(list(results), duration, args)
    return {k: rep[k] for k in ("completed", "failed", "errors", "ttft_ms", "tpot_ms", "itl_ms", "goodput")}


async def mixed(url: str, a) -> dict:
    rng = random.Random(1)
    short = [[rng.randrange(10, 500) for _ in range(a.short_len)] for _ in range(a.num_short)]
    long_ = [[rng.randrange(10, 500) for _ in range(a.long_len)] for _ in range(a.num_long)]
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=256)) as client:
        t0 = time.perf_counter()
        s, l_ = await asyncio.gather(poisson_stream(client, url, short, a.short_rate, a.short_out, 2),
                                     poisson_stream(client, url, long_, a.long_rate, 1, 3))
        dur = time.perf_counter() - t0
    out = {"short": report(s, dur, a.slo_ttft_ms, a.slo_tpot_ms), "long": report(l_, dur)}
    tp = out["short"]["tpot_ms"]
    out["short_tpot_p99_over_p50"] = round(tp["p99"] / tp["p50"], 3) if tp["p50"] else None
    return out


def prefix_counters(urls: list[str]) -> tuple[float, float]:
    q = h = 0.0
    for u in urls:
        for line in httpx.get(u + "/metrics").text.splitlines():
            if line.startswith("frontierlm:prefix_cache_queries_total"):
                q += float(line.rsplit(" ", 1)[1])
            elif line.startswith("frontierlm:prefix_cache_hits_total"):
                h += float(line.rsplit(" ", 1)[1])
    return q, h


async def shared_prefix(url: str, a, seed: int) -> tuple[list, float]:
    rng = random.Random(seed)
    systems = [[rng.randrange(10, 500) for _ in range(a.prefix_len)] for _ in range(4)]
    prompts = [rng.choice(systems) + [rng.randrange(10, 500) for _ in range(32)] for _ in range(a.num_dp)]
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=256)) as client:
        t0 = time.perf_counter()
        res = await poisson_stream(client, url, prompts, a.dp_rate, a.dp_out, seed)
        return res, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the 33.6M-parameter benchmark shape)")
    p.add_argument("--cpus", default="1")
    p.add_argument("--split-roles", action="store_true",
                   help="with two CPUs: colocated gets both (one thread each), prefill the first, decode the second")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--num-short", type=int, default=40)
    p.add_argument("--short-len", type=int, default=32)
    p.add_argument("--short-out", type=int, default=48)
    p.add_argument("--short-rate", type=float, default=1.5)
    p.add_argument("--num-long", type=int, default=8)
    p.add_argument("--long-len", type=int, default=1536)
    p.add_argument("--long-rate", type=float, default=0.3)
    p.add_argument("--slo-ttft-ms", type=float, default=2000)
    p.add_argument("--slo-tpot-ms", type=float, default=150)
    p.add_argument("--num-dp", type=int, default=48)
    p.add_argument("--prefix-len", type=int, default=256)
    p.add_argument("--dp-rate", type=float, default=4.0)
    p.add_argument("--dp-out", type=int, default=16)
    p.add_argument("--skip", choices=["mixed", "dp"], default=None)
    p.add_argument("--json-out", default=None)
    p.add_argument("--logs", default="/tmp/disagg-bench")
    a = p.parse_args()
    logs = Path(a.logs)
    logs.mkdir(parents=True, exist_ok=True)
    model = a.model
    if model is None:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from make_random_model import make_random_model

        model = str(logs / "model")
        if not (Path(model) / "config.json").exists():
            make_random_model(model)
    split = a.cpus.split(",")
    if a.split_roles and len(split) != 2:
        p.error("--split-roles needs --cpus A,B")
    out = {"cpus": a.cpus, "split_roles": a.split_roles, "load_before": os.getloadavg(), "mixed": [], "dp": {}}
    extra = ["--max-num-batched-tokens", "2048", "--max-model-len", "2048"]
    if a.skip != "mixed":
        for rnd in range(a.rounds):
            for mode in ("colocated", "disaggregated"):
                procs = []
                try:
                    if mode == "colocated":
                        pr, url = serve(model, a.cpus, logs / "colocated.log", extra=extra,
                                        threads=len(split) if a.split_roles else 1)
                        procs.append(pr)
                        wait_healthy([url])
                    else:
                        kv = {"kv_parallel_size": 2, "kv_port": free_port()}
                        pcpu, dcpu = (split[0], split[-1]) if a.split_roles else (a.cpus, a.cpus)
                        pp, pu = serve(model, pcpu, logs / "prefill.log", {**kv, "kv_role": "kv_producer",
                                                                            "kv_rank": 0}, extra)
                        dp, du = serve(model, dcpu, logs / "decode.log", {**kv, "kv_role": "kv_consumer",
                                                                           "kv_rank": 1}, extra)
                        rp, url = router({"prefill": [pu], "decode": [du]}, "round_robin", a.cpus, logs / "r.log")
                        procs += [pp, dp, rp]
                        wait_healthy([pu, du, url])
                        time.sleep(1.0)
                    load = os.getloadavg()
                    res = asyncio.run(mixed(url, a))
                    if mode == "disaggregated":
                        st = httpx.get(du + "/dashboard/state").json()["stats"]["kv_transfer"]
                        res["kv_transfer"] = {k: st[k] for k in ("blocks_received", "bytes_received", "transfers",
                                                                 "failures", "local_prefill_fallbacks",
                                                                 "seconds_sum")}
                        if st["transfers"]:
                            res["kv_transfer"]["mean_ms_per_transfer"] = round(1e3 * st["seconds_sum"]
                                                                               / st["transfers"], 2)
                            res["kv_transfer"]["MB_per_s"] = round(st["bytes_received"] / st["seconds_sum"] / 1e6, 1)
                    out["mixed"].append({"round": rnd, "mode": mode, "load": load, **res})
                    print(json.dumps(out["mixed"][-1]), flush=True)
                finally:
                    for pr in procs:
                        pr.stop()
    if a.skip != "dp":
        # two instances, started once; each run uses its own system prompts (seed), so what one run left in
        # the prefix caches cannot help the next
        procs = []
        try:
            insts = [serve(model, a.cpus, logs / f"w{i}.log") for i in range(2)]
            procs += [pr for pr, _ in insts]
            urls = [u for _, u in insts]
            wait_healthy(urls)
            for seed, (label, policy) in enumerate((("1 instance", None), ("2 x round_robin", "round_robin"),
                                                    ("2 x least_loaded", "least_loaded"),
                                                    ("2 x cache_aware", "cache_aware")), start=11):
                rp, url = (router({"worker": urls}, policy, a.cpus, logs / "r.log") if policy else (None, urls[0]))
                try:
                    wait_healthy([url])
                    time.sleep(1.0)
                    used = urls if policy else urls[:1]
                    load = os.getloadavg()
                    q0, h0 = prefix_counters(used)
                    res, dur = asyncio.run(shared_prefix(url, a, seed))
                    q1, h1 = prefix_counters(used)
                finally:
                    if rp is not None:
                        rp.stop()
                rep = report(res, dur)
                rep["output_tok_per_s"] = round(sum(r.output_tokens for r in res if r.ok) / dur, 1)
                rep["prefix_hit_rate"] = round((h1 - h0) / (q1 - q0), 3) if q1 > q0 else None
                out["dp"][label] = {"load": load, **rep}
                print(label, json.dumps(out["dp"][label]), flush=True)
        finally:
            for pr in procs:
                pr.stop()
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
