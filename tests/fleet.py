"""Instances in their own processes on loopback (`python -m frontierlm.cli serve`) and a router in a thread,
for the router and disaggregation tests."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx

MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Instance:
    """One `frontierlm serve` process."""

    def __init__(self, model_dir, kv=None, extra=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "frontierlm.cli", "serve", model_dir, "--port", str(self.port),
               "--served-model-name", MODEL, "--uvicorn-log-level", "warning", "--disable-log-requests",
               "--num-threads", "1", *extra]
        if kv is not None:
            cmd += ["--kv-transfer-config", json.dumps(kv)]
        self.cmd = cmd
        self.log = open(os.devnull, "w") if not os.environ.get("FLEET_LOGS") else None
        self.restart()

    def restart(self) -> None:
        """Start the process (again, after a kill: the same port and configuration)."""
        env = dict(os.environ, FRONTIERLM_LOG_LEVEL="WARNING", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout=240.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"{self.url} exited with {self.proc.returncode}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.url} not ready after {timeout}s")

    def state(self) -> dict:
        return httpx.get(self.url + "/dashboard/state", timeout=10).json()

    def kv_stats(self) -> dict:
        return self.state()["stats"]["kv_transfer"]

    def blocks_in_use(self) -> int:
        return self.state()["blocks"].count("1")

    def wait_no_blocks_in_use(self, timeout=15.0) -> int:
        deadline = time.time() + timeout
        while (n := self.blocks_in_use()) and time.time() < deadline:
            time.sleep(0.1)
        return n

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_all(instances) -> list:
    for inst in instances:
        inst.wait_ready()
    return instances


def pd_configs(num_decode=1, hold_timeout_s=30.0, connector="TorchDistributedConnector"):
    """kv_transfer_config for the prefill instance (which hosts its KV store at kv_port), then the decode
    instances (which find it through the kv_transfer_params)."""
    base = {"kv_connector": connector,
            "kv_connector_extra_config": {"hold_timeout_s": hold_timeout_s, "transfer_timeout_s": 5}}
    return [{**base, "kv_role": "kv_producer", "kv_port": free_port()}] + [
        {**base, "kv_role": "kv_consumer"} for _ in range(num_decode)]


class Router:
    """`frontierlm router`'s app in a uvicorn thread of the test process."""

    def __init__(self, **kwargs):
        import uvicorn

        from frontierlm.router.app import build_router_app

        kwargs.setdefault("health_interval", 0.2)
        self.app = build_router_app(**kwargs)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)

    def metric(self, name: str) -> float:
        """Sum of a router series over its label sets."""
        total = 0.0
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def requests_to(self, url: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith("frontierlm:router_requests_total{") and f'instance="{url}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
