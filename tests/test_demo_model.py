"""The demo model and its draft that ship inside the package (frontierlm/assets): they load, match transformers,
are really trained, and are what FrontierLM serves when no model is named."""
from __future__ import annotations

import json
import math

import pytest
import torch

from frontierlm import LLM, SamplingParams
from frontierlm.assets import DEMO_DRAFT, DEMO_MODEL
from frontierlm.cli import main
from frontierlm.config import ModelConfig
from frontierlm.models.loader import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Held-out code: written for this test, so neither the stdlib corpus nor its validation split holds it.
TEXT = '''def moving_average(values, window):
    """Return the mean of every run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    total = sum(values[:window])
    averages = [total / window]
    for i in range(window, len(values)):
        total += values[i] - values[i - window]
        averages.append(total / window)
    return averages
'''
# Demo model v1 (trained on python-docs) completed 0 of the first 12 held-out headers below to a function that
# parses (benchmarks/demo_model_eval.py, greedy, 128 tokens; 0 of 50 there); v2 must do better. Recorded, not tuned.
V1_VALID_OF_12 = 0
PPL_BOUND = 80  # v2 measured 34.4 on TEXT (115 tokens); v1 scored prose, not code


def _tokens(model_dir) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).encode(TEXT)


@torch.inference_mode()
def _nll_per_token(model, ids: list[int]) -> float:
    x = torch.tensor([ids])
    logits = model.compute_logits(model(x, torch.arange(len(ids))[None]))[0]
    return torch.nn.functional.cross_entropy(logits[:-1].float(), x[0, 1:]).item()


def test_packaged_models_are_small_bf16_hf_directories():
    total = 0
    for d in (DEMO_MODEL, DEMO_DRAFT):
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["dtype"] == "bfloat16" and (d / "tokenizer.json").is_file()
        total += sum(f.stat().st_size for f in d.iterdir())
    assert json.loads((DEMO_MODEL / "config.json").read_text())["architectures"] == ["DeepseekV3ForCausalLM"]
    assert total < 80 * 2**20


def test_demo_model_is_trained_and_matches_transformers():
    from transformers import AutoModelForCausalLM

    mc = ModelConfig.from_pretrained(DEMO_MODEL, torch.float32)
    ours = load_model(mc)
    assert ours.num_mtp_layers == 1 and mc.is_mla
    ids = _tokens(DEMO_MODEL)
    nll = _nll_per_token(ours, ids)
    assert math.exp(nll) < PPL_BOUND  # a uniform guess over 4,096 tokens would be 4,096
    hf = AutoModelForCausalLM.from_pretrained(str(DEMO_MODEL), dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
        got = ours.compute_logits(ours(torch.tensor([ids]), torch.arange(len(ids))[None]))[0]
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=0)


def test_draft_shares_the_tokenizer_and_follows_the_demo():
    assert (DEMO_DRAFT / "tokenizer.json").read_text() == (DEMO_MODEL / "tokenizer.json").read_text()
    demo = load_model(ModelConfig.from_pretrained(DEMO_MODEL, torch.float32))
    draft = load_model(ModelConfig.from_pretrained(DEMO_DRAFT, torch.float32))
    ids = torch.tensor([_tokens(DEMO_MODEL)])
    pos = torch.arange(ids.shape[1])[None]
    with torch.inference_mode():
        a = demo.compute_logits(demo(ids, pos))[0].argmax(-1)
        b = draft.compute_logits(draft(ids, pos))[0].argmax(-1)
    assert (a == b).float().mean() > 0.4  # the distilled draft often guesses what the demo model would


def test_demo_completes_heldout_functions_more_often_than_v1():
    from frontierlm.train.code_eval import completes_to_valid_python, function_headers, heldout_stdlib_docs

    headers = function_headers(heldout_stdlib_docs(), 12)
    outs = LLM(None, dtype="float32").generate(headers, SamplingParams(temperature=0, max_tokens=128),
                                                 use_tqdm=False)
    valid = sum(completes_to_valid_python(h, o.outputs[0].text) for h, o in zip(headers, outs))
    print(f"demo model: {valid} of {len(headers)} held-out function headers completed to valid Python")
    assert valid > V1_VALID_OF_12


def test_generate_without_a_model_uses_the_demo(capsys):
    assert main(["generate", "--prompt", "def fibonacci(n):", "--max-tokens", "12", "--temperature", "0",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = LLM().generate(["def fibonacci(n):"], SamplingParams(max_tokens=12, temperature=0),
                              use_tqdm=False)[0].outputs[0].text
    assert out["outputs"][0]["text"] == expected and len(expected.strip()) > 0


def test_expert_load_leaves_out_the_mtp_module_and_uses_layer_numbers():
    """Layer 0 is dense (first_k_dense_replace=1), 1-3 are MoE; the MTP module (layers.4) never runs in a
    forward pass, so it has no row, on the dashboard or in /metrics."""
    llm = LLM(None, block_size=16)
    engine = llm.llm_engine
    assert engine.runner.model.num_mtp_layers == 1
    llm.generate(["def fibonacci(n):"], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert engine.expert_layers() == [1, 2, 3]
    load = engine.expert_load()
    assert len(load) == 3 and all(sum(row) > 0 for row in load)
