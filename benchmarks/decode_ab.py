"""In-process A/B of one decode fast-path setting at batch 1: two engines in one process, alternating.

    python benchmarks/decode_ab.py --model /tmp/anchor-model --dtype bfloat16 --threads 1 --setting cpp_wrapper

On a guest whose single runs swing by more than the change (host steal), two engines built in one process and
timed in alternating order every round settle what separate processes cannot. Settings:
- cpp_wrapper: inductor's C++ wrapper off (A) vs on (B), `fast_decode.CPU_INDUCTOR_OPTIONS`;
- fine_widths: block-table widths in powers of two (A) vs with the x1.5 rungs (B), `fast_decode.width_ladder`;
- one_row: float32 one-row products through F.linear (A) vs inductor's multiply-and-sum (B),
  `layers.linear.ONE_ROW_REDUCTION`;
- one_row_split: float32 one-row products whole with inductor's default store-vs-recompute rule (A) vs in row
  slices with `realize_reads_threshold=1` (B), `layers.linear.ONE_ROW_SPLIT`;
- option: the decode compile's inductor options as they are (A) vs with `--option KEY=VALUE` added (B).
Each round runs the anchor workload's four batch-1 requests (`anchor.batch1_decode`) on both engines.
"""
from __future__ import annotations

import argparse
import ast
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(model: str, dtype: str, setting: str, variant: str, quantization: str | None = None,
          option: tuple[str, object] | None = None):
    import frontierlm.engine.fast_decode as fd
    from anchor import anchor_workload, batch1_decode
    from frontierlm import LLM, SamplingParams

    options = dict(fd.CPU_INDUCTOR_OPTIONS)
    if setting == "cpp_wrapper":
        fd.CPU_INDUCTOR_OPTIONS["cpp_wrapper"] = variant == "B"
    if setting == "option" and variant == "B":
        fd.CPU_INDUCTOR_OPTIONS[option[0]] = option[1]
    import frontierlm.layers.linear as lin
    one_row = lin.ONE_ROW_REDUCTION
    one_row_split = lin.ONE_ROW_SPLIT
    if setting == "one_row":  # read while tracing, which the warm-up below does
        lin.ONE_ROW_REDUCTION = variant == "B"
    if setting == "one_row_split" and variant == "A":
        lin.ONE_ROW_SPLIT = 1
        fd.CPU_INDUCTOR_OPTIONS.pop("realize_reads_threshold", None)
    extra = {"quantization": quantization} if quantization else {}
    llm = LLM(model=model, dtype=dtype, enforce_eager=False, **extra)
    fast = llm.llm_engine.runner.fast_decode
    if setting == "fine_widths":
        fast.widths = fd.width_ladder(fast.widths[-1], fine=variant == "B")
    reqs = anchor_workload(llm.llm_engine.model_config.vocab_size)[:4]
    t0 = time.perf_counter()  # warm-up past the eager steps, compiling here (the option is read at compile time)
    llm.generate([reqs[0][0]], SamplingParams(temperature=0, max_tokens=fast.warmup_steps + 300, ignore_eos=True),
                 use_tqdm=False)
    # and once through the timed requests, so every block-table width they reach is compiled under this variant's
    # settings: a shape first met inside a round would be compiled with the other variant's (a global setting)
    batch1_decode(llm.llm_engine, reqs)
    lin.ONE_ROW_REDUCTION, lin.ONE_ROW_SPLIT = one_row, one_row_split
    fd.CPU_INDUCTOR_OPTIONS.clear()
    fd.CPU_INDUCTOR_OPTIONS.update(options)
    return llm.llm_engine, reqs, time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--quantization", default=None, help="int8 | int4 | fp8: quantize the weights on load")
    p.add_argument("--setting", required=True,
                   choices=["cpp_wrapper", "fine_widths", "one_row", "one_row_split", "option"])
    p.add_argument("--option", metavar="KEY=VALUE", help="with --setting option: an inductor config entry for B "
                                                        "(VALUE read as a Python literal)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from anchor import batch1_decode

    option = None
    if a.setting == "option":
        if not a.option or "=" not in a.option:
            p.error("--setting option needs --option KEY=VALUE")
        key, value = a.option.split("=", 1)
        option = (key, ast.literal_eval(value))
    engines, warm = {}, {}
    for v in "AB":
        engines[v], reqs, warm[v] = build(a.model, a.dtype, a.setting, v, a.quantization, option)
    compiled = {v: len(engines[v].runner.fast_decode.compile_seconds) for v in "AB"}
    runs = {v: [] for v in "AB"}
    for r in range(a.rounds):
        for v in ("AB" if r % 2 == 0 else "BA"):
            runs[v].append(round(batch1_decode(engines[v], reqs), 1))
        print(json.dumps({"round": r, "A": runs["A"][-1], "B": runs["B"][-1]}), file=sys.stderr, flush=True)
    late = {v: len(engines[v].runner.fast_decode.compile_seconds) - compiled[v] for v in "AB"}
    if any(late.values()):
        print(f"warning: shapes compiled during the rounds (A/B not clean): {late}", file=sys.stderr)
    result = {"setting": a.setting, "option": a.option, "late_compiles": late, "dtype": a.dtype,
              "quantization": a.quantization, "threads": a.threads, "warmup_s": warm, "runs": runs,
              "median": {v: statistics.median(x) for v, x in runs.items()}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
