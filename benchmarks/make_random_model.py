"""Write a random-weight HF-format model directory (config.json, safetensors, tokenizer) for benchmarks and demos.

    python benchmarks/make_random_model.py /tmp/llama-rand          # the benchmark shape (33.6M params, float32)
    python benchmarks/make_random_model.py /tmp/tiny --hidden 64 --intermediate 128 --layers 2 --heads 4 \
        --kv-heads 2 --vocab 512

Nothing is downloaded: the weights come from a seeded transformers model (rescaled so greedy choices are well
separated, see tests/factories.py) and the tokenizer is a byte-level BPE trained on text that ships with Python.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import factories  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_random_model(out_dir: str | Path, hidden: int = 512, intermediate: int = 1536, layers: int = 8,
                      heads: int = 8, kv_heads: int = 4, vocab: int = 8192, max_pos: int = 4096,
                      arch: str = "llama", dtype: str = "float32", seed: int = 0) -> Path:
    """Save the model + tokenizer into `out_dir` and return it. Defaults are the benchmark shape."""
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads})")
    overrides = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos)
    if arch == "qwen3":
        overrides["head_dim"] = hidden // heads
    return factories.make_model_dir(out_dir, arch=arch, seed=seed, dtype=DTYPES[dtype], **overrides)


def num_params(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> int:
    """Parameter count of an untied Llama-shaped model (no biases)."""
    head_dim = hidden // heads
    attn = hidden * hidden * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * intermediate
    return 2 * vocab * hidden + layers * (attn + mlp + 2 * hidden) + hidden


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--max-pos", type=int, default=4096)
    p.add_argument("--arch", choices=sorted(factories.ARCH_CONFIGS), default="llama")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        path = make_random_model(a.out_dir, a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads, a.vocab,
                                 a.max_pos, a.arch, a.dtype, a.seed)
    except ValueError as e:
        p.error(str(e))
    n = num_params(a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads, a.vocab)
    print(f"wrote {a.arch} model ({n / 1e6:.1f}M params, {a.dtype}, vocab {a.vocab}) to {path} "
          f"in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
