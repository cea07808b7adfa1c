"""Disaggregated prefill / decode across processes on loopback: a prefill instance (kv_producer), decode
instances (kv_consumer) and the router, moving KV blocks over torch.distributed (gloo). The oracle is the
colocated engine's greedy output; the decode instances' transfer counters prove the blocks really moved."""
import json
import threading
import time

import httpx
import pytest

from fleet import MODEL, Instance, Router, pd_configs, start_all

pytestmark = pytest.mark.usefixtures("one_thread")

SHARED = ("The class statement defines a new class. The import system finds modules and loads them. "
          "A generator function returns an iterator. ")
BLOCK = 16


_ORACLES: dict = {}


def _oracle(model_dir):
    from frontierlm import LLM

    return _ORACLES.get(model_dir) or _ORACLES.setdefault(model_dir, LLM(model_dir, enforce_eager=True))


def colocated(model_dir, prompts, max_tokens, **kw):
    """The colocated engine's greedy tokens (one engine per model, kept for the module)."""
    from frontierlm import SamplingParams

    llm = _oracle(model_dir)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)
    outs = llm.generate(prompts, params, use_tqdm=False)
    tok = llm.llm_engine.tokenizer
    return [o.outputs[0].token_ids for o in outs], [len(tok.encode(p)) for p in prompts]


def _mooncake_missing() -> str | None:
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except ImportError as e:
        return f"Mooncake's transfer engine is not importable here ({e})"
    return None


@pytest.fixture(scope="module")
def fleets(tiny_model_dir):
    """Dense: one prefill, two decodes; MLA (DeepSeek-V2): one prefill, one decode. Started together."""
    dense, mla = tiny_model_dir("llama"), tiny_model_dir("deepseek_v2")
    dense_kv, mla_kv = pd_configs(num_decode=2, hold_timeout_s=5), pd_configs(num_decode=1, hold_timeout_s=5)
    out = {"dense": [Instance(dense, kv) for kv in dense_kv], "mla": [Instance(mla, kv) for kv in mla_kv]}
    if _mooncake_missing() is None:  # started beside the others, so the start-ups overlap
        out["mooncake"] = [Instance(dense, kv) for kv in pd_configs(1, connector="MooncakeConnector")]
    try:
        for group in out.values():
            start_all(group)
        routers = {name: Router(prefills=[g[0].url], decodes=[i.url for i in g[1:]], policy="round_robin")
                   for name, g in out.items()}
        yield {name: (g, routers[name], mla if name == "mla" else dense) for name, g in out.items()}
        for r in routers.values():
            r.stop()
    finally:
        for group in out.values():
            for inst in group:
                inst.stop()


def _complete(url, prompt, max_tokens, **kw):
    r = httpx.post(url + "/v1/completions", timeout=120, json={
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True, **kw})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _received(decodes) -> int:
    return sum(d.kv_stats()["blocks_received"] for d in decodes)


@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_disaggregated_greedy_equals_colocated(fleets, kind):
    (prefill, *decodes), router, model_dir = fleets[kind]
    prompt = SHARED * 2 + "Tell me about classes."
    (want,), (n,) = colocated(model_dir, [prompt], 12)
    r0 = _received(decodes)
    assert _complete(router.url, prompt, 12) == want
    assert _received(decodes) - r0 == (n - 1) // BLOCK > 3  # every whole prompt block came from the prefill side
    out: dict = {}
    _stream_tokens(router.url, prompt, 12, out)
    assert out["ids"] == want and out.get("done")
    stats = [d.kv_stats() for d in decodes]
    assert all(s["local_prefill_fallbacks"] == 0 and s["failures"] == 0 for s in stats), stats
    assert sum(s["bytes_received"] for s in stats) > 0
    assert prefill.wait_no_blocks_in_use() == 0  # sent blocks are given back at once, unneeded ones released
    assert all(d.wait_no_blocks_in_use() == 0 for d in decodes)


