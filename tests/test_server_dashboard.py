"""The /dashboard page in headless Chromium: it renders the block map, the request table and (MoE models) the
expert-load heatmap with live values; plus the MoE expert-load series of /dashboard/state and /metrics."""
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

pytest.importorskip("openai")
from test_server import MODEL, LiveServer, metric_values  # noqa: E402

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not found (Debian: apt-get "
                                                             "install chromium; .ci/run installs it)")


def _chromium(*args, timeout=60):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--virtual-time-budget=3000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _dom_text(dom: str, elem_id: str) -> str:
    m = re.search(rf'id="{elem_id}"[^>]*>([^<]*)<', dom)
    assert m, elem_id
    return m.group(1)


def _moe_series(url: str) -> tuple[dict, dict]:
    """/metrics -> ({(layer, expert): tokens}, {layer: imbalance}) of the MoE series."""
    tokens, imbalance = {}, {}
    for key, value in metric_values(url).items():
        labels = dict(re.findall(r'(\w+)="([^"]*)"', key))
        if key.startswith("frontierlm:moe_expert_tokens_total{"):
            assert labels["model_name"] == MODEL
            tokens[int(labels["layer"]), int(labels["expert"])] = value
        elif key.startswith("frontierlm:moe_expert_imbalance{"):
            imbalance[int(labels["layer"])] = value
    return tokens, imbalance


@needs_chromium
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
        metrics_text = httpx.get(srv.url + "/metrics").text
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
        return _dom_text(dom, elem_id)

    assert int(text("blocks-total")) == state["stats"]["num_blocks"]
    assert int(text("blocks-used")) >= 1  # the running request holds blocks
    assert int(text("blocks-free")) + int(text("blocks-used")) + int(text("blocks-cached")) == int(text("blocks-total"))
    assert int(text("num-running")) == 1
    assert f'data-request-id="{running_id}"' in dom and 'data-status="running"' in dom
    assert shot.exists() and shot.stat().st_size > 1000
    # a dense model: no expert load, the heatmap section stays hidden and /metrics has no MoE series
    assert state["expert_load"] == []
    assert re.search(r'<div id="expert-section"[^>]*hidden', dom)
    assert "moe_expert" not in metrics_text


# ---- MoE: one tiny qwen2_moe server (2 MoE layers x 8 experts, top-2), prefix caching off -------------------
PROMPTS = ["Hello there", "The quick brown fox jumps over", "1 2 3 4 5 6 7 8 9 10 11 12"]
MAX_TOKENS = 5


@pytest.fixture(scope="module")
def moe_server(tiny_model_dir):
    # no prefix caching: every prompt token goes through the experts, so the totals are exact
    srv = LiveServer(tiny_model_dir("qwen2_moe"), max_num_seqs=4, enable_prefix_caching=False)
    try:
        usage = srv.client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0,
                                              extra_body={"ignore_eos": True}).usage
        assert usage.completion_tokens == MAX_TOKENS * len(PROMPTS)
        # every prompt token is prefilled once; every sampled token but each request's last is fed back
        srv.routed_tokens = usage.prompt_tokens + usage.completion_tokens - len(PROMPTS)
        srv.wait_idle()
        yield srv
    finally:
        srv.stop()


def test_moe_expert_load_state_and_metrics(moe_server):
    state = moe_server.state()
    load = state["expert_load"]
    assert len(load) == 2 and all(len(row) == 8 for row in load)
    top_k = 2
    assert [sum(row) for row in load] == [moe_server.routed_tokens * top_k] * 2
    moe_layers = [0, 2]  # the model's own numbers: layer 1 is dense (mlp_only_layers=[1])
    assert state["expert_layers"] == moe_layers

    tokens, imbalance = _moe_series(moe_server.url)
    assert sorted(tokens) == [(layer, expert) for layer in moe_layers for expert in range(8)]
    assert [[tokens[layer, e] for e in range(8)] for layer in moe_layers] == load  # nothing ran in between
    assert sorted(imbalance) == moe_layers
    for layer, row in zip(moe_layers, load):
        assert imbalance[layer] == pytest.approx(max(row) / (sum(row) / len(row)))
        assert imbalance[layer] >= 1.0
    text = httpx.get(moe_server.url + "/metrics").text
    assert re.search(r"^# TYPE frontierlm:moe_expert_tokens(_total)? counter$", text, re.M)
    assert "# TYPE frontierlm:moe_expert_imbalance gauge" in text


@needs_chromium
def test_moe_dashboard_heatmap(moe_server, tmp_path):
    load = moe_server.state()["expert_load"]
    dom = _chromium("--dump-dom", moe_server.url + "/dashboard").stdout
    shot = Path(os.environ.get("FRONTIERLM_TEST_ARTIFACTS", tmp_path)) / "dashboard-moe.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    _chromium(f"--screenshot={shot}", "--window-size=1280,1000", moe_server.url + "/dashboard")

    assert 'data-ready="1"' in dom, dom[:2000]
    section = re.search(r'<div id="expert-section"[^>]*>', dom).group(0)
    assert "hidden" not in section
    canvas = re.search(r'<canvas id="expert-heatmap"[^>]*>', dom).group(0)
    assert 'data-layers="2"' in canvas and 'data-experts="8"' in canvas
    assert _dom_text(dom, "expert-layers") == "2" and _dom_text(dom, "expert-count") == "8"
    assert int(_dom_text(dom, "expert-tokens")) == sum(map(sum, load))
    shares = [n / sum(row) for row in load for n in row]
    assert _dom_text(dom, "expert-share-min") == f"{100 * min(shares):.1f}%"
    assert _dom_text(dom, "expert-share-max") == f"{100 * max(shares):.1f}%"
    worst = max(max(row) * len(row) / sum(row) for row in load)
    assert _dom_text(dom, "expert-imbalance").startswith(f"{worst:.2f}")
    assert _dom_text(dom, "expert-most").startswith("layer ") and _dom_text(dom, "expert-least").startswith("layer ")
    assert shot.exists() and shot.stat().st_size > 1000
