"""Cost of grammar-constrained decoding on CPU: 32 concurrent JSON-schema-constrained requests vs the same
requests unconstrained with exactly the same output lengths, same model, same run.

    python benchmarks/structured.py [--model DIR] [--num-requests 32] [--backend auto|xgrammar|guidance]
        [--json-out FILE]

A third run adds jump-forward decoding (forced text appended without sampling); its outputs differ from the
plain constrained run's, so it is compared by output tokens per second. The constrained run goes first; each request's output length is recorded and the unconstrained run asks for
exactly that many tokens (ignore_eos), so both runs generate the same number of tokens per request.
"""
from __future__ import annotations

import argparse
import json
from importlib.metadata import version
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from make_random_model import make_random_model  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 100000},
        # a pattern rather than maxLength: xgrammar enforces it (its length-bounded strings admit raw control
        # characters, so auto sends maxLength to guidance), and both backends are measured on one schema
        "name": {"type": "string", "pattern": "^[A-Za-z ]{0,24}$"},
        "active": {"type": "boolean"},
        "scores": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 6},
        "kind": {"enum": ["alpha", "beta", "gamma"]},
    },
    "required": ["id", "name", "active", "scores", "kind"],
    "additionalProperties": False,
}


def run(llm, prompts, params) -> tuple[float, list]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t0, outs


def replay_mask_cost(llm, constraint, outputs: list[list[int]]) -> dict:
    """The backend's own host cost, apart from the model: replay each constrained output through a fresh
    matcher, timing one bitmask-row fill plus one accept per token (median and mean, microseconds)."""
    from frontierlm.structured.backend import fill_grammar_bitmask

    backend = llm.llm_engine.grammar_backend
    compiled = backend.compile(constraint)
    vocab = llm.llm_engine.model_config.vocab_size
    times = []
    for tokens in outputs:
        m = backend.matcher(compiled)
        for t in tokens:
            t0 = time.perf_counter()
            fill_grammar_bitmask([m], vocab)
            m.accept_token(t)
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"median": round(1e6 * times[len(times) // 2], 1), "mean": round(1e6 * sum(times) / len(times), 1),
            "tokens": len(times)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model dir (default: build the 33.6M random Llama)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="auto", choices=("auto", "xgrammar", "guidance"),
                   help="structured_outputs_backend")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from frontierlm import LLM, SamplingParams, StructuredOutputsParams

    model = args.model or str(make_random_model(Path(tempfile.mkdtemp()) / "model"))
    llm = LLM(model, structured_outputs_backend=args.backend)
    prompts = [f"Record number {i} as JSON:" for i in range(args.num_requests)]
    constraint = StructuredOutputsParams(json=SCHEMA)
    llm.generate(prompts[:2], SamplingParams(max_tokens=8, structured_outputs=constraint), use_tqdm=False)  # warm
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens, structured_outputs=constraint)
              for i in range(len(prompts))]
    t_con, con = run(llm, prompts, params)
    lengths = [len(o.outputs[0].token_ids) for o in con]
    valid = 0
    for o in con:
        if o.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)
            valid += 1
    mask_us = replay_mask_cost(llm, constraint, [o.outputs[0].token_ids for o in con])
    jf = StructuredOutputsParams(json=SCHEMA, jump_forward=True)
    t_jf, jf_outs = run(llm, prompts, [SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens,
                                                      structured_outputs=jf) for i in range(len(prompts))])
    jf_tokens = sum(len(o.outputs[0].token_ids) for o in jf_outs)
    free = [SamplingParams(temperature=0.8, seed=i, max_tokens=n, ignore_eos=True) for i, n in enumerate(lengths)]
    t_free, _ = run(llm, prompts, free)
    tokens = sum(lengths)
    report = {
        "model": model, "num_requests": len(prompts), "output_tokens": tokens,
        "constrained_tok_s": round(tokens / t_con, 1), "unconstrained_tok_s": round(tokens / t_free, 1),
        "overhead_pct": round(100 * (t_con / t_free - 1), 1), "finished_valid_json": valid,
        "jump_forward_output_tokens": jf_tokens, "jump_forward_tok_s": round(jf_tokens / t_jf, 1),
        "jump_forward_wall_s": round(t_jf, 2), "constrained_wall_s": round(t_con, 2),
        "mask_fill_accept_us_per_token": mask_us,
        "backend": args.backend, "served": llm.llm_engine.grammar_backend.served,
        "torch": torch.__version__, "xgrammar": version("xgrammar"), "llguidance": version("llguidance"),
    }
    print(json.dumps(report, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
