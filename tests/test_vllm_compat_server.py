"""A vLLM user's server script, run unchanged against `frontierlm serve`: the flags they type, the routes they
call (the official openai client, /tokenize, /detokenize, /ping, /v1/models/{id}, the Responses API), and the
flags FrontierLM cannot honour yet, refused in one line."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
from frontierlm.assets import DEMO_MODEL  # noqa: E402
from frontierlm.cli import main  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python -m frontierlm.cli serve ...` in a subprocess; waits for its "ready" line."""

    def __init__(self, args: list[str], cwd=None, timeout: float = 120):
        self.port = _free_port()
        env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, "-m", "frontierlm.cli", "serve", *args, "--port",
                                      str(self.port), "--uvicorn-log-level", "warning"], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        deadline = time.time() + timeout
        self.ready = None
        while time.time() < deadline and self.proc.poll() is None:
            line = self.proc.stdout.readline()
            if line.startswith("ready:"):
                self.ready = line.strip()
                break
        assert self.ready, f"no ready line; stderr: {''.join(self.stderr)[-3000:]}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """A tiny model with sampling defaults in its generation_config.json (greedy, 5 new tokens)."""
    path = tmp_path_factory.mktemp("vllm-user") / "tiny-llama"
    shutil.copytree(tiny_model_dir("llama", max_position_embeddings=2048), path)
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 5,
                                                             "eos_token_id": 2}))
    return path


@pytest.fixture(scope="module")
def server(model_dir):
    template = model_dir.parent / "template.jinja"
    template.write_text((DEMO_MODEL / "chat_template.jinja").read_text())
    srv = ServeProcess(["--model", str(model_dir), "--served-model-name", "tiny", "tiny-alias",
                        "--chat-template", str(template), "--generation-config", "auto", "--max-logprobs", "3",
                        "--trust-remote-code", "--enforce-eager", "--disable-log-requests",
                        "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--tensor-parallel-size", "1",
                        "--kv-cache-dtype", "auto"])
    yield srv
    srv.stop()


def test_ready_line_names_and_models(server):
    assert server.ready == f"ready: serving tiny, tiny-alias at http://127.0.0.1:{server.port}/v1"
    assert [m.id for m in server.client.models.list().data] == ["tiny", "tiny-alias"]
    assert server.client.models.retrieve("tiny-alias").id == "tiny-alias"
    with pytest.raises(openai.NotFoundError):
        server.client.models.retrieve("gpt-4")
    assert httpx.get(server.url + "/ping").status_code == 200 and httpx.post(server.url + "/ping").status_code == 200
    # both names are served; responses carry the first
    r = server.client.completions.create(model="tiny-alias", prompt="The class", max_tokens=2)
    assert r.model == "tiny"
    assert not any("request cmpl" in line for line in server.stderr)  # --disable-log-requests


def test_generation_config_defaults_apply_unless_the_request_sets_them(server):
    r = server.client.completions.create(model="tiny", prompt="The class statement", extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5  # max_new_tokens; vLLM's default would be 16
    again = server.client.completions.create(model="tiny", prompt="The class statement",
                                             extra_body={"ignore_eos": True})
    assert again.choices[0].text == r.choices[0].text  # temperature 0 from generation_config: greedy
    r = server.client.completions.create(model="tiny", prompt="The class statement", max_tokens=7,
                                         extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 7


def test_max_logprobs(server):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, logprobs=True)
    r = server.client.chat.completions.create(top_logprobs=3, **kw)
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 3
    with pytest.raises(openai.BadRequestError, match="--max-logprobs"):
        server.client.chat.completions.create(top_logprobs=4, **kw)


def test_tokenize_detokenize(server):
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny", "prompt": "The class statement"}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 2048
    back = httpx.post(server.url + "/detokenize", json={"model": "tiny", "tokens": r["tokens"]}).json()
    assert back["prompt"].endswith("The class statement")
    msgs = [{"role": "user", "content": "hi"}]
    chat = httpx.post(server.url + "/tokenize", json={"model": "tiny", "messages": msgs}).json()
    text = httpx.post(server.url + "/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert text == "<|user|>hi<|end|><|assistant|>"
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10 ** 9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_responses_api_plain_and_streamed(server):
    r = server.client.responses.create(model="tiny", input="Tell me about classes", instructions="Be brief.",
                                       max_output_tokens=6, temperature=0)
    assert r.object == "response" and r.status in ("completed", "incomplete")
    assert r.output_text and r.usage.output_tokens <= 6 and r.usage.input_tokens > 0
    events = list(server.client.responses.create(model="tiny", input=[{"role": "user", "content": "Tell me about "
                                                                      "classes"}], instructions="Be brief.",
                                                 max_output_tokens=6, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == r.output_text == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        server.client.responses.create(model="tiny", input="x", previous_response_id="resp_1")


def test_tools_with_the_vllm_flags(server):
    tools = [{"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}}}]
    r = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "pick"}],
                                              tools=tools, tool_choice="required", max_tokens=200, temperature=1,
                                              seed=0)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "pick" and 0 <= json.loads(call.function.arguments)["n"] <= 9


def test_model_id_is_model_as_typed_and_inline_template(model_dir):
    srv = ServeProcess(["tiny-llama", "--generation-config", "vllm", "--chat-template",
                        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"], cwd=model_dir.parent)
    try:
        assert [m.id for m in srv.client.models.list().data] == ["tiny-llama"]
        r = srv.client.completions.create(model="tiny-llama", prompt="The class", extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 16  # generation_config ignored: the OpenAI default
        deadline = time.time() + 10  # requests are logged by default (the reader thread may lag a little)
        while not any("request cmpl" in line for line in srv.stderr) and time.time() < deadline:
            time.sleep(0.05)
        assert any("request cmpl" in line and "max_tokens=16" in line for line in srv.stderr)
        ids = httpx.post(srv.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        assert httpx.post(srv.url + "/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"] == "[hi]"
    finally:
        srv.stop()


@pytest.mark.parametrize("flags,message", [
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size 2: tensor parallelism (one device per server) is "
                                      "not supported yet"),
    (["--kv-cache-dtype", "fp4"], "kv_cache_dtype must be one of auto, fp8, fp8_e4m3, fp8_e5m2, got 'fp4'"),
    (["--quantization", "gptq"], "quantization must be None (the checkpoint's own) or one of"),
    (["--generation-config", "/nonexistent"], "--generation-config: /nonexistent is not 'auto', 'vllm' or a"),
    (["--chat-template", "missing.jinja"], "--chat-template: missing.jinja is neither a file nor"),
    (["--model", "elsewhere"], "the model is given twice"),
])
def test_bad_serve_flags_exit_2_with_one_line(model_dir, capsys, flags, message):
    assert main(["serve", str(model_dir), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_packaged_model_is_served_as_demo():
    from frontierlm.cli import _build_parser
    from frontierlm.server.args import resolve_model
    from frontierlm.server.launch import serve_options

    args = _build_parser().parse_args(["serve"])
    resolve_model(args)
    args.model = str(DEMO_MODEL)  # what main() fills in when no MODEL is named
    options = serve_options(args)
    assert options.served_model_names == ["demo"] and options.sampling_defaults == {}
    assert "<tool_call>" in (DEMO_MODEL / "chat_template.jinja").read_text()
