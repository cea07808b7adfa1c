"""Inputs and loads that used to stall or crash the server: a 10 MiB prompt beside a running stream, bodies
over the size limit, lone surrogates, unexpected exceptions (500 in OpenAI's shape), sequence-counted queue
bounds with Retry-After, out-of-vocabulary token ids and image parts."""
import json
import threading
import time

import httpx
import pytest

pytest.importorskip("openai")
from test_server import MODEL, LiveServer, metric_values  # noqa: E402
from test_server_ops import _fail_key, _wait  # noqa: E402

from frontierlm.server.security import SecurityOptions  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    # one sequence slot at a time would serialize the test; two slots and a queue of one sequence
    srv = LiveServer(tiny_model_dir("llama", max_position_embeddings=8192), max_queue=1, max_num_seqs=2)
    yield srv
    srv.stop()


class TimedStream:
    """A streaming completion read in a thread, with the arrival time of every event; `stop()` hangs up."""

    def __init__(self, url, body, path="/v1/completions"):
        self.times, self.events, self.status = [], [], None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(url + path, {**body, "stream": True}))
        self.thread.start()

    def _run(self, url, body):
        with httpx.stream("POST", url, json=body, timeout=120) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    self.times.append(time.perf_counter())
                    self.events.append(json.loads(line[6:]))
                if self._stop.is_set():
                    return

    def stop(self):
        self._stop.set()
        self.thread.join(60)

    def max_gap(self, start: float, end: float) -> float:
        ts = [t for t in self.times if start <= t <= end]
        edges = [start, *ts, end]
        return max(b - a for a, b in zip(edges, edges[1:]))


LONG = {"prompt": "Hello", "max_tokens": 8000, "ignore_eos": True}


def test_huge_prompt_does_not_stall_a_running_stream(server):
    stream = TimedStream(server.url, LONG)
    _wait(lambda: len(stream.times) >= 3)
    big = "word " * (2 * 2**20)  # 10 MiB
    t0 = time.perf_counter()
    health = []
    checker = threading.Thread(target=lambda: health.append(httpx.get(server.url + "/health", timeout=30)))
    checker.start()
    results = [httpx.post(server.url + "/v1/completions", json={"prompt": big, "max_tokens": 4}, timeout=120),
               httpx.post(server.url + "/v1/chat/completions", timeout=120,
                          json={"messages": [{"role": "user", "content": big}], "max_tokens": 4}),
               # short enough to pass the character check: really tokenized (on a worker thread), then too long
               httpx.post(server.url + "/v1/completions", json={"prompt": "wordy " * 20000, "max_tokens": 4},
                          timeout=120)]
    checker.join(30)
    t1 = time.perf_counter()
    time.sleep(0.3)
    gap = stream.max_gap(t0, t1)
    stream.stop()
    print(f"largest stream gap {gap:.3f}s while the big prompts took {t1 - t0:.2f}s")
    for r in results:
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
    assert results[0].json()["error"]["param"] == "prompt" and results[1].json()["error"]["param"] == "messages"
    assert "characters" in results[0].json()["error"]["message"]
    assert "characters" not in results[2].json()["error"]["message"]  # refused after tokenizing
    assert health and health[0].status_code == 200
    assert gap < 1.0, f"the stream stalled for {gap:.2f}s while the big prompts were handled ({t1 - t0:.1f}s)"
    assert stream.status == 200 and all("error" not in e for e in stream.events)
    server.wait_idle()


