"""Engine-thread CPU time per decode step with detokenization in the step (offline) vs handed to the output
thread (AsyncEngine): the same engine, modes alternating round by round.

    taskset -c 1 python benchmarks/detok_step.py --model DIR [--batch 32] [--rounds 3]

Each round decodes `--new-tokens` tokens for `--batch` requests with 64-token prompts (a stop string that never
matches and logprobs=1, so the detokenizer does its whole job); reported: the median step's process CPU time.
With detokenize_in_step=False nobody consumes the deltas here: the figure is what the engine thread still does.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "frontierlm").is_dir():
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from frontierlm import SamplingParams
    from frontierlm.engine.llm_engine import LLMEngine

    eng = LLMEngine.from_engine_args(a.model, enforce_eager=True, kv_cache_memory_gb=0.5)
    vocab = eng.model_config.vocab_size
    res: dict[bool, list[float]] = {True: [], False: []}
    for r in range(a.rounds):
        for mode in res:
            eng.detokenize_in_step = mode
            params = SamplingParams(temperature=0, max_tokens=a.new_tokens, ignore_eos=True, stop=["zzzz"], logprobs=1)
            for i in range(a.batch):
                eng.add_request(None, [8 + (r * 977 + i * 131 + j) % (vocab - 8) for j in range(64)], params)
            cpus = []
            while eng.has_unfinished_requests():
                c = time.process_time()
                eng.step()
                cpus.append(time.process_time() - c)
            res[mode].append(statistics.median(cpus[2:]))
    out = {("in_step" if m else "output_thread"): round(statistics.median(v) * 1e3, 2) for m, v in res.items()}
    print(f"engine-thread CPU ms per decode step (batch {a.batch}): {out}, load {os.getloadavg()[0]:.1f}")
    return out


if __name__ == "__main__":
    main()
