"""Offline throughput on CPU: FrontierLM vs Hugging Face transformers `generate`, same model, same run.

    python benchmarks/throughput.py                       # builds the random Llama model in a temp dir
    python benchmarks/throughput.py --model DIR --json-out result.json

Workload (random.Random(0)): --num-requests requests, random-token prompts and output lengths each uniform in
[64, 256], greedy, ignore_eos, exact output lengths. Reports output tokens/s for both (HF counts only each
request's own output tokens, not the padding of its static batch) and batch-1 decode tokens/s.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
if (ROOT / "frontierlm").is_dir():  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
from make_random_model import make_random_model, num_params  # noqa: E402

NUM_SPECIAL = 8  # tests/factories.py puts its special tokens at ids 0..7; prompts avoid them


# ---- workload -----------------------------------------------------------------------------------------
def make_workload(num_requests: int, vocab: int, seed: int = 0, lo: int = 64, hi: int = 256):
    """[(prompt_token_ids, output_len)], the same for every engine."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(num_requests):
        prompt_len, output_len = rng.randint(lo, hi), rng.randint(lo, hi)
        reqs.append(([rng.randrange(NUM_SPECIAL, vocab) for _ in range(prompt_len)], output_len))
    return reqs


def decode_prompt(vocab: int, prompt_len: int = 128) -> list[int]:
    rng = random.Random(1)
    return [rng.randrange(NUM_SPECIAL, vocab) for _ in range(prompt_len)]


# ---- FrontierLM -----------------------------------------------------------------------------------------
def bench_frontierlm(model_dir: str, reqs, engine_kwargs: dict, decode_ids: list[int], decode_new: int,
                     repeats: int) -> dict:
    from frontierlm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model_dir, **engine_kwargs)
    load_s = time.perf_counter() - t0
    vocab = llm.llm_engine.model_config.vocab_size
    warm = [[(i * 37 + j) % (vocab - NUM_SPECIAL) + NUM_SPECIAL for j in range(16)] for i in range(2)]
    # Warm-up, not timed: past the fast path's eager warm-up steps, so that its compiles (one graph for batch 1,
    # one for larger batches) happen here; their time is reported as compile_s.
    fast = llm.llm_engine.runner.fast_decode
    t0 = time.perf_counter()
    n_warm = 8 + (fast.warmup_steps if fast is not None else 0)
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=n_warm, ignore_eos=True), use_tqdm=False)
    llm.generate(warm[:1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    warm_s = time.perf_counter() - t0

    prompts = [ids for ids, _ in reqs]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in reqs]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    for toks, (_, n) in zip(tokens, reqs):
        assert len(toks) == n, f"FrontierLM returned {len(toks)} tokens where {n} were asked"
    num_out = sum(len(t) for t in tokens)

    # batch-1 decode through the streaming engine API: time from the first output token to the last
    engine = llm.llm_engine
    dparams = SamplingParams(temperature=0, max_tokens=decode_new, ignore_eos=True)
    decode_runs, ttfts = [], []
    for _ in range(repeats):
        t_start = time.perf_counter()
        rid = engine.add_request(None, decode_ids, dparams)
        t_first = None
        n_out = 0
        done = False
        while not done:
            for out in engine.step():
                if out.request_id != rid:
                    continue
                n_out = len(out.outputs[0].token_ids)
                if t_first is None and n_out >= 1:
                    t_first = time.perf_counter()
                done = out.finished
        t_end = time.perf_counter()
        assert n_out == decode_new, f"decode run produced {n_out} tokens"
        decode_runs.append((decode_new - 1) / (t_end - t_first))
        ttfts.append(t_first - t_start)
    res = dict(load_s=load_s, wall_s=wall, output_tokens=num_out, output_tok_s=num_out / wall,
               total_tok_s=(num_out + sum(len(p) for p in prompts)) / wall,
               decode_tok_s=statistics.median(decode_runs), decode_runs=decode_runs,
               decode_ttft_s=statistics.median(ttfts), tokens=tokens,
               startup_report=getattr(engine, "startup_report", ""), warmup_s=warm_s,
               compile_s=sum(fast.compile_seconds.values()) if fast is not None else 0.0,
               fast_decode_steps=fast.fast_steps if fast is not None else 0)
    del llm, engine
    gc.collect()
    return res


# ---- Hugging Face transformers ----------------------------------------------------------------------------
def _hf_generate(model, input_ids, attention_mask, new_tokens: int, pad_id: int):
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)


