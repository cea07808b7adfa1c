"""Structured outputs through the server: vLLM's older guided_* fields, json_object as an object, a refused
keyword as a 400 naming it, and the per-backend request counter in /metrics."""
import json

import httpx
import pytest

from test_server import MODEL, LiveServer, metric_values

pytest.importorskip("openai")
pytest.importorskip("xgrammar")
pytest.importorskip("llguidance")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    srv = LiveServer(tiny_model_dir("llama"))
    yield srv
    srv.stop()


def _completion(server, **body):
    return httpx.post(server.url + "/v1/completions",
                      json={"model": MODEL, "prompt": "x", "max_tokens": 24, "temperature": 1.0, **body}, timeout=60)


def test_guided_fields_are_aliases(server):
    r = _completion(server, seed=1, guided_choice=["left", "right"])
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("left", "right")
    r = _completion(server, seed=2, guided_regex="[ab]{3}")
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in {a + b + c for a in "ab" for b in "ab"
                                                                      for c in "ab"}
    r = _completion(server, seed=3, guided_grammar='root ::= "<" [0-9] ">" | ')
    assert r.json()["choices"][0]["text"] in [""] + [f"<{d}>" for d in range(10)]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = server.client.completions.create(model=MODEL, prompt="x", max_tokens=24, seed=4,
                                         extra_body={"guided_json": schema})
    assert isinstance(json.loads(r.choices[0].text)["ok"], bool)
    r = _completion(server, guided_regex="a", guided_choice=["b"])
    assert r.status_code == 400 and "only one of" in r.json()["error"]["message"]


def test_json_object_answers_an_object(server):
    for seed in range(4):
        r = server.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "json"}], max_tokens=24, seed=seed, temperature=1.0,
            response_format={"type": "json_object"})
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_refused_keyword_is_a_400_naming_it(server):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    r = server.client.with_options(max_retries=0).chat.completions.with_raw_response
    with pytest.raises(Exception) as err:
        r.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8,
                 response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    assert getattr(err.value, "status_code", None) == 400
    message = err.value.body["message"]
    assert "'uniqueItems' at #/properties/tags" in message


def test_backend_counter_in_metrics(server):
    before = metric_values(server.url)
    key = 'frontierlm:structured_output_requests_total{backend="%s",model_name="%s"}'
    r = _completion(server, seed=5, json_schema={"allOf": [{"type": "integer"}, {"minimum": 3}]})
    assert r.status_code == 200
    r = _completion(server, seed=6, grammar='root ::= "a" .')
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("a")
    server.wait_idle()
    after = metric_values(server.url)
    assert after[key % ("guidance", MODEL)] == before[key % ("guidance", MODEL)] + 1
    assert after[key % ("xgrammar", MODEL)] == before[key % ("xgrammar", MODEL)] + 1
