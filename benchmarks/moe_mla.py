"""MoE / MLA decode benchmark on random weights of a real shape (load_format="dummy", nothing downloaded).

Reports decode tokens/s at the given batch sizes, the share of decode time spent in the MoE layers, KV bytes
per token (MLA latent vs MHA of equal heads) and how many 4k-token requests fit in a GPU's KV budget, and on
CUDA the grouped-GEMM expert kernel against the loop over experts.

  python benchmarks/moe_mla.py --config benchmarks/configs/deepseek-v2-lite --device cuda --batch-sizes 1,64
  python benchmarks/moe_mla.py --config benchmarks/configs/deepseek-v2-lite --override num_hidden_layers=3 \
      --dtype float32 --batch-sizes 1,16     # a CPU-sized slice of the same layer shapes
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from frontierlm import LLM, SamplingParams
from frontierlm.config import ModelConfig
from frontierlm.layers.moe import MoE
from frontierlm.models.registry import get_model_class


def config_dir(path: str, overrides: list[str]) -> str:
    if not overrides:
        return path
    cfg = json.loads((Path(path) / "config.json").read_text())
    for item in overrides:
        key, value = item.split("=", 1)
        cfg[key] = json.loads(value)
    out = Path(tempfile.mkdtemp(prefix="frontierlm-cfg-"))
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


def param_bytes(path: str, dtype: torch.dtype) -> tuple[int, int]:
    """(total parameters, parameters active per token) of the model, counted on the meta device."""
    mc = ModelConfig.from_pretrained(path, dtype, load_format="dummy")
    with torch.device("meta"):
        model = get_model_class(mc.architecture)(mc)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = m.experts.w13[0].numel() + m.experts.w2[0].numel()
            inactive += per_expert * (m.routing.num_experts - m.routing.top_k)
    return total, total - inactive


class MoETimer:
    """Wall time inside MoE layers (synchronizing on CUDA, so run it in a separate pass)."""

    def __init__(self, model, device):
        self.total, self.sync = 0.0, device.type == "cuda"
        self.handles = []
        for m in model.modules():
            if isinstance(m, MoE):
                self.handles.append(m.register_forward_pre_hook(self._start))
                self.handles.append(m.register_forward_hook(self._stop))

    def _now(self):
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _start(self, module, args):
        module._t0 = self._now()

    def _stop(self, module, args, out):
        self.total += self._now() - module._t0

    def remove(self):
        for h in self.handles:
            h.remove()


def decode_rate(llm: LLM, batch: int, prompt_len: int, gen: int, vocab: int, timer: MoETimer | None = None):
    """Tokens/s of the decode steps only (after every request's prefill), and the seconds they took."""
    engine = llm.llm_engine
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}-{time.monotonic_ns()}",
                           {"prompt_token_ids": torch.randint(10, vocab, (prompt_len,), generator=g).tolist()},
                           params)
    sched = engine.scheduler
    while sched.waiting or any(r.num_output_tokens == 0 for r in sched.running):  # prefills (chunked if needed)
        engine.step()
    if timer is not None:
        timer.total = 0.0
    sync = torch.cuda.synchronize if engine.runner.device.type == "cuda" else (lambda: None)
    sync()
    t0, tokens = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        tokens += sum(1 for _ in engine.scheduler.running)
        engine.step()
    sync()
    return tokens / (time.perf_counter() - t0), time.perf_counter() - t0


def grouped_vs_loop(experts, num_tokens: int, top_k: int, reps: int = 20) -> dict:
    """One MoE layer's experts on `num_tokens` tokens routed to top_k random experts each: torch._grouped_mm
    (one kernel per projection, no host sync) against the loop with one matmul pair per active expert."""
    dev, dtype = experts.w13.device, experts.w13.dtype
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator(device=dev).manual_seed(num_tokens)
    x = torch.randn(num_tokens, experts.hidden_size, device=dev, dtype=dtype, generator=g)
    ids = torch.rand(num_tokens, experts.num_experts, device=dev, generator=g).topk(top_k, dim=-1).indices
    weights = torch.full(ids.shape, 1.0 / top_k, device=dev)
    out = {}
    for name, flag in (("grouped_mm", True), ("loop", False)):
        experts.use_grouped_mm = flag
        for _ in range(2):
            experts(x, weights, ids)
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            experts(x, weights, ids)
        sync()
        out[name + "_ms"] = round((time.perf_counter() - t0) / reps * 1e3, 3)
    experts.use_grouped_mm = None
    return out