def bench_hf(model_dir: str, reqs, batch_size: int, decode_ids: list[int], decode_new: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    try:
        pad_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    except Exception:  # no tokenizer in the directory
        pad_id = None
    pad_id = 0 if pad_id is None else pad_id

    def batch_inputs(prompts):
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # LEFT padding
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        return ids, mask

    with torch.inference_mode():
        ids, mask = batch_inputs([r[0][:16] for r in reqs[:2]])
        _hf_generate(model, ids, mask, 8, pad_id)  # warm-up

        tokens, num_useful, num_computed = [], 0, 0
        t0 = time.perf_counter()
        for b in range(0, len(reqs), batch_size):
            batch = reqs[b:b + batch_size]
            ids, mask = batch_inputs([p for p, _ in batch])
            longest = max(n for _, n in batch)
            out = _hf_generate(model, ids, mask, longest, pad_id)
            gen = out[:, ids.shape[1]:]
            assert gen.shape[1] == longest, f"HF generated {gen.shape[1]} tokens where {longest} were asked"
            for i, (_, n) in enumerate(batch):
                tokens.append(gen[i, :n].tolist())
            num_useful += sum(n for _, n in batch)
            num_computed += longest * len(batch)
        wall = time.perf_counter() - t0

        # batch-1 decode: prefill = generate(1 token); decode = (N - 1) / (generate(N) - prefill)
        d_ids = torch.tensor([decode_ids])
        d_mask = torch.ones_like(d_ids)
        decode_runs, prefills = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _hf_generate(model, d_ids, d_mask, 1, pad_id)
            prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            _hf_generate(model, d_ids, d_mask, decode_new, pad_id)
            total = time.perf_counter() - t0
            decode_runs.append((decode_new - 1) / (total - prefill))
            prefills.append(prefill)
    res = dict(load_s=load_s, wall_s=wall, output_tokens=num_useful, output_tok_s=num_useful / wall,
               padded_tokens=num_computed, batch_size=batch_size,
               decode_tok_s=statistics.median(decode_runs), decode_runs=decode_runs,
               decode_ttft_s=statistics.median(prefills), tokens=tokens)
    del model
    gc.collect()
    return res


# ---- reporting --------------------------------------------------------------------------------------------
def machine_info(threads: int) -> dict:
    cpu, isa = platform.processor() or "unknown", ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
                break
    except OSError:
        pass
    if isa:
        cpu = f"{cpu}, {isa}"
    import transformers

    try:
        import frontierlm
        flm = frontierlm.__version__
    except Exception:
        flm = "unavailable"
    return dict(cpu=cpu, cpu_count=os.cpu_count(), torch_threads=threads, python=platform.python_version(),
                torch=torch.__version__, transformers=transformers.__version__, frontierlm=flm,
                frontierlm_git=_git_revision(), platform=platform.platform())


def _git_revision() -> str | None:
    """The checkout's commit (+ "-dirty" when frontierlm/ has uncommitted changes), None outside a checkout."""
    import subprocess

    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10,
                                        check=True).stdout.strip()
        rev = run("rev-parse", "--short", "HEAD")
        return rev + ("-dirty" if run("status", "--porcelain", "--", "frontierlm") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def greedy_agreement(a: list[list[int]], b: list[list[int]], prefix: int = 32) -> int:
    """How many requests produced the same first `prefix` tokens in both engines (a sanity check, not a score:
    batched float32 math may legitimately flip a near-tie)."""
    return sum(x[:prefix] == y[:prefix] for x, y in zip(a, b))


def render(info: dict, shape: dict, workload: dict, flm: dict | None, hf: dict | None) -> str:
    lines = [
        f"Machine: {info['cpu']} ({info['cpu_count']} logical CPUs), torch threads {info['torch_threads']}",
        f"Versions: python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"frontierlm {info['frontierlm']}" + (f" (git {info['frontierlm_git']})" if info.get('frontierlm_git') else ""),
        f"Model: {shape['arch']} hidden {shape['hidden']}, intermediate {shape['intermediate']}, "
        f"{shape['layers']} layers, {shape['heads']} heads, {shape['kv_heads']} KV heads, vocab {shape['vocab']}, "
        f"untied, {shape['params_m']:.1f}M params, float32",
        f"Workload: {workload['num_requests']} requests, prompt and output lengths uniform in [64, 256] "
        f"(random.Random(0)), {workload['prompt_tokens']} prompt + {workload['output_tokens']} output tokens, "
        f"greedy, ignore_eos; batch-1 decode: {workload['decode_prompt']} prompt, {workload['decode_new']} new tokens",
        "",
        "| engine | output tok/s | wall s | batch-1 decode tok/s |",
        "|---|---|---|---|",
    ]
    if flm:
        lines.append(f"| FrontierLM ({workload['engine_desc']}) | {flm['output_tok_s']:.1f} | {flm['wall_s']:.1f} "
                     f"| {flm['decode_tok_s']:.1f} |")
    if hf:
        lines.append(f"| HF transformers generate, static batches of {hf['batch_size']}, left-padded "
                     f"| {hf['output_tok_s']:.1f} | {hf['wall_s']:.1f} | {hf['decode_tok_s']:.1f} |")
    if flm and hf:
        lines.append(f"| **ratio FrontierLM / HF** | **{flm['output_tok_s'] / hf['output_tok_s']:.2f}x** | "
                     f"| **{flm['decode_tok_s'] / hf['decode_tok_s']:.2f}x** |")
        lines += ["", f"Greedy agreement (first 32 tokens identical): "
                      f"{greedy_agreement(flm['tokens'], hf['tokens'])}/{len(flm['tokens'])} requests"]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="HF model directory (default: build the random benchmark model in a temp dir)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--max-num-seqs", type=int, help="FrontierLM engine argument (default: the engine's)")
    p.add_argument("--max-num-batched-tokens", type=int, help="FrontierLM engine argument (default: the engine's)")
    p.add_argument("--dtype", help="FrontierLM engine argument (default: the engine's, 'auto')")
    p.add_argument("--enforce-eager", action="store_true", help="FrontierLM: turn the compiled decode path off")
    p.add_argument("--hf-batch-size", type=int, default=8)
    p.add_argument("--decode-new-tokens", type=int, default=256)
    p.add_argument("--decode-repeats", type=int, default=3, help="batch-1 decode runs (median reported)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-frontierlm", action="store_true")
    p.add_argument("--json-out", help="write all figures (without token ids) to this JSON file")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    tmp = None
    model_dir = a.model
    shape = dict(arch="llama", hidden=512, intermediate=1536, layers=8, heads=8, kv_heads=4, vocab=8192)
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="frontierlm-bench-")
        model_dir = tmp.name
        t0 = time.perf_counter()
        make_random_model(model_dir, **{k: v for k, v in shape.items()})
        print(f"built the random model in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    else:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        shape = dict(arch=cfg.get("model_type", "?"), hidden=cfg["hidden_size"],
                     intermediate=cfg["intermediate_size"], layers=cfg["num_hidden_layers"],
                     heads=cfg["num_attention_heads"],
                     kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]), vocab=cfg["vocab_size"])
    shape["params_m"] = num_params(shape["hidden"], shape["intermediate"], shape["layers"], shape["heads"],
                                   shape["kv_heads"], shape["vocab"]) / 1e6

    reqs = make_workload(a.num_requests, shape["vocab"], a.seed)
    d_ids = decode_prompt(shape["vocab"])
    engine_kwargs = {k: v for k, v in (("max_num_seqs", a.max_num_seqs),
                                       ("max_num_batched_tokens", a.max_num_batched_tokens),
                                       ("dtype", a.dtype), ("enforce_eager", a.enforce_eager or None))
                     if v is not None}
    desc = ", ".join(f"{k}={v}" for k, v in engine_kwargs.items()) or "default engine settings"
    workload = dict(num_requests=len(reqs), prompt_tokens=sum(len(r[0]) for r in reqs),
                    output_tokens=sum(r[1] for r in reqs), decode_prompt=len(d_ids), decode_new=a.decode_new_tokens,
                    engine_desc=desc, engine_kwargs=engine_kwargs)
    try:
        flm = None if a.skip_frontierlm else bench_frontierlm(model_dir, reqs, engine_kwargs, d_ids,
                                                               a.decode_new_tokens, a.decode_repeats)
        if flm:
            print(f"FrontierLM: {flm['output_tok_s']:.1f} output tok/s, decode {flm['decode_tok_s']:.1f} tok/s",
                  file=sys.stderr)
        hf = None if a.skip_hf else bench_hf(model_dir, reqs, a.hf_batch_size, d_ids, a.decode_new_tokens,
                                             a.decode_repeats)
    finally:
        if tmp is not None:
            tmp.cleanup()
    info = machine_info(a.threads)
    print(render(info, shape, workload, flm, hf))
    result = dict(machine=info, model=shape, workload=workload,
                  frontierlm={k: v for k, v in flm.items() if k != "tokens"} if flm else None,
                  hf={k: v for k, v in hf.items() if k != "tokens"} if hf else None)
    if flm and hf:
        result["ratio_output_tok_s"] = flm["output_tok_s"] / hf["output_tok_s"]
        result["ratio_decode_tok_s"] = flm["decode_tok_s"] / hf["decode_tok_s"]
        result["greedy_agreement_32"] = greedy_agreement(flm["tokens"], hf["tokens"])
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