def test_tokenize_and_detokenize_run_off_the_loop(server):
    stream = TimedStream(server.url, LONG)
    _wait(lambda: len(stream.times) >= 3)
    big = "word " * (2 * 2**20)  # 10 MiB: refused by its characters, never tokenized
    fits = "word " * 1500  # tokenized on a worker thread, and counted
    t0 = time.perf_counter()
    health = []
    checker = threading.Thread(target=lambda: health.append(httpx.get(server.url + "/health", timeout=30)))
    checker.start()
    post = lambda path, body: httpx.post(server.url + path, json=body, timeout=120)
    huge = [post("/tokenize", {"prompt": big}), post("/tokenize", {"messages": [{"role": "user", "content": big}]}),
            post("/tokenize", {"prompt": "wordy " * 20000})]  # passes the character check, too long once tokenized
    counted = post("/tokenize", {"prompt": fits, "return_token_strs": True}).json()
    back = post("/detokenize", {"tokens": counted["tokens"]})
    checker.join(30)
    t1 = time.perf_counter()
    time.sleep(0.3)
    gap = stream.max_gap(t0, t1)
    stream.stop()
    for r, param in zip(huge, ("prompt", "messages", "prompt")):
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == param, r.text
    assert "characters" in huge[0].json()["error"]["message"] and "characters" not in huge[2].json()["error"]["message"]
    tok = server.engine.engine.tokenizer
    assert counted["tokens"] == tok.encode(fits) and counted["count"] == len(counted["tokens"]) > 1000
    assert counted["token_strs"] == tok.convert_ids_to_tokens(counted["tokens"])
    assert back.status_code == 200 and back.json()["prompt"] == fits
    assert health and health[0].status_code == 200
    assert gap < 1.0, f"the stream stalled for {gap:.2f}s while /tokenize was handled ({t1 - t0:.1f}s)"
    server.wait_idle()


def test_bad_words_are_tokenized_at_admission_not_on_the_engine_thread(server, monkeypatch):
    from frontierlm.engine import tokenizer as tokenizer_module

    tok = server.engine.engine.tokenizer
    word = "object"
    banned = tokenizer_module.bad_words_token_ids(tok, [word])
    assert all(len(ids) == 1 for ids in banned)  # single tokens: the bias alone would make them the output
    threads = []
    real_encode = tokenizer_module.encode
    monkeypatch.setattr(tokenizer_module, "encode",
                        lambda *a, **k: threads.append(threading.current_thread().name) or real_encode(*a, **k))
    body = {"prompt": "The", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logit_bias": {str(ids[0]): 100 for ids in banned}}
    biased = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]["text"]
    assert word in biased  # without the ban the bias writes the word
    r = httpx.post(server.url + "/v1/completions", json={**body, "bad_words": [word]})
    assert r.status_code == 200 and word not in r.json()["choices"][0]["text"], r.text
    assert threads and all(name.startswith("frontierlm-tokenize") for name in threads), threads
    for bad in ([""], ["x"] * 1025, "object"):
        r = httpx.post(server.url + "/v1/completions", json={**body, "bad_words": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "bad_words", r.text
    server.wait_idle()


def test_request_body_limit(tiny_model_dir):
    srv = LiveServer(tiny_model_dir("llama"), security=SecurityOptions(max_request_body_bytes=4096))
    try:
        before = metric_values(srv.url)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x" * 5000, "max_tokens": 2})
        err = r.json()["error"]
        assert r.status_code == 413 and err["code"] == "request_too_large" and "4096" in err["message"]
        assert set(err) == {"message", "type", "param", "code"}

        def chunks():  # no Content-Length: the limit applies as the body arrives
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'", "max_tokens": 2}'

        r = httpx.post(srv.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        assert httpx.post(srv.url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200
        after = metric_values(srv.url)
        assert after[_fail_key("request_too_large")] - before[_fail_key("request_too_large")] == 2
    finally:
        srv.stop()


SURROGATE_CASES = [  # (path, raw JSON body, the field the 400 must name)
    ("/v1/completions", '{"prompt": "abc\\ud800def", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": ["fine", "bad\\udfff"], "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x\\ud800"}], "max_tokens": 2}', "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user\\ud800", "content": "x"}], "max_tokens": 2}', "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udbff"}]}]}',
     "messages"),
    ("/v1/completions", '{"prompt": "x", "stop": ["\\ud800"]}', "stop"),
    ("/v1/completions", '{"prompt": "x", "logit_bias": {"\\ud800": 1}}', "logit_bias"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "response_format": '
     '{"type": "json_schema", "json_schema": "{\\"type\\": \\"object\\"}"}}', "response_format"),
    ("/v1/completions", '{"prompt": "x", "response_format": {"type": "json_schema", "json_schema": 5}}',
     "response_format"),
]


@pytest.mark.parametrize("path,body,param", SURROGATE_CASES)
def test_surrogates_and_string_schema_are_400s_naming_the_field(server, path, body, param):
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_out_of_vocab_ids_and_image_parts(server):
    vocab = server.engine.engine.model_config.vocab_size
    for body, param in (({"logit_bias": {str(vocab): 5}}, "logit_bias"), ({"logit_bias": {"99999999": 1}},
                        "logit_bias"), ({"stop_token_ids": [1, vocab]}, "stop_token_ids")):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        assert str(vocab) in r.json()["error"]["message"]
    ok = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2,
                                                          "logit_bias": {str(vocab - 1): 1}, "stop_token_ids": [0]})
    assert ok.status_code == 200
    for part in ({"type": "image_url", "image_url": {"url": "https://x.example/a.png"}},
                 {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}):
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [
            {"role": "user", "content": [{"type": "text", "text": "what is this?"}, part]}]})
        err = r.json()["error"]
        assert r.status_code == 400 and "this model takes text only" in err["message"] and err["param"] == "messages"


