"""Time 48 greedy tokens of the packaged demo model with torch's default thread count or N threads.

    python benchmarks/threads.py          # torch's default (one thread per core)
    python benchmarks/threads.py 1        # one thread

Run both on the same machine state (note `uptime`): on a busy shared CPU fewer threads can be much faster."""
import os
import sys
import time

import torch

os.environ.setdefault("FRONTIERLM_LOG_LEVEL", "WARNING")
if len(sys.argv) > 1:
    torch.set_num_threads(int(sys.argv[1]))

from frontierlm import LLM, SamplingParams  # noqa: E402  (after the thread setting)

llm = LLM()
params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
llm.generate(["The class statement"], params, use_tqdm=False)  # warm-up
times = []
for _ in range(3):
    t0 = time.perf_counter()
    llm.generate(["The class statement"], params, use_tqdm=False)
    times.append(time.perf_counter() - t0)
times.sort()
print(f"threads={torch.get_num_threads()}: 48 tokens, best {times[0]:.3f}s, median {times[1]:.3f}s")
