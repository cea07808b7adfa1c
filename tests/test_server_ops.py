"""Server limits and operations: every error status and shape, queue bound, timeout, metrics, loading, SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("openai")
from test_server import MODEL, LiveServer, metric_values  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    # one sequence at a time, so a second request waits and a third finds the queue full
    # a long context, so that long requests outlast the test's checks however fast the machine is
    srv = LiveServer(tiny_model_dir("llama", max_position_embeddings=8192), max_queue=1, max_num_seqs=1)
    yield srv
    srv.stop()


def _stream_in_thread(url, body, result: dict, stop: threading.Event | None = None) -> threading.Thread:
    """Stream a completion in a thread into result["status"] / result["events"]; setting `stop` hangs up."""
    def run():
        events = result["events"] = []
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            result["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                if stop is not None and stop.is_set():
                    return
    t = threading.Thread(target=run)
    t.start()
    return t


def _wait(cond, timeout=10.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.02)


def _fail_key(reason):
    return f'frontierlm:request_failure_total{{model_name="{MODEL}",reason="{reason}"}}'


BAD = [  # (body, expected param or code)
    ('{"prompt": "x", "max_tokens": 2', "invalid_json"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": 7}, "prompt"),
    ({"prompt": "x", "top_p": 3}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "presence_penalty": 5}, "presence_penalty"),
    ({"prompt": "x", "extra_body": {"top_k": -5}}, "top_k"),
    ({"prompt": "x", "mirostat_mode": 3}, "mirostat_mode"),
    ({"prompt": "x", "n": 129}, "n"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "model": "gpt-4"}, "model_not_found"),
    ({"prompt": "x", "max_tokens": 9000}, "context_length_exceeded"),
    ({"prompt": [1, 2, 99999]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["ok", "word " * 9000]}, "context_length_exceeded"),
]


def test_errors_and_limits_do_not_disturb_a_running_request(server):
    before = metric_values(server.url)
    good, waiting = {}, {}
    stop_good = threading.Event()
    t_good = _stream_in_thread(server.url, {"prompt": "Hello", "max_tokens": 8000, "ignore_eos": True}, good,
                               stop=stop_good)
    _wait(lambda: server.state()["running"])
    t_wait = _stream_in_thread(server.url, {"prompt": "Hi", "max_tokens": 5, "ignore_eos": True}, waiting)
    _wait(lambda: server.state()["waiting"])
    # the queue (one waiting request) is full
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    for body, expect in BAD:
        kw = {"content": body} if isinstance(body, str) else {"json": body}
        r = httpx.post(server.url + "/v1/completions", headers={"content-type": "application/json"}, **kw)
        err = r.json()["error"]
        assert r.status_code == 400, (body, r.text)
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert expect in (err["param"], err["code"]), (body, err)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                              "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                              "tools": [{"type": "function"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"  # a tool without its function
    assert httpx.get(server.url + "/v1/nope").json()["error"]["type"] == "not_found_error"
    server.app.state.ctx.shutting_down = True
    try:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert httpx.get(server.url + "/health").status_code == 503
    finally:
        server.app.state.ctx.shutting_down = False
    # the long request streamed through all of it undisturbed; hang it up so the waiting one runs and completes
    assert server.state()["running"][0]["output_tokens"] > 0
    stop_good.set()
    t_good.join(60)
    t_wait.join(60)
    assert good["status"] == 200 and len(good["events"]) > 1
    assert all("error" not in e and e["choices"][0]["finish_reason"] is None for e in good["events"])
    assert waiting["events"][-1]["choices"][0]["finish_reason"] == "length"
    server.wait_idle()
    after = metric_values(server.url)
    assert after[_fail_key("invalid_request")] - before[_fail_key("invalid_request")] == len(BAD) + 3
    assert after[_fail_key("client_disconnect")] - before[_fail_key("client_disconnect")] == 1
    assert after[_fail_key("queue_full")] - before[_fail_key("queue_full")] == 1
    assert after[_fail_key("shutting_down")] - before[_fail_key("shutting_down")] == 1


def test_request_timeout(server):
    before = metric_values(server.url)
    server.app.state.ctx.request_timeout = 0.3
    try:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 8000, "ignore_eos": True})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        res = {}
        _stream_in_thread(server.url, {"prompt": "x", "max_tokens": 8000, "ignore_eos": True}, res).join(30)
        assert res["status"] == 200 and res["events"][-1]["error"]["code"] == "timeout"
    finally:
        server.app.state.ctx.request_timeout = None
    server.wait_idle()
    assert metric_values(server.url)[_fail_key("timeout")] - before[_fail_key("timeout")] == 2


def test_metrics_match_a_known_set_of_requests(server):
    c = server.client
    first = c.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=1, temperature=0)
    first_id = server.engine.engine.tokenizer.encode(first.choices[0].text, add_special_tokens=False)
    server.wait_idle()
    before = metric_values(server.url)
    c.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=5, extra_body={"ignore_eos": True})
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    chat_prompt = chunks[-1].usage.prompt_tokens
    stopped = c.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=5, temperature=0,
                                   extra_body={"stop_token_ids": first_id[:1]})
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
    st = server.wait_idle()
    after = metric_values(server.url)
    lab = f'{{model_name="{MODEL}"}}'

    def delta(name):
        return after[name] - before.get(name, 0.0)

    assert delta(f'frontierlm:request_success_total{{finished_reason="length",model_name="{MODEL}"}}') == 2
    assert delta(f'frontierlm:request_success_total{{finished_reason="stop",model_name="{MODEL}"}}') == 1
    assert delta("frontierlm:prompt_tokens_total" + lab) == 3 + chat_prompt + 3
    assert delta("frontierlm:generation_tokens_total" + lab) == 5 + 4 + 1
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(f"frontierlm:{h}_count" + lab) == 3, h
    assert delta("frontierlm:inter_token_latency_seconds_count" + lab) == 4 + 3 + 0
    assert after["frontierlm:num_requests_running" + lab] == 0
    assert after["frontierlm:num_requests_waiting" + lab] == 0
    assert after["frontierlm:kv_cache_usage_perc" + lab] == 0
    assert after["frontierlm:prefix_cache_queries_total" + lab] == st["stats"]["prefix_cache_queries"]
    assert after["frontierlm:prefix_cache_hits_total" + lab] == st["stats"]["prefix_cache_hits"]
    assert after["frontierlm:num_preemptions_total" + lab] == st["stats"]["num_preemptions"]


def test_health_is_503_while_loading(tiny_model_dir):
    from frontierlm.engine.async_engine import AsyncEngine
    from frontierlm.engine.llm_engine import LLMEngine
    from frontierlm.server.api import build_app
    from fastapi.testclient import TestClient

    gate = threading.Event()
    d = tiny_model_dir("llama")

    def slow_factory():
        gate.wait(30)
        return LLMEngine.from_engine_args(d)

    engine = AsyncEngine(slow_factory).start()
    try:
        client = TestClient(build_app(engine, MODEL))
        assert client.get("/health").status_code == 503
        r = client.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        gate.set()
        engine.wait_ready(30)
        assert client.get("/health").json() == {"status": "ok"}
    finally:
        gate.set()
        engine.shutdown()


def test_sigterm_finishes_short_requests_aborts_long_ones_exits_0(tiny_model_dir, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, FRONTIERLM_LOG_LEVEL="WARNING")
    # a long context, so the long request cannot finish within the grace period however fast the machine is
    model = tiny_model_dir("llama", max_position_embeddings=8192)
    proc = subprocess.Popen([sys.executable, "-m", "frontierlm.cli", "serve", model, "--port",
                             str(port), "--served-model-name", MODEL, "--shutdown-grace", "1.0",
                             "--max-num-seqs", "4", "--uvicorn-log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(lambda: _healthy(url), timeout=60)
        short, long_ = {}, {}
        ts = _stream_in_thread(url, {"prompt": "Hi", "max_tokens": 3, "ignore_eos": True}, short)
        tl = _stream_in_thread(url, {"prompt": "Hi", "max_tokens": 8000, "ignore_eos": True,
                                     "stream_options": {"include_usage": True}}, long_)
        _wait(lambda: long_.get("status") == 200 and short.get("status") == 200)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503
        ts.join(30)
        tl.join(30)
        assert proc.wait(30) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert short["events"][-1]["choices"][0]["finish_reason"] == "length", short["events"][-1]
    assert long_["events"][-2].get("error", {}).get("code") == "shutdown", long_["events"][-3:]  # then usage
    assert "usage" in long_["events"][-1]


def _healthy(url) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_cancelled_engine_call_does_not_kill_the_loop(tiny_model_dir):
    """A caller that stops waiting (client gone, timeout) cancels its future while the command is queued;
    the engine thread must run the command and carry on instead of dying on InvalidStateError."""
    import asyncio

    from frontierlm.engine.async_engine import AsyncEngine
    from frontierlm.engine.llm_engine import LLMEngine

    engine = AsyncEngine(lambda: LLMEngine.from_engine_args(tiny_model_dir("llama"))).start()
    try:
        engine.wait_ready(30)
        ran = threading.Event()

        async def scenario():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(engine.call(lambda e: (time.sleep(0.3), ran.set())), 0.05)
            await asyncio.sleep(0.5)
            return await engine.call(lambda e: e.has_unfinished_requests())

        assert asyncio.run(scenario()) is False
        assert ran.is_set() and engine.dead is None
    finally:
        engine.shutdown()