@pytest.mark.parametrize("kind", ["dense", "mla"])
def test_second_request_with_the_prefix_sends_fewer_blocks(fleets, kind):
    (prefill, *decodes), _, model_dir = fleets[kind]
    router = Router(prefills=[prefill.url], decodes=[decodes[0].url])  # one decode: the prefix is there
    try:
        base = SHARED * 3
        second = base + "and a different second question, a little longer than the first"
        (want1, want2), (n1, n2) = colocated(model_dir, [base + "first question", second], 6)
        r0 = decodes[0].kv_stats()["blocks_received"]
        assert _complete(router.url, base + "first question", 6) == want1
        sent1 = decodes[0].kv_stats()["blocks_received"] - r0
        assert _complete(router.url, second, 6) == want2
        sent2 = decodes[0].kv_stats()["blocks_received"] - r0 - sent1
        assert 0 < sent2 < sent1, (sent1, sent2)
        last = decodes[0].kv_stats()["recent"][-1]
        assert last["blocks"] == sent2 and last["blocks"] + last["skipped"] == (n2 - 1) // BLOCK
        text = httpx.get(decodes[0].url + "/metrics").text  # the counters are in /metrics too
        assert "frontierlm:kv_transfer_blocks_received_total" in text
        assert "frontierlm:time_per_output_token_seconds_count" in text  # each role has TTFT, TPOT and ITL
        assert prefill.wait_no_blocks_in_use() == 0 and decodes[0].wait_no_blocks_in_use() == 0
    finally:
        router.stop()


