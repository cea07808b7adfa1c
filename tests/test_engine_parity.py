"""End-to-end parity with Hugging Face transformers: the engine's greedy tokens and first-step log-probs match
transformers' on tiny random models, also with chunked prefill, prefix caching, preemption and n=3."""
import pytest
import torch

from factories import load_hf_model
from frontierlm import LLM, SamplingParams

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]
MAX_TOKENS = 12


def prompts_for(vocab=512, n=8, shared_prefix=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(10, vocab, (shared_prefix,), generator=g).tolist()
    lens = [3, 17, 5, 33, 9, 24, 1, 40][:n]
    return [prefix + torch.randint(10, vocab, (n_,), generator=g).tolist() for n_ in lens]


@pytest.fixture(scope="module")
def hf_cache():
    return {}


def hf_reference(hf_cache, model_dir, prompts):
    """Greedy tokens and first-step log-softmax per prompt from transformers, one prompt at a time."""
    key = (model_dir, tuple(map(tuple, prompts)))
    if key not in hf_cache:
        model = load_hf_model(model_dir)
        ref = []
        with torch.no_grad():
            for p in prompts:
                # A plain greedy loop of full forwards: generate()'s min_new_tokens would ban EOS, which the
                # engine (ignore_eos) may legitimately pick.
                seq = list(p)
                logp = torch.log_softmax(model(torch.tensor([p])).logits[0, -1].float(), -1)
                for _ in range(MAX_TOKENS):
                    seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
                out = torch.tensor([seq])
                ref.append((out[0, len(p):].tolist(), logp))
        hf_cache[key] = ref
    return hf_cache[key]


def greedy(n=1, logprobs=5):
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, n=n, logprobs=logprobs)


def check(outputs, ref, n=1):
    for out, (tokens, logp) in zip(outputs, ref):
        assert len(out.outputs) == n
        for c in out.outputs:
            assert c.token_ids == tokens
            first = c.logprobs[0]
            for tid, lp in first.items():
                assert abs(lp.logprob - logp[tid].item()) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_parity(arch, tiny_model_dir, hf_cache):
    extra = {"sliding_window": 16} if arch == "mistral" else {}
    d = tiny_model_dir(arch, **extra)
    prompts = prompts_for()
    ref = hf_reference(hf_cache, d, prompts)
    llm = LLM(d, block_size=4)
    check(llm.generate(prompts, greedy(), use_tqdm=False), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_chunked_prefix_preemption_and_n3(arch, tiny_model_dir, hf_cache):
    extra = {"sliding_window": 16} if arch == "mistral" else {}
    d = tiny_model_dir(arch, **extra)
    prompts = prompts_for(shared_prefix=20, seed=1)
    ref = hf_reference(hf_cache, d, prompts)
    # chunked prefill: a budget smaller than most prompts
    llm = LLM(d, block_size=4, max_num_batched_tokens=8)
    check(llm.generate(prompts, greedy(), use_tqdm=False), ref)
    # prefix caching: run twice; the second run hits the cache for the shared prefix
    llm = LLM(d, block_size=4)
    check(llm.generate(prompts, greedy(), use_tqdm=False), ref)
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    check(outs, ref)
    assert all(o.num_cached_tokens > 0 for o in outs if len(o.prompt_token_ids) > 8)
    # preemption: a KV budget of 24 blocks of 4 tokens for 8 requests of up to 72 tokens each
    mc_bytes = llm.llm_engine.model_config.kv_cache_bytes_per_token()
    llm = LLM(d, block_size=4, kv_cache_memory_gb=24 * 4 * mc_bytes / 2**30)
    check(llm.generate(prompts, greedy(), use_tqdm=False), ref)
    assert llm.llm_engine.get_stats()["num_preemptions"] > 0
    # n=3: three greedy samples, all equal to the reference, sharing the prompt's blocks
    llm = LLM(d, block_size=4)
    check(llm.generate(prompts, greedy(n=3), use_tqdm=False), ref, n=3)
