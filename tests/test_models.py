"""Model side vs the transformers oracle: plain causal path, paged KV path (mixed batches, chunked prefill,
decodes), RoPE scaling types, sharded / low-precision loading and the loader's error messages."""
from __future__ import annotations

import functools
import json
import random
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import load_hf_model, make_model_dir
from frontierlm.config import ModelConfig
from frontierlm.layers.attention import AttentionMetadata, _TorchPlan
from frontierlm.layers.rotary import rope_parameters
from frontierlm.models.loader import load_model
from frontierlm.models.registry import get_model_class, supported_architectures

ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls run faster on one thread


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """model_dir(arch, **overrides) -> a cached tiny checkpoint directory."""
    cache = {}

    def get(arch="llama", **kw):
        key = (arch, json.dumps(kw, sort_keys=True, default=str))
        if key not in cache:
            cache[key] = make_model_dir(tmp_path_factory.mktemp(arch), arch, **kw)
        return cache[key]

    return get


def ours(path, dtype=None):
    return load_model(ModelConfig.from_pretrained(path, dtype), "cpu")


@functools.lru_cache(maxsize=8)
def _hf_model(path, dtype):
    return load_hf_model(path, dtype)


@torch.inference_mode()
def hf_logits(path, ids, dtype=torch.float32):
    return _hf_model(str(path), dtype).forward(torch.tensor([ids])).logits[0].float()


@torch.inference_mode()
def plain_logits(model, ids):
    return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), None))


def tokens(n, seed=0):
    return torch.randint(4, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class PagedRunner:
    """A minimal engine: shuffled block ids per sequence, builds AttentionMetadata for each step."""

    def __init__(self, model, block_size, num_blocks=96, seed=0):
        mc = model.config
        self.model, self.bs = model, block_size
        model.bind_kv_cache([torch.zeros(s, dtype=mc.dtype) for s in model.kv_cache_shapes(num_blocks, block_size)])
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables, self.done = {}, {}

    @torch.inference_mode()
    def step(self, chunks, num_pad=1):
        """chunks: [(seq_id, new_token_ids)] -> per chunk logits [len, vocab]. Adds `num_pad` -1 slots."""
        ids, pos, slots, qlens, slens = [], [], [], [], []
        for sid, toks in chunks:
            start = self.done.get(sid, 0)
            table = self.tables.setdefault(sid, [])
            end = start + len(toks)
            while len(table) * self.bs < end:
                table.append(self.free.pop())
            for p in range(start, end):
                slots.append(table[p // self.bs] * self.bs + p % self.bs)
            ids += toks
            pos += range(start, end)
            qlens.append(len(toks))
            slens.append(end)
            self.done[sid] = end
        ids += [0] * num_pad
        pos += [0] * num_pad
        slots += [-1] * num_pad
        width = max(len(self.tables[s]) for s, _ in chunks) + 1  # extra 0 padding column
        tables = [self.tables[s] + [0] * (width - len(self.tables[s])) for s, _ in chunks]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32),
            seq_lens=torch.tensor(slens, dtype=torch.int32), block_tables=torch.tensor(tables, dtype=torch.int32),
            query_lens_cpu=qlens, seq_lens_cpu=slens, max_query_len=max(qlens), max_seq_len=max(slens),
            block_size=self.bs)
        logits = self.model.compute_logits(self.model(torch.tensor(ids), torch.tensor(pos), meta))
        return list(logits[: sum(qlens)].split(qlens))


def run_schedule(runner, seqs, schedule, num_pad=1):
    """schedule: list of steps, each {seq_id: num_new_tokens}; returns {seq_id: logits of every position}."""
    out = {s: [] for s in seqs}
    for step in schedule:
        chunks = []
        for sid, n in step.items():
            start = runner.done.get(sid, 0)
            chunks.append((sid, seqs[sid][start:start + n]))
        for (sid, _), lg in zip(chunks, runner.step(chunks, num_pad)):
            out[sid].append(lg)
    return {s: torch.cat(v) for s, v in out.items()}


# ---------------------------------------------------------------- plain causal path vs transformers

PARITY_CASES = [
    ("llama", dict(num_key_value_heads=4)),                       # MHA
    ("llama", dict(num_key_value_heads=2)),                       # GQA
    ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),  # MQA, tied
    ("llama", dict(attention_bias=True, mlp_bias=True)),
    ("qwen2", dict(tie_word_embeddings=True)),
    ("qwen2", dict(num_key_value_heads=1)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),  # layer 1 windowed
    ("qwen3", dict()),
    ("qwen3", dict(num_key_value_heads=4, tie_word_embeddings=True, head_dim=32)),
    ("qwen3", dict(attention_bias=True, num_key_value_heads=1)),
    ("mistral", dict(sliding_window=8)),
    ("mistral", dict(sliding_window=8, num_key_value_heads=1, tie_word_embeddings=True)),
    ("mixtral", dict()),
    ("mixtral", dict(sliding_window=8, num_experts_per_tok=1)),
    ("qwen2_moe", dict()),
    ("qwen2_moe", dict(norm_topk_prob=True, decoder_sparse_step=2)),
    ("qwen3_moe", dict()),
    ("deepseek_v2", dict()),                                              # group-limited greedy, no q LoRA
    ("deepseek_v2", dict(topk_method="greedy", q_lora_rank=24, n_shared_experts=2)),
    ("deepseek_v3", dict()),                                              # noaux_tc + correction bias
    ("deepseek_v3", dict(rope_interleave=False, q_lora_rank=None, first_k_dense_replace=0)),
    ("deepseek_v3", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=0.707,
                                              mscale_all_dim=0.707, original_max_position_embeddings=128,
                                              beta_fast=32, beta_slow=1))),
]


