"""Command-line flags that mirror EngineConfig and SamplingParams, shared by every subcommand."""
from __future__ import annotations

import argparse
import json

from frontierlm.config import EngineConfig
from frontierlm.sampling_params import SamplingParams

# (flag, field, type, help); a type of bool makes a --flag / --no-flag pair
ENGINE_FLAGS = [
    ("--max-num-seqs", "max_num_seqs", int, "most requests running at once"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, "token budget of one step"),
    ("--block-size", "block_size", int, "tokens per KV-cache block"),
    ("--enable-prefix-caching", "enable_prefix_caching", bool, "reuse cached KV blocks of shared prefixes"),
    ("--kv-cache-memory-gb", "kv_cache_memory_gb", float, "KV-cache budget in GiB (default: derived)"),
    ("--gpu-memory-utilization", "gpu_memory_utilization", float, "share of GPU memory to use on CUDA"),
    ("--dtype", "dtype", str, "auto, float32, bfloat16 or float16"),
    ("--device", "device", str, "auto, cpu or cuda[:N]"),
    ("--max-model-len", "max_model_len", int, "context length (default: the model's)"),
    ("--tokenizer", "tokenizer", str, "tokenizer directory (default: the model's)"),
    ("--load-format", "load_format", str, "auto (safetensors) or dummy (random weights from config.json)"),
    ("--speculative-config", "speculative_config", "json",
     'speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\''),
]

SAMPLING_FLAGS = [
    ("--n", "n", int, "samples per prompt"),
    ("--temperature", "temperature", float, "0 = greedy"),
    ("--top-p", "top_p", float, None),
    ("--top-k", "top_k", int, "0 = off"),
    ("--min-p", "min_p", float, None),
    ("--typical-p", "typical_p", float, None),
    ("--repetition-penalty", "repetition_penalty", float, None),
    ("--presence-penalty", "presence_penalty", float, None),
    ("--frequency-penalty", "frequency_penalty", float, None),
    ("--mirostat-mode", "mirostat_mode", int, "0 off, 1 or 2"),
    ("--mirostat-tau", "mirostat_tau", float, None),
    ("--mirostat-eta", "mirostat_eta", float, None),
    ("--max-tokens", "max_tokens", int, None),
    ("--min-tokens", "min_tokens", int, None),
    ("--sampling-seed", "seed", int, "per-request sampling seed"),
    ("--logprobs", "logprobs", int, "return the top-N log-probs per token"),
    ("--ignore-eos", "ignore_eos", bool, "keep generating past EOS"),
    ("--stop", "stop", "list", "stop string (repeatable)"),
    ("--stop-token-ids", "stop_token_ids", "ints", "comma-separated token ids"),
    ("--bad-words", "bad_words", "list", "word that must not be generated (repeatable)"),
    ("--logit-bias", "logit_bias", "json", 'JSON object, e.g. \'{"42": -100}\''),
]


def _add(group, flags):
    for flag, dest, typ, help_ in flags:
        if typ is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typ == "list":
            group.add_argument(flag, dest=dest, action="append", default=None, help=help_)
        elif typ == "ints":
            group.add_argument(flag, dest=dest, default=None, help=help_,
                               type=lambda s: [int(x) for x in s.split(",") if x.strip()])
        elif typ == "json":
            group.add_argument(flag, dest=dest, default=None, type=json.loads, help=help_)
        else:
            group.add_argument(flag, dest=dest, type=typ, default=None, help=help_)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    _add(group, ENGINE_FLAGS)
    group.add_argument("--seed", dest="engine_seed", type=int, default=None, help="engine random seed")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    _add(parser.add_argument_group("sampling"), SAMPLING_FLAGS)


def engine_kwargs(args: argparse.Namespace) -> dict:
    out = {dest: getattr(args, dest) for _, dest, _, _ in ENGINE_FLAGS if getattr(args, dest) is not None}
    if args.engine_seed is not None:
        out["seed"] = args.engine_seed
    return out


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(model=args.model, **engine_kwargs(args))


def sampling_params(args: argparse.Namespace, **defaults) -> SamplingParams:
    kw = dict(defaults)
    kw.update({dest: getattr(args, dest) for _, dest, _, _ in SAMPLING_FLAGS if getattr(args, dest) is not None})
    return SamplingParams(**kw)
