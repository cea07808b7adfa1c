"""A vLLM user's offline script, run as written for vLLM: only its import lines are rewritten to frontierlm's
modules (IMPORTS below), nothing else. It covers the quickstart (LLM, SamplingParams, generate), chat with
continue_final_message, logprobs and prompt_logprobs, allowed_token_ids, n and seeds, a v1 logits processor
with per-request extra_args, beam search, the tokenizer and model_config, and streaming through llm_engine."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

# vLLM module -> where the same names live in FrontierLM
IMPORTS = {
    "from vllm import": "from frontierlm import",
    "from vllm.sampling_params import": "from frontierlm.sampling_params import",
    "from vllm.v1.sample.logits_processor.builtin import": "from frontierlm.layers.logits_processor import",
    "from vllm.v1.sample.logits_processor import": "from frontierlm.layers.logits_processor import",
}

SCRIPT = '''
import torch

from vllm import LLM, SamplingParams
from vllm.sampling_params import BeamSearchParams, RequestOutputKind
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates


class DummyLogitsProcessor(LogitsProcessor):
    """Only the target token (SamplingParams.extra_args["target_token"]) survives in rows that ask."""

    @classmethod
    def validate_params(cls, params: SamplingParams):
        target = params.extra_args and params.extra_args.get("target_token")
        if target is not None and not isinstance(target, int):
            raise ValueError(f"target_token value {target} is not int")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.req_info: dict[int, int] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None):
        process_dict_updates(self.req_info, batch_update,
                             lambda params, _, __: params.extra_args and params.extra_args.get("target_token"))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.req_info:
            return logits
        rows = torch.tensor(list(self.req_info.keys()), dtype=torch.long, device=logits.device)
        cols = torch.tensor(list(self.req_info.values()), dtype=torch.long, device=logits.device)
        keep = logits[rows, cols].clone()
        logits[rows] = float("-inf")
        logits[rows, cols] = keep
        return logits


prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)

llm = LLM(model=MODEL, tensor_parallel_size=1, trust_remote_code=True, enforce_eager=True, max_model_len=256,
          gpu_memory_utilization=0.9, seed=0, logits_processors=[DummyLogitsProcessor])
outputs = llm.generate(prompts, sampling_params)
for output in outputs:
    prompt = output.prompt
    generated_text = output.outputs[0].text
    print(f"Prompt: {prompt!r}, Generated text: {generated_text!r}")
assert [o.prompt for o in outputs] == prompts
assert all(len(o.outputs[0].token_ids) == 16 or o.outputs[0].finish_reason == "stop" for o in outputs)

defaults = llm.get_default_sampling_params()  # the model's generation_config.json over vLLM's defaults
defaults.max_tokens = 4
assert len(llm.generate(prompts[0], defaults)[0].outputs[0].token_ids) <= 4

tokenizer = llm.llm_engine.get_tokenizer()
assert llm.llm_engine.model_config.max_model_len == 256

conversation = [
    {"role": "system", "content": "You are a helpful assistant"},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hello! How can I assist you today?"},
    {"role": "user", "content": "Write an essay about the importance of higher education."},
]
outputs = llm.chat(conversation, sampling_params, use_tqdm=False)
print(outputs[0].outputs[0].text)
outputs = llm.chat(conversation + [{"role": "assistant", "content": "Higher education"}], sampling_params,
                   add_generation_prompt=False, continue_final_message=True, use_tqdm=False)
assert outputs[0].prompt.rstrip().endswith("Higher education")

# log-probs of the output and of the prompt
params = SamplingParams(temperature=0, max_tokens=8, logprobs=5, prompt_logprobs=1, ignore_eos=True)
out = llm.generate("Hello, my name is", params)[0]
assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
for token_id, step in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
    assert step[token_id].rank == 1 and len(step) == 5
assert abs(out.outputs[0].cumulative_logprob - sum(s[t].logprob for t, s in
                                                    zip(out.outputs[0].token_ids, out.outputs[0].logprobs))) < 1e-3

# token-id prompts, allowed_token_ids, n samples with a seed
ids = tokenizer.encode("The capital of France is")
allowed = tokenizer.encode(" Paris London Rome")
out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=6, allowed_token_ids=allowed, seed=7))[0]
assert set(out.outputs[0].token_ids) <= set(allowed)
samples = llm.generate(prompts[0], SamplingParams(n=3, seed=42, max_tokens=6))[0].outputs
again = llm.generate(prompts[0], SamplingParams(n=3, seed=42, max_tokens=6))[0].outputs
assert [s.token_ids for s in samples] == [s.token_ids for s in again] and len(samples) == 3

# the custom logits processor, only for the request that asks
target = tokenizer.encode(" Paris")[0]
outs = llm.generate(prompts[:2], [SamplingParams(max_tokens=5, temperature=0),
                                  SamplingParams(max_tokens=5, temperature=0, extra_args={"target_token": target})])
assert outs[1].outputs[0].token_ids == [target] * 5
assert outs[0].outputs[0].token_ids != [target] * 5

# beam search
beams = llm.beam_search([{"prompt": "Hello, my name is"}], BeamSearchParams(beam_width=3, max_tokens=8))
for seq in beams[0].sequences:
    print(seq.text, seq.cum_logprob)
assert len(beams[0].sequences) == 3
assert beams[0].sequences[0].cum_logprob >= beams[0].sequences[-1].cum_logprob - 1e-6

# streaming through the engine, deltas only
engine = llm.llm_engine
engine.add_request("stream-0", "The future of AI is",
                   SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, output_kind=RequestOutputKind.DELTA))
pieces = []
while engine.has_unfinished_requests():
    for request_output in engine.step():
        pieces.append(request_output.outputs[0].text)
full = llm.generate("The future of AI is", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
assert "".join(pieces) == full.outputs[0].text
'''


def _as_frontierlm(script: str) -> str:
    lines = []
    for line in script.splitlines():
        for theirs, ours in IMPORTS.items():
            if line.startswith(theirs + " "):
                line = ours + line[len(theirs):]
                break
        assert not line.startswith(("from vllm", "import vllm")), line
        lines.append(line)
    return "\n".join(lines)


def test_vllm_offline_script_runs_unchanged(tiny_model_dir, capsys):
    code = _as_frontierlm(SCRIPT)
    changed = [(a, b) for a, b in zip(SCRIPT.splitlines(), code.splitlines()) if a != b]
    assert len(code.splitlines()) == len(SCRIPT.splitlines()) and len(changed) == 4  # the four import lines
    exec(compile(code, "vllm_user_script.py", "exec"), {"MODEL": tiny_model_dir("llama"), "__name__": "script"})
    out = capsys.readouterr().out
    assert out.count("Prompt: ") == 4
