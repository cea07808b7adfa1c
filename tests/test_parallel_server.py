"""`frontierlm serve` with parallel ranks: tensor parallelism behind the official openai client, a killed worker
(errors, /health 503, the server exits), and a two-"node" launch on loopback (two launchers, env rendezvous)."""
import os
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from frontierlm import LLM, SamplingParams
from test_vllm_compat_server import ServeProcess, _free_port

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "The class statement"


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    """Greedy text of the single-process engine: what every layout must serve."""
    llm = LLM(tiny_model_dir("llama"))
    return llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].text


def _complete(srv):
    return srv.client.completions.create(model=srv.model, prompt=PROMPT, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text


def _workers(proc) -> list[psutil.Process]:
    return [c for c in psutil.Process(proc.pid).children(recursive=True) if "frontierlm.distributed.worker" in
            " ".join(c.cmdline())]


def test_tp2_server_then_a_killed_worker(tiny_model_dir, expected, monkeypatch):
    monkeypatch.setenv("FRONTIERLM_DIST_TIMEOUT_S", "30")
    d = tiny_model_dir("llama")
    srv = ServeProcess([d, "--tensor-parallel-size", "2", "--num-threads", "1"])
    srv.model = d
    try:
        assert _complete(srv) == expected
        assert httpx.get(srv.url + "/health").status_code == 200
        (worker,) = _workers(srv.proc)
        worker.kill()
        deadline = time.time() + 20
        while httpx.get(srv.url + "/health").status_code != 503:
            assert time.time() < deadline, "the server did not notice the dead worker"
            time.sleep(0.1)
        import openai

        with pytest.raises((openai.APIStatusError, openai.APIConnectionError)) as err:  # or already exited
            _complete(srv)
        if isinstance(err.value, openai.APIStatusError):
            assert err.value.status_code == 503 and "engine died" in str(err.value)
        assert srv.proc.wait(30) == 1
        assert "worker" in "".join(srv.stderr) and "rank 1" in "".join(srv.stderr)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def test_two_node_launch_on_loopback(tiny_model_dir, expected, monkeypatch):
    """Node 1 runs its rank (pipeline stage 1), node 0 serves; both meet at --master-addr:--master-port."""
    monkeypatch.setenv("FRONTIERLM_DIST_TIMEOUT_S", "60")
    d, port = tiny_model_dir("llama"), _free_port()
    flags = ["--pipeline-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port",
             str(port), "--num-threads", "1"]
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    node1 = subprocess.Popen([sys.executable, "-m", "frontierlm.cli", "serve", d, *flags, "--node-rank", "1"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        srv = ServeProcess([d, *flags, "--node-rank", "0"])
        srv.model = d
        assert _complete(srv) == expected
        srv.stop()
        assert node1.wait(30) == 0
        assert "node 1 of 2: ranks 1-1 of 2" in node1.stdout.read()
    finally:
        for p in (node1, getattr(locals().get("srv"), "proc", None)):
            if p is not None and p.poll() is None:
                p.kill()