def experts_only(path: str, dtype: torch.dtype, device: str, token_counts: list[int]) -> dict:
    """The expert computation of one MoE layer of the config's shape, random weights, nothing else built."""
    from frontierlm.layers.moe import FusedExperts

    c = ModelConfig.from_pretrained(path, dtype, load_format="dummy").hf_config
    num_experts = getattr(c, "n_routed_experts", None) or getattr(c, "num_experts", None) or c.num_local_experts
    inter = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    with torch.device(dev):
        experts = FusedExperts(num_experts, c.hidden_size, inter).to(dtype)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return {f"tokens_{n}": grouped_vs_loop(experts, n, c.num_experts_per_tok) for n in token_counts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="directory with a config.json (benchmarks/configs/...)")
    ap.add_argument("--override", action="append", default=[], help="config key=JSON value (repeatable)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory for the 4k-request capacity estimate")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--experts-only", default=None, metavar="TOKENS",
                    help="only time grouped_mm vs the expert loop of one MoE layer at these token counts, e.g. 1,64,512")
    args = ap.parse_args(argv)
    if args.experts_only:
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype]
        res = experts_only(args.config, dtype, args.device, [int(n) for n in args.experts_only.split(",")])
        res.update(config=args.config, dtype=args.dtype, torch=torch.__version__)
        print(json.dumps(res, indent=2))
        return 0

    path = config_dir(args.config, args.override)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[args.dtype]
    total, active = param_bytes(path, dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    t0 = time.perf_counter()
    llm = LLM(path, load_format="dummy", dtype=args.dtype, device=args.device, max_num_seqs=max(batches),
              max_model_len=args.prompt_len + args.gen + 16, enable_prefix_caching=False,
              max_num_batched_tokens=max(2048, args.prompt_len * max(batches)))
    mc, device = llm.llm_engine.model_config, llm.llm_engine.runner.device
    result = {"config": args.config, "overrides": args.override, "device": str(device), "dtype": args.dtype,
              "torch": torch.__version__, "params_total": total, "params_active": active,
              "startup_s": round(time.perf_counter() - t0, 1),
              "kv_bytes_per_token": mc.kv_cache_bytes_per_token(dtype),
              "mha_kv_bytes_per_token": mc.mha_kv_cache_bytes_per_token(dtype)}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    # How many 4k-token requests fit: 90% of the GPU minus the weights (activations ignored: an upper bound).
    budget = args.gpu_gib * 2**30 * 0.9 - total * elem
    for key in ("kv_bytes_per_token", "mha_kv_bytes_per_token"):
        result["max_4k_requests_" + key.replace("_bytes_per_token", "")] = max(int(budget // (4096 * result[key])), 0)

    vocab = mc.vocab_size
    decode_rate(llm, 1, 8, 4, vocab)  # warm-up
    for b in batches:
        rate, secs = decode_rate(llm, b, args.prompt_len, args.gen, vocab)
        result[f"decode_tok_s_batch{b}"] = round(rate, 2)
        timer = MoETimer(llm.llm_engine.runner.model, device)
        _, timed_secs = decode_rate(llm, b, args.prompt_len, args.gen, vocab, timer)
        timer.remove()
        result[f"moe_share_batch{b}"] = round(timer.total / timed_secs, 3) if timed_secs else None
        print(f"batch {b}: {rate:.1f} tok/s decode, MoE layers {result[f'moe_share_batch{b}']:.0%} of decode time",
              file=sys.stderr)
    if device.type == "cuda" and hasattr(torch, "_grouped_mm"):
        moe = next(m for m in llm.llm_engine.runner.model.modules() if isinstance(m, MoE))
        for n in (1, 64, 2048):
            result[f"experts_{n}_tokens"] = grouped_vs_loop(moe.experts, n, moe.routing.top_k)
    print(json.dumps(result, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    if path != args.config:
        shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