@pytest.mark.parametrize("arch,kw", PARITY_CASES, ids=lambda x: x if isinstance(x, str) else "-".join(x))
def test_plain_path_matches_hf(model_dir, arch, kw):
    path, ids = model_dir(arch, **kw), tokens(37)
    model = ours(path)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == kw.get("tie_word_embeddings", False)
    ref, got = hf_logits(path, ids), plain_logits(model, ids)
    assert got.dtype == torch.float32 and got.shape == (37, 512)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_plain_path_accepts_batch(model_dir):
    path = model_dir("mistral", sliding_window=8)
    model, a, b = ours(path), tokens(20, 1), tokens(20, 2)
    with torch.inference_mode():
        h = model(torch.tensor([a, b]), torch.arange(20).expand(2, 20), None)
        logits = model.compute_logits(h)
    torch.testing.assert_close(logits[1], hf_logits(path, b), atol=ATOL, rtol=0)


# ---------------------------------------------------------------- paged path vs transformers

PAGED_ARCHS = [("llama", {}), ("qwen2", dict(tie_word_embeddings=True)), ("qwen3", dict(num_key_value_heads=1)),
               ("mistral", dict(sliding_window=8)), ("mixtral", dict(sliding_window=8)), ("qwen2_moe", {}),
               ("deepseek_v2", {}), ("deepseek_v3", {})]


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("arch,kw", PAGED_ARCHS, ids=[a for a, _ in PAGED_ARCHS])
def test_paged_path_matches_hf(model_dir, arch, kw, block_size):
    path = model_dir(arch, **kw)
    seqs = {"a": tokens(30, 1), "b": tokens(21, 2), "c": tokens(12, 3), "d": tokens(9, 4)}
    schedule = [
        {"a": 30, "b": 9, "c": 1},          # full prefill, chunk of a prefill, a 1-token prefill
        {"b": 8, "c": 1, "d": 6},           # extend over a cached prefix, decode-like step, new prefill
        {"b": 1, "c": 7, "d": 1},           # decode, extend, decode
        {"b": 3, "d": 2},
        *[{"b": 1, "c": 1, "d": 1}] * 2,    # batched decodes
        {"c": 1},
    ]
    got = run_schedule(PagedRunner(ours(path), block_size), seqs, schedule)
    for sid, logits in got.items():
        ref = hf_logits(path, seqs[sid])[: len(logits)]
        torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0, msg=lambda m: f"seq {sid}: {m}")


