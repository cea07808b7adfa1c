"""`frontierlm profile MODEL`: time this engine's `step()` over a grid of (prefill tokens, decode requests,
context length) on the machine it runs on, and fit the simulator's step-time model to it.

For each context C and decode count D, D requests with C-token prompts are brought into decode; then each timed
step runs those D decode rows plus P fresh prompt tokens (P = 0: decode only) in K prompts of P / K tokens (K from
`prefill_chunks`, only where each chunk has at least MIN_CHUNK_TOKENS tokens), as a burst of arrivals is admitted.
The whole engine step is timed (schedule, inputs, forward, sampling, detokenization), as a server's engine
thread runs it. A decode count above max_num_seqs - K is cut to fit."""
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


MIN_CHUNK_TOKENS = 64


def profile_engine(config: EngineConfig, prefill_tokens: list[int], decode_requests: list[int], contexts: list[int],
                   repeats: int = 3, progress: bool = True, seed: int = 0, prefill_chunks: list[int] = (1,)) -> dict:
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
    decode_requests = sorted({min(d, config.max_num_seqs - 1) for d in decode_requests})
    if any(k <= 0 for k in prefill_chunks):
        raise ValueError(f"prefill chunk counts must be positive, got {list(prefill_chunks)}")
    splits = [(p, k) for p in sorted(set(prefill_tokens)) for k in sorted(set(prefill_chunks))
              if k == 1 or (p % k == 0 and p // k >= MIN_CHUNK_TOKENS)]
    grid = [(c, d, p, k) for c in contexts for d in decode_requests for p, k in splits
            if (p or d) and p + d <= budget and p // k < max_len and d + (k if p else 0) <= config.max_num_seqs]
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
            for c_, d_, p, k in [g for g in grid if g[0] == c and g[1] == d]:
                samples = []
                for _ in range(repeats):
                    running = list(engine.scheduler.running)
                    ctx = sum(r.num_computed_tokens + 1 for r in running)
                    rids = [engine.add_request(None, prompt(p // k), SamplingParams(max_tokens=1, temperature=0.0))
                            for _ in range(k if p else 0)]
                    t0 = time.perf_counter()
                    engine.step()
                    samples.append(time.perf_counter() - t0)
                    late = [rid for rid in rids if rid in engine.groups]  # not admitted whole in that step
                    for rid in late:
                        engine.abort_request(rid)
                    if late:
                        samples.pop()
                if samples:
                    points.append({"context": c, "prefill_tokens": p, "prefill_chunks": k if p else 0,
                                   "prefill_pairs": k * prefill_pairs(0, p // k) if p else 0, "decode_reqs": d,
                                   "decode_ctx": ctx, "step_s": statistics.median(samples), "samples_s": samples})
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