def test_unexpected_exceptions_answer_500_in_openai_shape(server, monkeypatch):
    from frontierlm.server import serving

    pool = server.app.state.ctx.tokenizer_pool
    before = metric_values(server.url)

    async def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(pool, "encode", broken)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 500
    err = r.json()["error"]
    rid = r.headers["x-request-id"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "internal_error"
    assert rid in err["message"] and "boom" not in err["message"]  # no internals leak
    monkeypatch.undo()
    # a failure after the 200 went out: the stream ends with an error event naming the request
    monkeypatch.setattr(serving, "completion_logprobs", lambda *a: 1 / 0)
    with httpx.stream("POST", server.url + "/v1/completions", json={
            "prompt": "hi", "max_tokens": 3, "logprobs": 1, "stream": True}) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
        rid = r.headers["x-request-id"]
    assert lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2][6:])["error"]
    assert err["type"] == "internal_error" and rid in err["message"]
    monkeypatch.undo()
    server.wait_idle()
    after = metric_values(server.url)
    assert after[_fail_key("internal")] - before[_fail_key("internal")] == 2
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_queue_bound_counts_sequences(server):
    ctx = server.app.state.ctx
    # two prompts that start at once in the two free slots: nothing waits, so max_queue=1 lets them in
    first = TimedStream(server.url, {**LONG, "prompt": ["Hello", "Hi"]})
    _wait(lambda: first.status == 200 and len(server.state()["running"]) == 2)
    second = TimedStream(server.url, {**LONG, "n": 1})  # waits: one sequence, the whole queue
    _wait(lambda: len(server.state()["waiting"]) == 1)
    assert second.status == 200 and ctx.admitting == 0
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
    # bigger than slots + queue: told why, with a 400, not to retry forever
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_sequences", r.text
    first.stop()
    second.stop()
    server.wait_idle()
    # on an idle server n=3 fills both slots and the queue's one place
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3, "n": 3, "ignore_eos": True})
    assert r.status_code == 200 and len(r.json()["choices"]) == 3
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 4})
    assert r.status_code == 400 and "--max-queue" in r.json()["error"]["message"]


def test_malloc_mmap_threshold_is_pinned_on_glibc(monkeypatch):
    import platform

    from frontierlm.server.launch import pin_malloc_mmap_threshold

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert pin_malloc_mmap_threshold() is (platform.libc_ver()[0] == "glibc")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # the operator's setting wins
    assert pin_malloc_mmap_threshold() is False