def test_concurrent_disaggregated_streams_equal_colocated(fleets):
    (prefill, *decodes), router, model_dir = fleets["dense"]
    prompts = [f"Stream {i}: " + SHARED * 2 + f"question number {i}" for i in range(6)]
    wants, _ = colocated(model_dir, prompts, 10)
    before = [d.kv_stats() for d in decodes]
    outs = [{} for _ in prompts]
    threads = [threading.Thread(target=_stream_tokens, args=(router.url, p, 10, o)) for p, o in zip(prompts, outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [o.get("ids") for o in outs] == wants and all(o.get("done") for o in outs)
    after = [d.kv_stats() for d in decodes]
    assert sum(a["transfers"] - b["transfers"] for a, b in zip(after, before)) == len(prompts)
    assert all(a["failures"] == b["failures"] and a["local_prefill_fallbacks"] == b["local_prefill_fallbacks"]
               for a, b in zip(after, before)), after
    assert prefill.wait_no_blocks_in_use() == 0 and all(d.wait_no_blocks_in_use() == 0 for d in decodes)


def _stream_tokens(url, prompt, max_tokens, out: dict, **kw):
    out["ids"], out["events"] = [], []
    with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
            "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True, **kw}) as r:
        out["status"] = r.status_code
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                out["events"].append(event)
                if event.get("choices"):
                    out["ids"] += event["choices"][0].get("token_ids", [])
            elif line == "data: [DONE]":
                out["done"] = True


def test_decode_instance_dies_mid_stream_and_the_stream_moves(fleets):
    (prefill, *decodes), router, model_dir = fleets["dense"]
    prompt = SHARED + "Write a long answer."
    (want,), _ = colocated(model_dir, [prompt], 200)
    out: dict = {}
    t = threading.Thread(target=_stream_tokens, args=(router.url, prompt, 200, out))
    t.start()
    deadline = time.time() + 60
    while len(out.get("ids", ())) < 5 and time.time() < deadline:
        time.sleep(0.01)
    serving = [d for d, i in zip(decodes, router.app.state.router.targets) if i.in_flight]
    assert len(serving) == 1, "one decode instance serves the stream"
    serving[0].kill()
    t.join(120)
    assert not t.is_alive() and out.get("done"), out.get("events", [])[-3:]
    assert not any("error" in e for e in out["events"])
    assert out["ids"] == want  # one stream, the colocated tokens
    assert router.metric("frontierlm:router_migrations_total") == 1
    survivor = next(d for d in decodes if d is not serving[0])
    assert survivor.wait_no_blocks_in_use() == 0 and prefill.wait_no_blocks_in_use() == 0
    # the KV group still works between the survivors
    r0 = survivor.kv_stats()["blocks_received"]
    (want2,), _ = colocated(model_dir, ["A brand new prompt. " * 6], 5)
    assert _complete(router.url, "A brand new prompt. " * 6, 5) == want2
    assert survivor.kv_stats()["blocks_received"] > r0


def test_prefill_instance_dies_the_decode_side_prefills_and_frees(fleets):
    (prefill, *decodes), router, model_dir = fleets["dense"]
    survivor = next(d for d in decodes if d.proc.poll() is None)
    prompt = SHARED * 2 + "held, then lost"
    (want,), _ = colocated(model_dir, [prompt], 6)
    # the prefill instance answers, then dies before the decode instance pulls
    r = httpx.post(prefill.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
    params = r.json()["kv_transfer_params"]
    assert params["do_remote_prefill"] and params["num_blocks"] > 3
    prefill.kill()
    before = survivor.kv_stats()
    r = httpx.post(survivor.url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True, "kv_transfer_params": params})
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want
    after = survivor.kv_stats()
    assert after["local_prefill_fallbacks"] == before["local_prefill_fallbacks"] + 1
    assert after["failures"] == before["failures"] + 1
    # through the router: the prefill leg fails, the decode instance prefills itself, within a bound
    t0 = time.time()
    assert _complete(router.url, prompt + " again", 6) is not None
    assert time.time() - t0 < 30
    assert router.metric("frontierlm:router_local_prefill_fallbacks_total") >= 1
    assert survivor.wait_no_blocks_in_use() == 0
    assert httpx.get(router.url + "/health").status_code == 200  # the router survives


def _wait_routed_healthy(router, timeout=30.0):
    deadline = time.time() + timeout
    while not all(i.healthy for i in router.app.state.instances) and time.time() < deadline:
        time.sleep(0.1)
    assert all(i.healthy for i in router.app.state.instances), router.app.state.instances


def test_dead_instances_rejoin_and_serve_disaggregated_again(fleets):
    (prefill, *decodes), router, model_dir = fleets["dense"]
    dead = [i for i in (prefill, *decodes) if i.proc.poll() is not None]  # the tests before killed two
    dead = dead or [prefill, decodes[0]]
    for inst in dead:
        if inst.proc.poll() is None:
            inst.kill()
    routed = {i.url: i for i in router.app.state.instances}
    deadline = time.time() + 30
    while any(routed[i.url].healthy for i in dead) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(routed[i.url].healthy for i in dead), "the router saw them die"
    for inst in dead:
        inst.restart()
    start_all(dead)
    _wait_routed_healthy(router)  # the router's health polls take them back
    fallbacks = router.metric("frontierlm:router_local_prefill_fallbacks_total")
    before = [d.kv_stats() for d in decodes]
    prompts = [f"Restart {i}: " + SHARED * 2 for i in range(4)]  # nothing any prefix cache holds
    wants, _ = colocated(model_dir, prompts, 6)
    assert [_complete(router.url, p, 6) for p in prompts] == wants
    after = [d.kv_stats() for d in decodes]
    # round robin: each decode instance (the restarted one too) pulled from the restarted prefill instance
    assert all(a["transfers"] - b["transfers"] == 2 for a, b in zip(after, before)), (before, after)
    assert all(a["local_prefill_fallbacks"] == b["local_prefill_fallbacks"] for a, b in zip(after, before))
    assert router.metric("frontierlm:router_local_prefill_fallbacks_total") == fallbacks
    assert prefill.wait_no_blocks_in_use() == 0 and all(d.wait_no_blocks_in_use() == 0 for d in decodes)


def test_a_moved_stream_keeps_the_text_its_dead_instance_held_back(fleets):
    """A stop string whose prefix matches from a tenth of the text on: the instance holds every character
    after that back until the request ends, so when it dies mid-stream it dies holding text."""
    (prefill, *decodes), router, model_dir = fleets["dense"]
    prompt, max_tokens = SHARED + "Hold this back.", 200
    from frontierlm import SamplingParams

    llm = _oracle(model_dir)
    want = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    stop = want.text[len(want.text) // 10:] + "\u2603"
    out: dict = {}
    t = threading.Thread(target=_stream_tokens, args=(router.url, prompt, max_tokens, out), kwargs={"stop": [stop]})
    t.start()
    deadline = time.time() + 60
    while len(out.get("ids", ())) < 40 and time.time() < deadline:  # past a tenth: text is being held
        time.sleep(0.01)
    serving = [d for d, i in zip(decodes, router.app.state.router.targets) if i.in_flight]
    assert len(serving) == 1 and len(out["ids"]) < max_tokens
    migrations = router.metric("frontierlm:router_migrations_total")
    serving[0].kill()
    t.join(120)
    assert not t.is_alive() and out.get("done") and not any("error" in e for e in out["events"])
    assert router.metric("frontierlm:router_migrations_total") == migrations + 1
    assert out["ids"] == list(want.token_ids)
    assert "".join(c.get("text") or "" for e in out["events"] for c in e.get("choices") or []) == want.text
    survivor = next(d for d in decodes if d is not serving[0])
    assert survivor.wait_no_blocks_in_use() == 0 and prefill.wait_no_blocks_in_use() == 0


@pytest.mark.skipif(_mooncake_missing() is not None, reason=str(_mooncake_missing()))
def test_mooncake_transport_moves_the_same_blocks(fleets):
    (prefill, decode), router, model_dir = fleets["mooncake"]
    prompt = SHARED * 2 + "over Mooncake"
    (want,), (n,) = colocated(model_dir, [prompt], 8)
    assert _complete(router.url, prompt, 8) == want
    st = decode.kv_stats()
    assert st["blocks_received"] == (n - 1) // BLOCK and st["failures"] == 0
    assert prefill.wait_no_blocks_in_use() == 0 and decode.wait_no_blocks_in_use() == 0
