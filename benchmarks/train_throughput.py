"""Training throughput of candidate model shapes on this machine: tokens/s of full optimizer steps
(forward, backward, AdamW) in float32 and in bf16 autocast, for picking the demo model's size.

    taskset -c 0 python benchmarks/train_throughput.py --threads 1 --steps 4
Prints one JSON line per (shape, precision): parameters (total / active per token), step FLOPs estimate, tok/s.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from frontierlm.train.config import ModelSection, OptimSection
from frontierlm.train.modeling import CausalLM, auxiliary_losses, build_hf_config, build_model
from frontierlm.train.optim import build_optimizer
from frontierlm.train.precision import autocast_context, cpu_bf16_unit

_BASE = dict(architecture="DeepseekV3ForCausalLM", max_position_embeddings=1024, num_experts_per_tok=2,
             num_shared_experts=1, first_k_dense_replace=1, q_lora_rank=0, qk_rope_head_dim=16,
             num_nextn_predict_layers=1, extra={"routed_scaling_factor": 1.0})
SHAPES = {  # name: hidden, layers, heads, dense intermediate, experts, expert intermediate, kv_lora, head dims
    "192x4": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                  num_experts=8, moe_intermediate_size=128, kv_lora_rank=64, qk_nope_head_dim=32,
                  v_head_dim=32),
    "256x6": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=704,
                  num_experts=8, moe_intermediate_size=160, kv_lora_rank=64, qk_nope_head_dim=48,
                  v_head_dim=48),
    "v1-256x4": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=688,
                     num_experts=8, moe_intermediate_size=128, kv_lora_rank=64, qk_nope_head_dim=32,
                     v_head_dim=32),
    "384x6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1024,
                  num_experts=8, moe_intermediate_size=256, kv_lora_rank=96, qk_nope_head_dim=48, v_head_dim=48),
    "512x6": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1408,
                  num_experts=8, moe_intermediate_size=352, kv_lora_rank=128, qk_nope_head_dim=48,
                  v_head_dim=48),
    "512x8": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1408,
                  num_experts=16, moe_intermediate_size=256, kv_lora_rank=128, qk_nope_head_dim=48,
                  v_head_dim=48),
}


def count_params(model, hf) -> tuple[int, int]:
    """(total, active per token): routed experts count num_experts_per_tok / num_experts of their weights."""
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n and "shared" not in n)
    k, e = getattr(hf, "num_experts_per_tok", 1), getattr(hf, "n_routed_experts", 1)
    return total, total - routed + routed * k // e


def measure(name: str, shape: dict, vocab: int, seq_len: int, batch: int, steps: int, bf16: bool) -> dict:
    section = ModelSection(**{**_BASE, **shape})
    section.validate()
    hf = build_hf_config(section, vocab, 1, 2, 3)
    model = build_model(hf, "cpu", 0)
    model.mtp_loss_weight = 0.3
    lm = CausalLM(model)
    opt = build_optimizer(model, OptimSection(), torch.device("cpu"))
    ids = torch.randint(0, vocab, (batch, seq_len + 1))
    times = []
    for i in range(steps + 1):  # the first step warms the allocator and oneDNN's kernel cache
        t0 = time.perf_counter()
        with autocast_context(torch.device("cpu"), bf16):
            hidden, logits = lm(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
            for value in auxiliary_losses(model, hidden, ids[:, :-1], ids[:, 1:]).values():
                loss = loss + value
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    total, active = count_params(model, hf)
    non_embed_active = active - vocab * shape["hidden_size"]  # tied embeddings: the LM head is a matmul
    tok_s = batch * seq_len / (sum(times) / len(times))
    return {"shape": name, "precision": "bf16" if bf16 else "float32", "params_M": round(total / 1e6, 2),
            "active_M": round(active / 1e6, 2), "tok_s": round(tok_s),
            "approx_tflops": round(6 * (non_embed_active + vocab * shape["hidden_size"]) * tok_s / 1e12, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precisions", nargs="*", default=["bf16", "float32"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"cpu_bf16_unit": cpu_bf16_unit(), "threads": args.threads, "torch": torch.__version__}))
    for name in args.shapes:
        for precision in args.precisions:
            print(json.dumps(measure(name, SHAPES[name], args.vocab, args.seq_len, args.batch, args.steps,
                                     precision == "bf16")), flush=True)


if __name__ == "__main__":
    main()
