"""`frontierlm serve --speculative-config JSON` end to end: the official openai client gets the tokens a
non-speculative engine gives, /metrics carries vLLM's spec_decode counters with exact values on a scripted run,
the start-up and shutdown lines report speculation, and a bad config is refused with one line naming the field."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from frontierlm import LLM, SamplingParams
from test_server import metric_values

openai = pytest.importorskip("openai")


def _serve(model, *extra):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "frontierlm.cli", "serve", model, "--port", str(port),
                             "--served-model-name", "tiny", "--uvicorn-log-level", "warning", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, FRONTIERLM_LOG_LEVEL="INFO"))
    return proc, f"http://127.0.0.1:{port}"


def test_bad_speculative_config_refused_with_one_line(tiny_model_dir):
    proc, _ = _serve(tiny_model_dir("llama"), "--speculative-config", '{"method": "eagle", "num_speculative_tokens": 2}')
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert out.strip().splitlines() == [out.strip()] and "speculative_config.method" in out
    assert "Traceback" not in out


def test_serve_with_speculation_exact_metrics(tiny_model_dir):
    model = tiny_model_dir("llama")
    # the target as its own draft and K pinned: every greedy proposal is accepted, so the counts are known
    spec = {"method": "draft_model", "model": model, "num_speculative_tokens": 3, "adaptive": False}
    proc, url = _serve(model, "--speculative-config", json.dumps(spec))
    prompts, max_tokens = ["Hello there", "The class statement"], 10
    ref = LLM(model).generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                              use_tqdm=False)
    try:
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        for prompt, r in zip(prompts, ref):  # one at a time: the rounds per request are then scripted
            c = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert c.choices[0].text == r.outputs[0].text
            assert c.usage.completion_tokens == max_tokens
        m = metric_values(url)
        # per request: the prefill gives token 1; rounds of 3 accepted proposals + 1 give tokens 2-5 and 6-9;
        # token 10 is a plain decode (max_tokens leaves no room to propose)
        lab = '{model_name="tiny"}'
        assert m["frontierlm:spec_decode_num_drafts_total" + lab] == 4
        assert m["frontierlm:spec_decode_num_draft_tokens_total" + lab] == 12
        assert m["frontierlm:spec_decode_num_accepted_tokens_total" + lab] == 12
        for pos in range(3):
            assert m[f'frontierlm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="tiny",position="{pos}"}}'] == 4
        state = httpx.get(url + "/dashboard/state").json()
        assert state["stats"]["spec_decode"]["mean_accepted_length"] == 4.0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert "speculative decoding: draft_model" in out  # the start-up line
    assert "speculative decoding: 4 drafts, 12 draft tokens, acceptance 100.0%, mean accepted length 4.00" in out
