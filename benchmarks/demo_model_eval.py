"""The demo model's card figures: held-out stdlib bits per byte and perplexity, the rate at which greedy
completions of held-out function headers parse, and the draft's acceptance rate against its target.

    python benchmarks/demo_model_eval.py --model v2=frontierlm/assets/demo --model v1=runs/demo-v1 \
        --draft frontierlm/assets/draft --headers 50 --max-tokens 128
One JSON line per model (and one for the draft); run it with the models' dtype as shipped (bfloat16 weights are
upcast to float32 here, as `LLM(dtype="float32")` does).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from frontierlm import LLM, SamplingParams
from frontierlm.config import ModelConfig
from frontierlm.models.loader import load_model
from frontierlm.train.code_eval import (bits_per_byte, completes_to_valid_python, function_headers,
                                        heldout_stdlib_docs, heldout_stdlib_text)


def evaluate(name: str, path: str, headers: list[str], text: str, max_tokens: int) -> dict:
    from transformers import AutoTokenizer

    model = load_model(ModelConfig.from_pretrained(path, torch.float32)).eval()
    ce = bits_per_byte(model, AutoTokenizer.from_pretrained(path), text)
    del model
    llm = LLM(path, dtype="float32")
    t0 = time.perf_counter()
    outs = llm.generate(headers, SamplingParams(temperature=0, max_tokens=max_tokens))
    seconds = time.perf_counter() - t0
    valid = sum(completes_to_valid_python(h, o.outputs[0].text) for h, o in zip(headers, outs))
    sample = llm.generate(["def fibonacci(n):\n"], SamplingParams(temperature=0, max_tokens=64))[0].outputs[0].text
    return {"model": name, "path": path, **{k: round(v, 4) if isinstance(v, float) else v for k, v in ce.items()},
            "headers": len(headers), "valid_python": valid, "valid_rate": round(valid / len(headers), 3),
            "generate_s": round(seconds, 1), "fibonacci": "def fibonacci(n):\n" + sample}


def draft_acceptance(target: str, draft: str, headers: list[str], max_tokens: int, k: int) -> dict:
    llm = LLM(target, dtype="float32",
              speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": k,
                                  "adaptive": False})  # the draft's quality, not the K policy's choice
    llm.generate(headers, SamplingParams(temperature=0, max_tokens=max_tokens))
    stats = llm.llm_engine.get_stats()["spec_decode"]
    return {"draft": draft, "target": target, "num_speculative_tokens": k,
            "acceptance_rate": round(stats["acceptance_rate"], 3),
            "mean_accepted_length": round(stats["mean_accepted_length"], 3),
            "accepted_per_position": [round(n / max(stats["num_drafts"], 1), 3) for n in stats["accepted_per_pos"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=DIR (repeatable)")
    ap.add_argument("--draft", default=None, help="a draft directory, measured against the first --model")
    ap.add_argument("--headers", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--text-chars", type=int, default=300_000)
    ap.add_argument("--num-speculative-tokens", type=int, default=3)
    args = ap.parse_args()
    docs = heldout_stdlib_docs()
    headers = function_headers(docs, args.headers)
    text = heldout_stdlib_text(args.text_chars)
    print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "heldout_docs": len(docs), "text_chars": len(text), "headers": len(headers)}), flush=True)
    for spec in args.model:
        name, _, path = spec.partition("=")
        print(json.dumps(evaluate(name, path, headers, text, args.max_tokens)), flush=True)
    if args.draft:
        target = args.model[0].partition("=")[2]
        print(json.dumps(draft_acceptance(target, args.draft, headers, args.max_tokens,
                                          args.num_speculative_tokens)), flush=True)


if __name__ == "__main__":
    main()
