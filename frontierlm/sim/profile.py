"""`frontierlm profile MODEL`: time this engine's `step()` over a grid of (prefill tokens, decode requests,
context length) on the machine it runs on, and fit the simulator's step-time model to it.

For each context C and decode count D, D requests with C-token prompts are brought into decode; then each timed
step runs those D decode rows plus one fresh prompt of P tokens (P = 0: decode only). The whole engine step is
timed (schedule, inputs, forward, sampling, detokenization), as a server's engine thread runs it."""
from __future__ import annotations

import platform
import random
import statistics
import time

import torch

from frontierlm.config import EngineConfig
from frontierlm.sampling_params import SamplingParams
from frontierlm.sim.timing import ProfileTimer, prefill_pairs


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def profile_engine(config: EngineConfig, prefill_tokens: list[int], decode_requests: list[int], contexts: list[int],
                   repeats: int = 3, progress: bool = True, seed: int = 0) -> dict:
    from tqdm import tqdm

    from frontierlm.engine.llm_engine import LLMEngine

    config.enable_prefix_caching = False  # fresh prompts every time: no prefix hits
    engine = LLMEngine(config)
    budget, max_len = config.max_num_batched_tokens, engine.max_model_len
    vocab = min(engine.model_config.vocab_size, 500)
    rng = random.Random(seed)

    def prompt(n):
        return [rng.randrange(10, vocab) for _ in range(n)]

    contexts = [c for c in sorted(set(contexts)) if 0 < c < max_len - 64]
    decode_requests = [d for d in sorted(set(decode_requests)) if d <= config.max_num_seqs - 1]
    grid = [(c, d, p) for c in contexts for d in decode_requests for p in sorted(set(prefill_tokens))
            if (p or d) and p + d <= budget and p < max_len]
    if not grid:
        raise ValueError("the profile grid is empty after applying the token budget and context limits")
    bar = tqdm(total=len(grid), desc="profile", unit="pt", disable=not progress)
    points = []
    for c in contexts:
        decoders: list[str] = []
        for d in decode_requests:
            while len(decoders) < d:
                params = SamplingParams(max_tokens=max_len - c - 1, ignore_eos=True, temperature=0.0)
                decoders.append(engine.add_request(None, prompt(c), params))
            while engine.scheduler.waiting or any(
                    r.num_output_tokens == 0 for r in engine.scheduler.running):  # bring them all into decode
                engine.step()
            for _ in range(2):  # warm-up at this shape
                engine.step()
            for c_, d_, p in [g for g in grid if g[0] == c and g[1] == d]:
                samples = []
                for _ in range(repeats):
                    running = list(engine.scheduler.running)
                    ctx = sum(r.num_computed_tokens + 1 for r in running)
                    rid = engine.add_request(None, prompt(p), SamplingParams(max_tokens=1, temperature=0.0)) \
                        if p else None
                    t0 = time.perf_counter()
                    engine.step()
                    samples.append(time.perf_counter() - t0)
                    if rid is not None and rid in engine.groups:  # not admitted whole in that step: drop it
                        engine.abort_request(rid)
                        samples.pop()
                if samples:
                    points.append({"context": c, "prefill_tokens": p, "prefill_pairs": prefill_pairs(0, p),
                                   "decode_reqs": d, "decode_ctx": ctx, "step_s": statistics.median(samples),
                                   "samples_s": samples})
                bar.update(1)
        for rid in decoders:
            engine.abort_request(rid)
    bar.close()
    data = {"model": config.model, "device": str(engine.runner.device), "cpu": cpu_name(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(engine.model_config.dtype),
            "block_size": config.block_size, "num_blocks": engine.kv.num_blocks,
            "max_num_batched_tokens": budget, "max_num_seqs": config.max_num_seqs, "max_model_len": max_len,
            "kv_bytes_per_token": engine.model_config.kv_cache_bytes_per_token(), "points": points}
    data["fit"] = ProfileTimer(data).describe()
    return data
