"""The /dashboard page in headless Chromium: it renders the block map and the request table with live values."""
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

pytest.importorskip("openai")
from test_server import LiveServer  # noqa: E402

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not found (Debian: apt-get install "
                                                          "chromium; .ci/run installs it)")


def _chromium(*args, timeout=60):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--virtual-time-budget=3000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_dashboard_renders_live_state(tiny_model_dir, tmp_path):
    srv = LiveServer(tiny_model_dir("llama", max_position_embeddings=8192), max_num_seqs=4)  # outlasts the page load
    stop = threading.Event()

    def long_stream():
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"prompt": "Hello " * 20, "max_tokens": 8000, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    t = threading.Thread(target=long_stream)
    t.start()
    try:
        deadline = 100
        while not srv.state()["running"] and deadline:
            deadline -= 1
            threading.Event().wait(0.05)
        state = srv.state()
        running_id = state["running"][0]["id"]
        dom = _chromium("--dump-dom", srv.url + "/dashboard").stdout
        shot = Path(os.environ.get("FRONTIERLM_TEST_ARTIFACTS", tmp_path)) / "dashboard.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        _chromium(f"--screenshot={shot}", "--window-size=1280,1000", srv.url + "/dashboard")
    finally:
        stop.set()
        t.join(30)
        srv.stop()

    assert 'data-ready="1"' in dom, dom[:2000]

    def text(elem_id):
        m = re.search(rf'id="{elem_id}"[^>]*>([^<]*)<', dom)
        assert m, elem_id
        return m.group(1)

    assert int(text("blocks-total")) == state["stats"]["num_blocks"]
    assert int(text("blocks-used")) >= 1  # the running request holds blocks
    assert int(text("blocks-free")) + int(text("blocks-used")) + int(text("blocks-cached")) == int(text("blocks-total"))
    assert int(text("num-running")) == 1
    assert f'data-request-id="{running_id}"' in dom and 'data-status="running"' in dom
    assert shot.exists() and shot.stat().st_size > 1000
