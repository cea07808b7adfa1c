"""What a tool grammar costs: the packaged demo model generating under no constraint, under tool_choice "auto"
(a grammar mask every step, free text until a call's marker) and "required" (calls only, fixed text
jump-forwarded). Offline through LLMEngine, so the HTTP layer is not measured.

    python benchmarks/tool_calls.py [--n 16] [--max-tokens 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import time

from frontierlm import LLM, SamplingParams
from frontierlm.server.tools.plan import _grammar, plan_tools
from frontierlm.server.tools.protocol import Tool

TOOLS = [Tool.model_validate({"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}),
         Tool.model_validate({"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
             "required": ["a", "b"]}}})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    llm = LLM(None, seed=0)
    tok = llm.get_tokenizer()
    prompt = tok.apply_chat_template([{"role": "user", "content": "Weather in Paris?"}], tokenize=False,
                                     add_generation_prompt=True, tools=[t.model_dump() for t in TOOLS])
    ids = tok.encode(prompt, add_special_tokens=False)
    results = {}
    for mode in ("none", "auto", "required"):
        so = None
        if mode != "none":
            t0 = time.perf_counter()
            plan = plan_tools(TOOLS, mode, None, parser_name="hermes", enable_auto=True, chat_template=None)
            so = plan.structured_outputs()
            results[f"{mode}_build_s"] = round(time.perf_counter() - t0, 3)
        best, first = None, None
        for r in range(args.repeats):  # the first run also compiles the grammar (cached after it)
            params = SamplingParams(n=args.n, max_tokens=args.max_tokens, seed=r, structured_outputs=so)
            t0 = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
            dt = time.perf_counter() - t0
            tokens = sum(len(c.token_ids) for c in out[0].outputs)
            best = max(best or 0, tokens / dt)
            first = first or round(dt, 2)
        results[f"{mode}_tokens_per_s"] = round(best, 1)
        results[f"{mode}_first_run_s"] = first
    _grammar.cache_clear()
    print(json.dumps({"n": args.n, "max_tokens": args.max_tokens, "prompt_tokens": len(ids), **results}))


if __name__ == "__main__":
    main()