@pytest.mark.parametrize("group_bytes", [None, 1, 128 * 72], ids=["one-group", "per-seq", "pairs"])
def test_paged_decodes_in_any_order(model_dir, monkeypatch, group_bytes):
    """Decode rows not contiguous (prefill between them), long contexts across many blocks, and the CPU
    decode grouping (128 bytes of K per token here, so 128 * 72 puts about two sequences in a group)."""
    if group_bytes is not None:
        monkeypatch.setattr(_TorchPlan, "GROUP_BYTES", group_bytes)
    path = model_dir("mistral", sliding_window=8)
    seqs = {i: tokens(40, 10 + i) for i in range(4)}
    schedule = [{0: 33, 1: 35, 2: 20, 3: 38}, {0: 1, 2: 12, 1: 1, 3: 1}, {3: 1, 0: 1, 1: 1, 2: 1}]
    got = run_schedule(PagedRunner(ours(path), 4, num_blocks=64, seed=3), seqs, schedule, num_pad=0)
    for sid, logits in got.items():
        torch.testing.assert_close(logits, hf_logits(path, seqs[sid])[: len(logits)], atol=ATOL, rtol=0)


def test_kv_cache_binding_errors(model_dir):
    model = ours(model_dir("llama"))
    meta = AttentionMetadata(torch.tensor([0]), torch.tensor([0, 1], dtype=torch.int32),
                             torch.tensor([1], dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                             [1], [1], 1, 1, 4)
    with pytest.raises(RuntimeError, match="bind_kv_cache"):
        model(torch.tensor([5]), torch.tensor([0]), meta)
    with pytest.raises(ValueError, match="KV cache must be"):
        model.bind_kv_cache([torch.zeros(2, 4, 4, 3, 16)] * 2)
    with pytest.raises(ValueError, match="2 layers"):
        model.bind_kv_cache([torch.zeros(2, 4, 4, 2, 16)])


# ---------------------------------------------------------------- RoPE scaling types

ROPES = {
    "linear": dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, rope_theta=10000.0),
    "yarn-mscale": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, rope_theta=500.0,
                        mscale=1.0, mscale_all_dim=0.5, beta_fast=16, beta_slow=2),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32, rope_theta=10000.0),
}


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_scaling_matches_hf(model_dir, name):
    # max_position_embeddings=48 < 70 tokens: dynamic NTK rescales inside a single forward.
    path = model_dir("llama", rope_parameters=ROPES[name], max_position_embeddings=48)
    ids = tokens(70, 5)
    ref, model = hf_logits(path, ids), ours(path)
    torch.testing.assert_close(plain_logits(model, ids), ref, atol=ATOL, rtol=0)
    # The same sequence prefilled in one paged step (dynamic NTK uses that sequence's length).
    got = run_schedule(PagedRunner(model, 16), {"s": ids}, [{"s": 70}])["s"]
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_legacy_rope_scaling_config(model_dir, tmp_path):
    """Older config.json files carry `rope_scaling` + `rope_theta` instead of `rope_parameters`."""
    path = shutil.copytree(model_dir("llama"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters")
    (path / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"type": "linear", "factor": 2.0},
                                                  "rope_theta": 500.0}))
    ids = tokens(30)
    torch.testing.assert_close(plain_logits(ours(path), ids), hf_logits(path, ids), atol=ATOL, rtol=0)


def test_rope_parameters_accepts_legacy_rope_scaling():
    old = SimpleNamespace(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=500.0)
    assert rope_parameters(old) == {"type": "linear", "factor": 2.0, "rope_theta": 500.0, "rope_type": "linear"}
    assert rope_parameters(SimpleNamespace())["rope_type"] == "default"


