"""Quantized weights and KV cache: quality (perplexity) and CPU speed beside llama.cpp.

    python benchmarks/quant.py ppl MODEL_DIR [--windows 8 --seq-len 256]
    python benchmarks/quant.py speed MODEL_DIR [--rounds 3] [--gguf-dir /tmp/quant-gguf]
    python benchmarks/quant.py kernels [--batch 1 --reps 200]
    python benchmarks/quant.py int4-rows [--rows 1 16 64 256]
    python benchmarks/quant.py moe [--tokens 1 8 64]

ppl: perplexity on held-out python-docs text (the trainer's own validation split: split_documents(...,
0.05), the documents the demo model never trained on), teacher-forced through the engine (prompt_logprobs,
chunked prefill of 64 tokens so later chunks read the cached K/V): float, each weight scheme written by
`frontierlm quantize` and loaded back, and FP8 KV caches.

speed: batch-1 decode tok/s (one request, 128 greedy tokens after a 64-token prompt, timed from the first
token) and offline throughput (16 requests, prompts and outputs uniform in [64, 128], random.Random(0), up to 8
running at once) of float32 / int8 / int4 FrontierLM and llama.cpp q8_0 / q4_0 GGUF files of the same weights
(converted with the llama-cpp-python sdist's convert_hf_to_gguf.py, quantized with llama_model_quantize),
rounds alternating engine by engine in one process, 1 thread, under `taskset -c 1`. Prints JSON lines.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def held_out_windows(tokenizer, n: int, seq_len: int) -> list[list[int]]:
    from frontierlm.train.corpus import load_texts, pack_tokens, split_documents, tokenize

    _, val = split_documents(load_texts("python-docs"), 0.05)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    blocks = pack_tokens(tokenize(tokenizer, val), seq_len - 1, eos)
    step = max(1, blocks.shape[0] // n)
    return [blocks[i].tolist() for i in range(0, step * n, step)][:n]


def perplexity(model_dir: str, windows, **engine_kw) -> float:
    from frontierlm import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", max_num_batched_tokens=64, seed=0, **engine_kw)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    nll, count = 0.0, 0
    for w, o in zip(windows, outs):
        for tok, lp in zip(w[1:], o.prompt_logprobs[1:]):
            nll -= lp[tok].logprob
            count += 1
    return math.exp(nll / count)


def cmd_ppl(args) -> None:
    from frontierlm.engine.tokenizer import load_tokenizer
    from frontierlm.quant.export import quantize_checkpoint

    windows = held_out_windows(load_tokenizer(args.model), args.windows, args.seq_len)
    tmp = Path(tempfile.mkdtemp(prefix="quant-ppl-"))
    variants = {"float32": (args.model, {})}
    for scheme, g in (("int8", None), ("int4", 32), ("int4", 128), ("fp8", None), ("fp8-block", None)):
        name = scheme + (f"-g{g}" if g else "")
        variants[name] = (quantize_checkpoint(args.model, tmp / name, scheme, g)["out_dir"], {})
    variants["float32 + FP8 KV e4m3"] = (args.model, {"kv_cache_dtype": "fp8_e4m3"})
    variants["float32 + FP8 KV e5m2"] = (args.model, {"kv_cache_dtype": "fp8_e5m2"})
    variants["int8 + FP8 KV e4m3"] = (variants["int8"][0], {"kv_cache_dtype": "fp8_e4m3"})
    base = None
    for name, (path, kw) in variants.items():
        ppl = perplexity(path, windows, **kw)
        base = base or ppl
        print(json.dumps({"model": args.model, "variant": name, "tokens": len(windows) * (args.seq_len - 1),
                          "ppl": round(ppl, 4), "rel_change_pct": round(100 * (ppl / base - 1), 3)}), flush=True)


# ---- speed ------------------------------------------------------------------------------------------
def workload(n=16, lo=64, hi=128, vocab=8192):
    rng = random.Random(0)
    return [([rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))], rng.randint(lo, hi)) for _ in range(n)]


class Frontier:
    def __init__(self, model, quantization):
        from frontierlm import LLM

        self.llm = LLM(model, dtype="float32", quantization=quantization, max_num_seqs=8, seed=0,
                       enable_prefix_caching=False)

    def decode_b1(self, prompt, n):
        from frontierlm import SamplingParams

        eng = self.llm.llm_engine
        eng.add_request("b1", {"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        t_first, count = None, 0
        while eng.has_unfinished_requests():
            for out in eng.step():
                count = len(out.outputs[0].token_ids)
                if t_first is None and count:
                    t_first, first = time.perf_counter(), count
        return (count - first) / (time.perf_counter() - t_first)

    def offline(self, reqs):
        from frontierlm import SamplingParams

        params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in reqs]
        t0 = time.perf_counter()
        self.llm.generate([{"prompt_token_ids": p} for p, _ in reqs], params, use_tqdm=False)
        return sum(o for _, o in reqs) / (time.perf_counter() - t0)


class LlamaCpp:
    def __init__(self, gguf):
        import llamacpp_peer as peer
        from llama_cpp import Llama

        peer.no_weight_repacking()  # the repacked q8_0 / q4_0 path segfaults on this VM's AMX Xeon
        self.peer, self.path = peer, gguf
        self.llm = Llama(model_path=gguf, n_threads=1, n_threads_batch=1, n_ctx=1024, seed=0, verbose=False)
        self.batched = peer.Slots(gguf, 8, 1)

    def decode_b1(self, prompt, n):
        decoded, seconds = self.peer.greedy_decode(self.llm, prompt, n)
        return decoded / seconds

    def offline(self, reqs):
        return self.batched.run(reqs)


def make_ggufs(model: str, out_dir: Path) -> dict:
    """f32 GGUF with the sdist's converter (benchmarks/llamacpp_peer.py), then q8_0 / q4_0 with llama.cpp's own
    quantizer."""
    import llama_cpp
    import llamacpp_peer

    out_dir.mkdir(parents=True, exist_ok=True)
    f32 = out_dir / "anchor-f32.gguf"
    llamacpp_peer.convert(model, str(out_dir), ["f32"])
    paths = {}
    for name, ftype in (("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
        path = out_dir / f"anchor-{name}.gguf"
        if not path.exists():
            qp = llama_cpp.llama_model_quantize_default_params()
            qp.ftype = ftype
            qp.nthread = 1
            rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), qp)
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize {name} returned {rc}")
        paths[name] = str(path)
    return paths


def cmd_speed(args) -> None:
    torch.set_num_threads(1)
    engines = {"frontierlm float32": lambda: Frontier(args.model, None),
               "frontierlm int8": lambda: Frontier(args.model, "int8"),
               "frontierlm int4-g32": lambda: Frontier(args.model, "int4")}
    try:
        ggufs = make_ggufs(args.model, Path(args.gguf_dir))
        engines["llama.cpp q8_0"] = lambda: LlamaCpp(ggufs["q8_0"])
        engines["llama.cpp q4_0"] = lambda: LlamaCpp(ggufs["q4_0"])
    except ImportError as e:
        print(json.dumps({"llama.cpp": f"not available: {e}"}), flush=True)
    built = {name: make() for name, make in engines.items()}
    reqs = workload()
    prompt = workload(1, 64, 64)[0][0]
    results = {name: {"decode_b1": [], "offline": []} for name in built}
    for name, e in built.items():  # warm-up, untimed
        e.decode_b1(prompt, 8)
    for r in range(args.rounds):
        for name, e in built.items():
            load = os.getloadavg()[0]
            d = e.decode_b1(prompt, 128)
            o = e.offline(reqs) if not args.skip_offline else float("nan")
            results[name]["decode_b1"].append(d)
            results[name]["offline"].append(o)
            print(json.dumps({"round": r, "engine": name, "decode_b1_tok_s": round(d, 1),
                              "offline_tok_s": round(o, 1), "load1": round(load, 2)}), flush=True)
    med = {n: {k: sorted(v)[len(v) // 2] for k, v in res.items()} for n, res in results.items()}
    print(json.dumps({"medians": {n: {k: round(v, 1) for k, v in m.items()} for n, m in med.items()},
                      "load_end": os.getloadavg()}), flush=True)


def cmd_kernels(args) -> None:
    """Batch-1 matmul time of the 33.6M model's layers (qkv, o, gate_up, down x 8, the head), float32 F.linear
    vs the int8 / int4 kernels, the variants interleaved call by call and the minimum of N kept: the minimum
    is what a quiet core would give, and interleaving exposes every variant to the same neighbours."""
    import torch.nn.functional as F

    from frontierlm.quant.formats import quantize_int
    from frontierlm.quant.linear_methods import Int4Kernel, Int8Kernel

    torch.set_num_threads(1)
    shapes = [(1024, 512), (512, 512), (3072, 512), (512, 1536)] * 8 + [(8192, 512)]
    totals = {"float32": 0.0, "int8": 0.0, "int4-g32": 0.0}
    for n, k in set(shapes):
        w = torch.randn(n, k) * 0.02
        q8, s8 = quantize_int(w, 8, None)
        q4, s4 = quantize_int(w, 4, 32)
        int8 = Int8Kernel(q8, s8, k)
        head = (n, k) == shapes[-1]  # the engine's int4 runs keep the LM head in int8 (quant/config.py)
        fns = {"float32": lambda x, w=w: F.linear(x, w), "int8": int8,
               "int4-g32": int8 if head else Int4Kernel(q4, s4, None, 32)}
        x = torch.randn(args.batch, k)
        best = {name: float("inf") for name in fns}
        for _ in range(args.reps):
            for name, f in fns.items():
                t0 = time.perf_counter()
                f(x)
                best[name] = min(best[name], time.perf_counter() - t0)
        count = shapes.count((n, k))
        for name in fns:
            totals[name] += count * best[name]
        print(json.dumps({"shape": [n, k], "batch": args.batch,
                          **{name: round(v * 1e6, 1) for name, v in best.items()}}), flush=True)
    print(json.dumps({"batch": args.batch, "matmul_us_per_step": {n: round(v * 1e6) for n, v in totals.items()},
                      "speedup_vs_float32": {n: round(totals["float32"] / v, 2) for n, v in totals.items()},
                      "load1": os.getloadavg()[0]}), flush=True)


def cmd_int4_rows(args) -> None:
    """The int4 (groups of 32) matmuls of one 33.6M-model forward (qkv, o, gate_up, down x 8) per row count:
    torch's packed kernel vs unpacking the weight once per call to bfloat16 (or float32) and F.linear. Same
    interleaved minimum-of-N timing as `kernels`; it picks linear_methods.INT4_DENSE_ROWS."""
    import torch.nn.functional as F

    from frontierlm.quant.formats import quantize_int
    from frontierlm.quant.linear_methods import Int4Kernel

    torch.set_num_threads(1)
    shapes = [(1024, 512), (512, 512), (3072, 512), (512, 1536)]
    kernels = {}
    for n, k in shapes:
        q, s = quantize_int(torch.randn(n, k) * 0.02, 4, 32)
        kernels[n, k] = Int4Kernel(q, s, None, 32)
    for rows in args.rows:
        totals = {"packed": 0.0, "dense-bf16": 0.0, "dense-f32": 0.0}
        for (n, k), kern in kernels.items():
            x = torch.randn(rows, k)
            fns = {"packed": lambda: kern(x, dense=False), "dense-bf16": lambda: kern(x, dense=True),
                   "dense-f32": lambda: F.linear(x, kern.dense_weight(torch.float32)[:n])}
            best = {name: float("inf") for name in fns}
            for _ in range(max(3, args.reps // max(1, rows // 16))):
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    best[name] = min(best[name], time.perf_counter() - t0)
            for name in fns:
                totals[name] += 8 * best[name]
        print(json.dumps({"rows": rows, "int4_matmul_us_per_forward": {n: round(v * 1e6) for n, v in totals.items()},
                          "dense_bf16_speedup": round(totals["packed"] / totals["dense-bf16"], 2),
                          "load1": os.getloadavg()[0]}), flush=True)


def cmd_moe(args) -> None:
    """One MoE expert block (the demo model's shape by default: 8 experts, hidden 256, intermediate 128, top-2)
    on T tokens: float32 FusedExperts (torch._grouped_mm on CPU) vs int8 / int4 g32 quantized experts
    (frontierlm/quant/moe.py), interleaved call by call, minimum of N kept."""
    from frontierlm.layers.moe import FusedExperts
    from frontierlm.quant.config import online_scheme
    from frontierlm.quant.moe import QuantExpertsMethod

    torch.set_num_threads(1)
    e, h, i, k = args.experts, args.hidden, args.intermediate, args.top_k
    variants = {}
    for name in ("float32", "int8", "int4"):
        torch.manual_seed(0)
        m = FusedExperts(e, h, i)
        torch.nn.init.normal_(m.w13, std=0.02)
        torch.nn.init.normal_(m.w2, std=0.02)
        if name != "float32":
            method = QuantExpertsMethod({f: online_scheme(name) for f in ("w13", "w2")}, None)
            method.create_weights(m)
            method.process_weights_after_loading(m)
        variants[name] = m.eval()
    for tokens in args.tokens:
        x = torch.randn(tokens, h)
        ids = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)])
        w = torch.full((tokens, k), 1.0 / k)
        best = {name: float("inf") for name in variants}
        with torch.inference_mode():
            for _ in range(args.reps):
                for name, m in variants.items():
                    t0 = time.perf_counter()
                    m(x, w, ids)
                    best[name] = min(best[name], time.perf_counter() - t0)
        print(json.dumps({"tokens": tokens, "experts_us": {n: round(v * 1e6, 1) for n, v in best.items()},
                          "speedup_vs_float32": {n: round(best["float32"] / v, 2) for n, v in best.items()},
                          "load1": os.getloadavg()[0]}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ppl")
    a.add_argument("model")
    a.add_argument("--windows", type=int, default=8)
    a.add_argument("--seq-len", type=int, default=256)
    b = sub.add_parser("speed")
    b.add_argument("model")
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--gguf-dir", default="/tmp/quant-gguf")
    b.add_argument("--skip-offline", action="store_true")
    c = sub.add_parser("kernels")
    c.add_argument("--batch", type=int, default=1)
    c.add_argument("--reps", type=int, default=200)
    d = sub.add_parser("int4-rows")
    d.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 48, 64, 96, 128, 256, 512])
    d.add_argument("--reps", type=int, default=60)
    m = sub.add_parser("moe")
    m.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64])
    m.add_argument("--experts", type=int, default=8)
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--intermediate", type=int, default=128)
    m.add_argument("--top-k", type=int, default=2)
    m.add_argument("--reps", type=int, default=100)
    args = p.parse_args()
    {"ppl": cmd_ppl, "speed": cmd_speed, "kernels": cmd_kernels, "int4-rows": cmd_int4_rows,
     "moe": cmd_moe}[args.cmd](args)


if __name__ == "__main__":
    main()
