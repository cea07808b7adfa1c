"""`frontierlm router` over instances in their own processes: the official openai client through it, each
policy, health (dead and draining instances), retry before the first token, instances killed under load, and
a structured-output stream that survives its instance's death."""
import json
import re
import threading
import time

import httpx
import pytest

from fleet import MODEL, Instance, Router, free_port, start_all

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_thread")

PREFIX = ("The import system finds modules and loads them; a package is a directory of modules. " * 3)


@pytest.fixture(scope="module")
def workers(tiny_model_dir):
    insts = [Instance(tiny_model_dir("llama")) for _ in range(3)]
    try:
        yield start_all(insts)
    finally:
        for inst in insts:
            inst.stop()


def _complete(url, prompt, max_tokens=6, **kw):
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw})
    return r


def _stream(url, body: dict, out: dict, path="/v1/completions"):
    out.update(events=[], text="", done=False)
    try:
        with httpx.stream("POST", url + path, timeout=120, json={"model": MODEL, "stream": True, **body}) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    out["done"] = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    out["events"].append(event)
                    for c in event.get("choices") or []:
                        out["text"] += c.get("text") or (c.get("delta") or {}).get("content") or ""
    except httpx.HTTPError as e:
        out["exception"] = repr(e)


def test_openai_client_through_the_router(workers):
    router = Router(workers=[w.url for w in workers[:2]], policy="round_robin")
    try:
        client = openai.OpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL]
        kw = dict(model=MODEL, prompt="The class statement", max_tokens=8, temperature=0,
                  extra_body={"ignore_eos": True})
        direct = openai.OpenAI(base_url=workers[0].url + "/v1", api_key="none", max_retries=0)
        want = direct.completions.create(**kw).choices[0].text
        assert client.completions.create(**kw).choices[0].text == want
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].usage.completion_tokens == 8
        assert not any("token_ids" in (c.choices[0].model_extra or {}) for c in chunks if c.choices)
        msgs = [{"role": "user", "content": "hello"}]
        whole = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
        parts = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                                    stream=True))
        assert parts[0].choices[0].delta.role == "assistant"
        assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.choices[0].message.content
        # errors keep OpenAI's shape: the instance's 400 passes through, the router's own too
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=MODEL, prompt="x", max_tokens=10**6)
        assert e.value.body["code"] == "context_length_exceeded"
        r = httpx.post(router.url + "/v1/completions", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = _complete(router.url, "x", kv_transfer_params={"do_remote_decode": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "kv_transfer_params"
        assert "frontierlm:router_time_to_first_token_seconds_count" in httpx.get(router.url + "/metrics").text
        assert router.metric("frontierlm:router_time_to_first_token_seconds_count") >= 2
    finally:
        router.stop()


def test_round_robin_spreads_requests(workers):
    router = Router(workers=[w.url for w in workers], policy="round_robin")
    try:
        for i in range(6):
            assert _complete(router.url, f"prompt {i}", 2).status_code == 200
        assert [router.requests_to(w.url) for w in workers] == [2, 2, 2]
    finally:
        router.stop()


def test_cache_aware_keeps_a_prefix_on_one_instance(workers):
    router = Router(workers=[w.url for w in workers], policy="cache_aware")
    try:
        hits0 = [w.state()["stats"]["prefix_cache_hits"] for w in workers]
        for tail in ("one", "two", "three", "four"):
            assert _complete(router.url, PREFIX + tail, 2).status_code == 200
        counts = [router.requests_to(w.url) for w in workers]
        assert sorted(counts) == [0, 0, 4], counts
        home = workers[counts.index(4)]
        assert home.state()["stats"]["prefix_cache_hits"] - hits0[counts.index(4)] >= 3 * (len(PREFIX) // 8)
        # an unrelated prompt goes elsewhere (an instance whose cache holds nothing of it)
        assert _complete(router.url, "Something else entirely, long enough to be chunked " * 2, 2).status_code == 200
        assert router.requests_to(home.url) == 4
    finally:
        router.stop()


def test_cache_aware_forgets_a_restarted_instance(workers):
    from frontierlm.router.policies import chunk_hashes

    router = Router(workers=[w.url for w in workers[:2]], policy="cache_aware")
    try:
        assert _complete(router.url, PREFIX + "before", 2).status_code == 200
        home = next(w for w in workers[:2] if router.requests_to(w.url) == 1)
        inst = next(i for i in router.app.state.instances if i.url == home.url)
        policy, hashes = router.app.state.router.policy, chunk_hashes(PREFIX, 32)
        assert policy.match(inst, hashes) == len(hashes)
        old_id = inst.start_id
        assert old_id
        home.kill()
        home.restart()
        home.wait_ready()
        deadline = time.time() + 30
        while not (inst.healthy and inst.start_id != old_id) and time.time() < deadline:
            time.sleep(0.05)
        assert inst.healthy and inst.start_id != old_id and inst.restarts == 1
        assert policy.match(inst, hashes) == 0  # the new process caches none of the prefix
    finally:
        router.stop()


def test_restart_detection_and_the_policy_forgetting():
    """A new start id on /health is a restart even with no failed poll between; an instance that reports no
    start id counts as restarted when healthy again after failing; one that failed and came back with the same
    id did not restart (a busy spell), and cache_aware keeps what it knows of it."""
    import asyncio

    from frontierlm.router.instances import HealthMonitor, Instance as Inst
    from frontierlm.router.policies import CacheAware, chunk_hashes
    from frontierlm.server.middleware import START_ID_HEADER

    answers = []  # (status, start id or None), one per /health poll

    def app(request: httpx.Request):
        if request.url.path == "/metrics":
            return httpx.Response(200, text="")
        status, sid = answers.pop(0)
        return httpx.Response(status, json={"status": "ok" if status == 200 else "error"},
                              headers={START_ID_HEADER: sid} if sid else {})

    async def polls(inst, script):
        answers[:] = script
        async with httpx.AsyncClient(transport=httpx.MockTransport(app)) as client:
            monitor = HealthMonitor([inst], client)
            for _ in script:
                await monitor.poll(inst)

    ca = CacheAware()
    ca_hashes = chunk_hashes(PREFIX, ca.chunk_chars)
    a, b = Inst("http://a", "worker"), Inst("http://b", "worker")
    asyncio.run(polls(a, [(200, "one"), (503, "one"), (200, "one")]))
    asyncio.run(polls(b, [(200, None)]))
    for inst in (a, b):
        ca.on_routed(inst, PREFIX)
    assert a.restarts == 0 and ca.match(a, ca_hashes) == len(ca_hashes)
    asyncio.run(polls(a, [(200, "two")]))  # restarted between two polls: only the id tells
    assert a.restarts == 1 and a.healthy and ca.match(a, ca_hashes) == 0
    assert ca.choose([a, b], PREFIX + "more") is b  # b still holds the prefix
    asyncio.run(polls(b, [(503, None), (200, None)]))
    assert b.restarts == 1 and ca.match(b, ca_hashes) == 0
    ca.on_routed(a, PREFIX)  # learning starts again after the restart
    assert ca.match(a, ca_hashes) == len(ca_hashes) and ca.choose([a, b], PREFIX + "more") is a


def test_least_loaded_avoids_a_busy_instance(workers):
    router = Router(workers=[w.url for w in workers], policy="least_loaded")
    busy = [{} for _ in range(3)]  # long streams straight to the first instance (not through the router)
    threads = [threading.Thread(target=_stream, args=(workers[0].url, {"prompt": "x", "max_tokens": 500,
                                                                        "ignore_eos": True}, b)) for b in busy]
    for t in threads:
        t.start()
    try:
        inst = router.app.state.instances[0]
        deadline = time.time() + 30
        while inst.num_running < 1 and time.time() < deadline:  # its own gauge, as polled by the router
            time.sleep(0.05)
        assert inst.num_running >= 1
        for i in range(4):
            assert _complete(router.url, f"short {i}", 2).status_code == 200
        assert router.requests_to(workers[0].url) == 0
        assert router.requests_to(workers[1].url) + router.requests_to(workers[2].url) == 4
        assert all(b.get("status") == 200 for b in busy)
    finally:
        router.stop()
        for t in threads:
            t.join(120)


def test_policy_rules_and_health_states():
    import asyncio

    from frontierlm.router.instances import HealthMonitor, Instance as Inst, parse_gauges
    from frontierlm.router.policies import CacheAware, make_policy

    a, b = Inst("http://a", "worker", healthy=True), Inst("http://b", "worker", healthy=True)
    ca = CacheAware(balance_abs=4)
    ca.on_routed(a, PREFIX)
    assert ca.choose([a, b], PREFIX + "more") is a
    a.num_waiting = 20  # out of balance: the cache no longer decides
    assert ca.choose([a, b], PREFIX + "more") is b
    with pytest.raises(ValueError, match="--policy must be one of"):
        make_policy("random")
    assert parse_gauges('frontierlm:num_requests_running{model_name="m"} 3.0\n'
                        'frontierlm:kv_cache_usage_perc{model_name="m"} 0.5\n') == {"num_running": 3.0,
                                                                                   "kv_usage": 0.5}

    def app(request: httpx.Request):  # an instance that is shutting down, answering over real httpx
        if request.url.path == "/health":
            return httpx.Response(503, json={"status": "shutting_down"})
        return httpx.Response(404)

    async def poll():
        async with httpx.AsyncClient(transport=httpx.MockTransport(app)) as client:
            inst = Inst("http://draining", "worker", healthy=True)
            await HealthMonitor([inst], client).poll(inst)
            return inst

    inst = asyncio.run(poll())
    assert inst.draining and not inst.available


def test_one_retry_helper_serves_plain_requests_and_the_prefill_leg():
    """router/proxy.py's post_with_retry, under both Router.complete and the prefill leg (router/disagg.py):
    a retryable status moves the request once to another instance; past that, the last answer (or the local-
    prefill fallback) stands."""
    import asyncio

    from frontierlm.router import disagg
    from frontierlm.router.instances import Instance as Inst
    from frontierlm.router.metrics import RouterMetrics
    from frontierlm.router.proxy import Router as Proxy

    status = {"http://p1": 503, "http://p2": 200, "http://d1": 503, "http://d2": 503}
    seen = []

    def app(request: httpx.Request):
        url = f"http://{request.url.host}"
        seen.append(url)
        body = {"kv_transfer_params": {"transfer_id": 7}} if url.startswith("http://p") else {"ok": url}
        return httpx.Response(status[url], json=body)

    async def run():
        insts = [Inst(u, "prefill" if u[7] == "p" else "decode", healthy=True) for u in status]
        async with httpx.AsyncClient(transport=httpx.MockTransport(app)) as client:
            metrics = RouterMetrics(insts)
            proxy = Proxy([], insts[:2], insts[2:], "round_robin", client, metrics)
            body = await disagg.prefill(proxy, "/v1/completions", {"prompt": "x"}, "x")
            assert body["kv_transfer_params"] == {"transfer_id": 7} and seen == ["http://p1", "http://p2"]
            status["http://p2"] = 500
            assert "kv_transfer_params" not in await disagg.prefill(proxy, "/v1/completions", {"prompt": "x"}, "x")
            plain = Proxy(insts[2:], [], [], "round_robin", client, metrics)  # plain data parallel
            answer = await plain.complete("/v1/completions", {"prompt": "x"}, "x")
            assert answer.status_code == 503 and seen[-2:] == ["http://d1", "http://d2"]  # the last answer stands
            return metrics

    metrics = asyncio.run(run())
    text = metrics.render()[0].decode()
    assert "frontierlm:router_retries_total 3.0" in text  # one per call
    assert "frontierlm:router_local_prefill_fallbacks_total 1.0" in text


def test_no_healthy_instance_is_a_503():
    router = Router(workers=[f"http://127.0.0.1:{free_port()}"])  # nothing listens there
    try:
        r = _complete(router.url, "hi")
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_instance"
        assert httpx.get(router.url + "/health").status_code == 503
    finally:
        router.stop()


def test_retry_once_elsewhere_before_the_first_token(workers):
    dead = f"http://127.0.0.1:{free_port()}"
    for stream in (False, True):
        router = Router(workers=[dead, workers[0].url], policy="round_robin", health_interval=60)
        try:
            stale = router.app.state.instances[0]
            stale.healthy = True  # it answered its last poll, then died: the request finds out itself
            if stream:
                out: dict = {}
                _stream(router.url, {"prompt": "retry me", "max_tokens": 3}, out)
                assert out["status"] == 200 and out["done"] and out["text"]
            else:
                assert _complete(router.url, "retry me", 2).status_code == 200
            assert not stale.healthy
            assert router.metric("frontierlm:router_retries_total") == 1
            # nothing left to retry on: an OpenAI-shaped 503, not a hang
            stale.healthy, router.app.state.instances[1].healthy = True, False
            r = _complete(router.url, "no one", 2)
            assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        finally:
            router.stop()


def test_instance_killed_under_load(workers, tiny_model_dir):
    # health polls far apart: requests find the dead instance themselves and are retried elsewhere
    router = Router(workers=[w.url for w in workers], policy="round_robin", health_interval=60)
    try:
        want = _complete(workers[0].url, PREFIX, 120, return_token_ids=True).json()["choices"][0]["token_ids"]
        outs = [{} for _ in range(6)]
        threads = [threading.Thread(target=_stream, args=(router.url, {
            "prompt": PREFIX, "max_tokens": 120, "temperature": 0, "ignore_eos": True, "return_token_ids": True},
            out)) for out in outs]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while sum(len(o.get("events", ())) > 3 for o in outs) < 6 and time.time() < deadline:
            time.sleep(0.01)
        victim = workers[2]
        victim.kill()
        later = [_complete(router.url, f"after the kill {i}", 3) for i in range(6)]
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a stream hangs"
        assert all(r.status_code == 200 for r in later), [r.text for r in later if r.status_code != 200]
        for out in outs:  # each stream completed (resumed where its instance died) or ended with an error
            assert out.get("done"), out
            ids = [t for e in out["events"] for c in e.get("choices") or [] for t in c.get("token_ids", [])]
            assert ids == want or any("error" in e for e in out["events"])
        assert router.metric("frontierlm:router_migrations_total") >= 1
        assert httpx.get(router.url + "/health").status_code == 200
        assert all(w.wait_no_blocks_in_use() == 0 for w in workers[:2])
    finally:
        router.stop()


def test_structured_stream_survives_its_instance_dying(workers):
    live = [w for w in workers if w.proc.poll() is None]
    router = Router(workers=[w.url for w in live], policy="round_robin")
    pattern = "(ab|cd|ef|gh){80}"
    body = {"prompt": "Letters:", "max_tokens": 200, "temperature": 0, "structured_outputs": {"regex": pattern}}
    try:
        want = httpx.post(live[0].url + "/v1/completions", timeout=120,
                          json={"model": MODEL, **body}).json()["choices"][0]["text"]
        assert re.fullmatch(pattern, want)
        out: dict = {}
        t = threading.Thread(target=_stream, args=(router.url, body, out))
        t.start()
        deadline = time.time() + 60
        while len(out.get("text", "")) < 20 and time.time() < deadline:
            time.sleep(0.01)
        serving = [w for w, i in zip(live, router.app.state.router.targets) if i.in_flight]
        assert len(serving) == 1
        serving[0].kill()
        t.join(120)
        assert out.get("done") and not any("error" in e for e in out["events"]), out["events"][-3:]
        assert out["text"] == want  # the grammar went on where it stopped, on the other instance
        assert router.metric("frontierlm:router_migrations_total") == 1
        survivor = next(w for w in live if w is not serving[0])
        assert survivor.wait_no_blocks_in_use() == 0
    finally:
        router.stop()


def test_cli_mistakes_are_one_line(tiny_model_dir):
    import subprocess
    import sys

    cases = [(["router", "--worker", "localhost:1"], "must start with http://"),
             (["router", "--worker", "http://a", "--decode", "http://b"], "not both"),
             (["router", "--prefill", "http://a"], "at least one --prefill and one --decode"),
             (["serve", tiny_model_dir("llama"), "--kv-transfer-config", '{"kv_role": "kv_sender"}'],
              "kv_role must be one of kv_producer, kv_consumer, kv_both"),
             (["serve", tiny_model_dir("llama"), "--kv-transfer-config", '{"kv_rnak": 1}'],
              "did you mean 'kv_rank'")]
    for argv, message in cases:
        r = subprocess.run([sys.executable, "-m", "frontierlm.cli", *argv], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and message in r.stderr, (argv, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
