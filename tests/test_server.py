"""The OpenAI-compatible server against the official `openai` client: a real uvicorn on 127.0.0.1 in a thread."""
import json
import socket
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

MODEL = "tiny"


class LiveServer:
    def __init__(self, model_dir, max_queue=None, request_timeout=None, options=None, security=None,
                 **engine_kwargs):
        import uvicorn

        from frontierlm.engine.async_engine import AsyncEngine
        from frontierlm.engine.llm_engine import LLMEngine
        from frontierlm.server.api import build_app

        self.engine = AsyncEngine(lambda: LLMEngine.from_engine_args(model_dir, **engine_kwargs)).start()
        self.app = build_app(self.engine, MODEL, max_queue=max_queue, request_timeout=request_timeout,
                             options=options, security=security)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        self.engine.wait_ready(60)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.shutdown()

    def state(self) -> dict:
        return httpx.get(self.url + "/dashboard/state").json()

    def wait_idle(self, timeout=10.0) -> dict:
        """Poll until nothing runs or waits and no KV block is held; returns the last state."""
        deadline = time.time() + timeout
        while True:
            st = self.state()
            if not st["running"] and not st["waiting"] and "1" not in st["blocks"]:
                return st
            assert time.time() < deadline, f"server not idle: {st['running']} {st['waiting']}"
            time.sleep(0.05)


def metric_values(url: str) -> dict:
    """Prometheus text -> {'name{labels}': value} (labels in exposition order)."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    srv = LiveServer(tiny_model_dir("llama"))
    yield srv
    srv.stop()


def test_models_health_version(server):
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/version").json()["version"]


def test_completion_and_its_stream_agree(server):
    kw = dict(model=MODEL, prompt="The class statement", max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True})
    r = server.client.completions.create(**kw)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    prompt_ids = server.engine.engine.tokenizer.encode("The class statement")
    assert r.usage.prompt_tokens == len(prompt_ids)
    from frontierlm import LLM, SamplingParams

    offline = LLM(server.engine.engine.config.model).generate(
        ["The class statement"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert r.choices[0].text == offline[0].outputs[0].text
    chunks = list(server.client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_prompt_forms_and_n(server):
    r = server.client.completions.create(model=MODEL, prompt=["Hello", "import os"], n=2, max_tokens=3,
                                         extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 12
    r = server.client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens == 3
    r = server.client.completions.create(model=MODEL, prompt=[[5, 6], [7, 8, 9]], max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens == 5 and len(r.choices) == 2


def test_chat_stream_n_and_logprobs(server):
    msgs = [{"role": "user", "content": "hello"}]
    r = server.client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=5, n=2,
                                              logprobs=True, top_logprobs=3, temperature=0.8,
                                              extra_body={"ignore_eos": True})
    assert len(r.choices) == 2 and r.usage.completion_tokens == 10
    for c in r.choices:
        assert c.message.role == "assistant" and c.finish_reason == "length"
        assert len(c.logprobs.content) == 5
        assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in c.logprobs.content)
    stream = server.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True})
    parts = [c.choices[0].delta for c in stream]
    assert parts[0].role == "assistant"
    whole = server.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                                  extra_body={"ignore_eos": True})
    assert "".join(p.content or "" for p in parts) == whole.choices[0].message.content


def test_completion_logprobs(server):
    r = server.client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, logprobs=2, temperature=0,
                                         extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    # greedy: the sampled token is the most likely one
    assert all(abs(max(top.values()) - t) < 1e-5 for top, t in zip(lp.top_logprobs, lp.token_logprobs))


def test_stop_string(server):
    base = server.client.completions.create(model=MODEL, prompt="The def", max_tokens=20, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].text
    stop = base[6:9]
    assert stop.strip(), base
    r = server.client.completions.create(model=MODEL, prompt="The def", max_tokens=20, temperature=0, stop=[stop],
                                         extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.text == base[:base.index(stop)]


def test_seed_reproducible_and_extra_body(server):
    kw = dict(model=MODEL, prompt="Hello", max_tokens=12, temperature=1.0,
              extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1,
                          "typical_p": 0.95, "min_tokens": 2, "stop_token_ids": [], "priority": -1})
    a = server.client.completions.create(seed=123, **kw).choices[0].text
    b = server.client.completions.create(seed=123, **kw).choices[0].text
    c = server.client.completions.create(seed=321, **kw).choices[0].text
    assert a == b and a != c
    m = server.client.completions.create(model=MODEL, prompt="Hello", max_tokens=6, seed=1, presence_penalty=0.5,
                                         frequency_penalty=0.5, user="u1", logit_bias={"42": 100},
                                         extra_body={"mirostat_mode": 2, "mirostat_tau": 3.0, "mirostat_eta": 0.2,
                                                     "ignore_eos": True})
    # a +100 bias makes token 42 near-certain; Mirostat is on but must keep the sampled token
    toks = server.engine.engine.tokenizer.decode([42])
    assert m.choices[0].text.startswith(toks)


def test_nested_extra_body_object(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3,
                                                         "extra_body": {"ignore_eos": True, "min_tokens": 3}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_disconnect_mid_stream_frees_blocks(server):
    before = metric_values(server.url)
    key = f'frontierlm:request_failure_total{{model_name="{MODEL}",reason="client_disconnect"}}'
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"prompt": "Hello", "max_tokens": 400, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data: {") for x in got)
        assert server.state()["running"], "the request should be running while we read"
    st = server.wait_idle()
    assert st["stats"]["num_free_blocks"] == st["stats"]["num_blocks"]
    assert metric_values(server.url)[key] == before[key] + 1
    # non-streaming client that hangs up: aborted as well
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 480, "ignore_eos": True},
                   timeout=0.3)
    server.wait_idle()
    assert metric_values(server.url)[key] == before[key] + 2


def test_sse_wire_format(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [x for x in r.iter_lines() if x]
    assert events[-1] == "data: [DONE]"
    body = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(b["object"] == "chat.completion.chunk" for b in body)
    assert all(b["usage"] is None for b in body[:-1]) and body[-1]["usage"]["completion_tokens"] <= 2


def test_bench_serve_against_the_server(server, tmp_path, capsys):
    from frontierlm.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "serve", "--base-url", server.url, "--model", MODEL, "--num-requests", "6",
               "--request-rate", "50", "--input-len", "12", "--output-len", "5", "--max-concurrency", "4",
               "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--json-out", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["completed"] == 6 and rep["failed"] == 0
    assert rep["total_output_tokens"] == 30 and rep["total_input_tokens"] == 72
    assert rep["goodput"] == pytest.approx(rep["request_throughput"])
    assert rep["ttft_ms"]["p50"] > 0 and rep["tpot_ms"]["p99"] >= rep["tpot_ms"]["p50"]
    assert "TTFT" in capsys.readouterr().out


def test_constrained_output_through_the_api(server):
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = server.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "answer"}], max_tokens=40, seed=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content)["ok"], bool)
    r = server.client.completions.create(model=MODEL, prompt="pick", max_tokens=10, seed=1,
                                         extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert r.choices[0].text in ("left", "right")
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 20,
                                                         "grammar": 'root ::= "a" "b"+'})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("ab")
    for bad in ({"grammar": "root ::= ("}, {"structured_outputs": {"regex": "(x"}},
                {"response_format": {"type": "xml"}}, {"grammar": 'root ::= "a"', "json_schema": schema}):
        r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", **bad})
        assert r.status_code == 400 and r.json()["error"]["message"], bad