# ---------------------------------------------------------------- loading: shards, dtypes, config

def test_sharded_checkpoint_loads_identically(model_dir):
    single, sharded = model_dir("qwen2"), model_dir("qwen2", max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 2
    ids = tokens(16)
    assert torch.equal(plain_logits(ours(single), ids), plain_logits(ours(sharded), ids))


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 0.06), (torch.float16, 0.01)])
def test_low_precision_loads_and_runs(model_dir, dtype, atol):
    path = model_dir("qwen3")  # a float32 checkpoint, cast at load time
    model, ids = ours(path, dtype), tokens(24)
    assert {p.dtype for p in model.parameters()} == {dtype}
    got, ref = plain_logits(model, ids), hf_logits(path, ids, dtype)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=atol, rtol=0)
    paged = run_schedule(PagedRunner(model, 4), {"s": ids}, [{"s": 20}, {"s": 1}, {"s": 3}])["s"]
    torch.testing.assert_close(paged, ref, atol=atol, rtol=0)


def test_checkpoint_dtype_is_default(model_dir):
    mc = ModelConfig.from_pretrained(model_dir("llama", dtype=torch.bfloat16))
    assert mc.dtype == torch.bfloat16
    assert ModelConfig.from_pretrained(model_dir("llama"), "float16").dtype == torch.float16


def test_model_config_fields(model_dir, tmp_path):
    path = shutil.copytree(model_dir("qwen3", num_key_value_heads=1), tmp_path / "m")
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [7, 2]}))
    mc = ModelConfig.from_pretrained(path)
    assert (mc.architecture, mc.num_layers, mc.num_heads, mc.num_kv_heads, mc.head_dim) == \
        ("Qwen3ForCausalLM", 2, 4, 1, 16)
    assert (mc.vocab_size, mc.hidden_size, mc.max_model_len, mc.sliding_window) == (512, 64, 512, None)
    assert mc.eos_token_ids == [2, 7] and mc.bos_token_id == 1 and mc.dtype == torch.float32
    assert mc.kv_cache_bytes_per_token() == 2 * 2 * 1 * 16 * 4
    assert mc.kv_cache_bytes_per_token(torch.bfloat16) == 2 * 2 * 1 * 16 * 2
    assert mc.hf_config.model_type == "qwen3"
    assert ModelConfig.from_pretrained(model_dir("mistral", sliding_window=8)).sliding_window == 8


def test_registry():
    assert supported_architectures() == sorted([
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MixtralForCausalLM",
        "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"])
    assert get_model_class("Qwen3ForCausalLM").__name__ == "Qwen3ForCausalLM"
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        get_model_class("GPT2LMHeadModel")


# ---------------------------------------------------------------- errors

def _copy(model_dir, tmp_path, **kw):
    return shutil.copytree(model_dir("llama", **kw), tmp_path / "m")


def test_error_missing_dir_and_config(tmp_path, model_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelConfig.from_pretrained(tmp_path / "nope")
    path = _copy(model_dir, tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_pretrained(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_pretrained(path)


def test_error_unsupported_architecture(tmp_path, model_dir):
    path = _copy(model_dir, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*Qwen3ForCausalLM"):
        ModelConfig.from_pretrained(path)


def test_error_missing_weights(tmp_path, model_dir):
    path = _copy(model_dir, tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        ModelConfig.from_pretrained(path)


def test_error_index_names_missing_shard(tmp_path, model_dir):
    path = _copy(model_dir, tmp_path, max_shard_size="50KB")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        ModelConfig.from_pretrained(path)


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.k_proj.weight", "model.norm.weight", "lm_head.weight"])
def test_error_missing_tensor(tmp_path, model_dir, name):
    path = _copy(model_dir, tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"missing 1 weights: {name}"):
        ours(path)
