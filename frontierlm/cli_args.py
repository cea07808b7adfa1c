"""Command-line flags that mirror EngineConfig and SamplingParams, shared by every subcommand."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from frontierlm.config import EngineConfig
from frontierlm.sampling_params import SamplingParams, StructuredOutputsParams

# (flag, field, type, help); a type of bool makes a --flag / --no-flag pair
ENGINE_FLAGS = [
    ("--max-num-seqs", "max_num_seqs", int, "most requests running at once"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, "token budget of one step"),
    ("--block-size", "block_size", int, "tokens per KV-cache block"),
    ("--enable-prefix-caching", "enable_prefix_caching", bool, "reuse cached KV blocks of shared prefixes"),
    ("--kv-cache-memory-gb", "kv_cache_memory_gb", float,
     "KV-cache budget in GiB, per rank in a parallel run (default: derived)"),
    ("--gpu-memory-utilization", "gpu_memory_utilization", float, "share of GPU memory to use on CUDA"),
    ("--dtype", "dtype", str, "auto, float32, bfloat16 or float16"),
    ("--device", "device", str, "auto, cpu or cuda[:N]"),
    ("--max-model-len", "max_model_len", int, "context length (default: the model's)"),
    ("--tokenizer", "tokenizer", str, "tokenizer directory (default: the model's)"),
    ("--load-format", "load_format", str, "auto (safetensors) or dummy (random weights from config.json)"),
    ("--structured-outputs-backend", "structured_outputs_backend", str,
     "auto (xgrammar, guidance where xgrammar cannot enforce the constraint), xgrammar or guidance"),
    ("--enforce-eager", "enforce_eager", bool,
     "no compiled / CUDA-graphed decode step (default: eager on CPU, where compiling takes minutes)"),
    ("--compile-decode-at-startup", "compile_decode_at_startup", bool,
     "with the decode fast path on, compile its graphs at start-up instead of on first use "
     "(default: on for serve, off otherwise)"),
    ("--quantization", "quantization", str,
     "fp8, int8 or int4: quantize a float checkpoint while loading (default: the checkpoint's own)"),
    ("--kv-cache-dtype", "kv_cache_dtype", str, "auto (the model's dtype), fp8 / fp8_e4m3 or fp8_e5m2"),
    ("--speculative-config", "speculative_config", "json",
     'speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\''),
    ("--kv-transfer-config", "kv_transfer_config", "json",
     'disaggregated prefill / decode, e.g. \'{"kv_connector": "TorchDistributedConnector", "kv_role": '
     '"kv_producer", "kv_rank": 0, "kv_parallel_size": 2, "kv_port": 14579}\''),
    ("--step-log", "step_log", str, "write each engine step's shape and wall time to this CSV (sim calibration)"),
    # parallelism (frontierlm/distributed; README "Parallelism" has a two-node example)
    ("--tensor-parallel-size", "tensor_parallel_size", int, "tensor-parallel ranks"),
    ("--pipeline-parallel-size", "pipeline_parallel_size", int, "pipeline stages"),
    ("--enable-expert-parallel", "enable_expert_parallel", bool, "MoE: whole experts across the TP ranks"),
    ("--distributed-executor-backend", "distributed_executor_backend", str, "mp (local processes; the only one)"),
    ("--nnodes", "nnodes", int, "nodes of a multi-node run (one launcher per node)"),
    ("--node-rank", "node_rank", int, "this node's number (0 serves; the others run workers)"),
    ("--master-addr", "master_addr", str, "node 0's address for the rendezvous (private network only)"),
    ("--master-port", "master_port", int, "rendezvous port on --master-addr (default: a free one, one node)"),
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
    ("--logprobs", "logprobs", int, "print the sampled token's log-prob and the top N per token"),
    ("--ignore-eos", "ignore_eos", bool, "keep generating past EOS"),
    ("--stop", "stop", "list", "stop string (repeatable)"),
    ("--stop-token-ids", "stop_token_ids", "ints", "comma-separated token ids"),
    ("--bad-words", "bad_words", "list", "word that must not be generated (repeatable)"),
    ("--logit-bias", "logit_bias", "json", 'JSON object, e.g. \'{"42": -100}\''),
]


def _defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
    return out


def _with_default(help_: str | None, dest: str, defaults: dict) -> str | None:
    """Show the value the engine uses when the flag is left out (the flags themselves default to None)."""
    if help_ and "default" in help_:
        return help_
    value = defaults.get(dest)
    if value is None or value == [] or dest not in defaults:
        return help_
    shown = f"(default: {value})"
    return f"{help_} {shown}" if help_ else shown


def _add(group, flags, defaults: dict):
    for flag, dest, typ, help_ in flags:
        help_ = _with_default(help_, dest, defaults)
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
    _add(group, ENGINE_FLAGS, _defaults(EngineConfig) | {"device": "auto (cuda if available, else cpu)"})
    group.add_argument("--seed", dest="engine_seed", type=int, default=None, help="engine random seed (default: 0)")
    group.add_argument("--num-threads", type=_positive_int, default=None,
                       help="CPU threads for PyTorch (default: torch's choice, one per core); on a shared or busy "
                            "machine fewer threads than cores is often much faster")


def add_sampling_args(parser: argparse.ArgumentParser, structured: bool = False) -> None:
    group = parser.add_argument_group("sampling")
    _add(group, SAMPLING_FLAGS, _defaults(SamplingParams))
    if structured:  # one of these: StructuredOutputsParams
        so = parser.add_argument_group("structured output (one of)")
        so.add_argument("--json-schema", default=None, metavar="SCHEMA",
                        help="a JSON schema, inline or a file path; the output is JSON that validates")
        so.add_argument("--grammar", default=None, metavar="GBNF",
                        help="a GBNF grammar: inline, a .gbnf file, or builtin:NAME (e.g. builtin:json)")
        so.add_argument("--regex", default=None, help="a regular expression the whole output matches")
        so.add_argument("--choice", action="append", default=None,
                        help="the output is exactly one of these strings (repeatable)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def structured_outputs(args: argparse.Namespace) -> StructuredOutputsParams | None:
    """The structured-output flags as StructuredOutputsParams (a file path is read), or None."""
    given = {k: getattr(args, k, None) for k in ("json_schema", "grammar", "regex", "choice")}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"give only one of --json-schema, --grammar, --regex, --choice (got "
                         f"{', '.join('--' + k.replace('_', '-') for k in given)})")
    kind, value = next(iter(given.items()))
    if kind in ("json_schema", "grammar") and not value.startswith("builtin:") and _is_file(value):
        value = Path(value).read_text()
    if kind == "json_schema":
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"--json-schema is neither a file nor valid JSON: {e}") from None
        return StructuredOutputsParams(json=value)
    return StructuredOutputsParams(**{kind: value})


def _is_file(value: str) -> bool:
    try:
        return len(value) < 4096 and Path(value).is_file()
    except OSError:
        return False


def engine_kwargs(args: argparse.Namespace) -> dict:
    out = {dest: getattr(args, dest) for _, dest, _, _ in ENGINE_FLAGS if getattr(args, dest) is not None}
    if args.engine_seed is not None:
        out["seed"] = args.engine_seed
    return out


def engine_config(args: argparse.Namespace, **defaults) -> EngineConfig:
    """The engine flags as an EngineConfig; `defaults` are a subcommand's own defaults (flags given win)."""
    return EngineConfig(model=args.model, **(defaults | engine_kwargs(args)))


def sampling_params(args: argparse.Namespace, **defaults) -> SamplingParams:
    kw = dict(defaults)
    kw.update({dest: getattr(args, dest) for _, dest, _, _ in SAMPLING_FLAGS if getattr(args, dest) is not None})
    so = structured_outputs(args)
    if so is not None:
        kw["structured_outputs"] = so
    return SamplingParams(**kw)
