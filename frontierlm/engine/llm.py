"""LLM: the offline entry point (vLLM's shape): generate() and chat() over an LLMEngine."""
from __future__ import annotations

from typing import Sequence

from tqdm.auto import tqdm

from frontierlm.config import EngineConfig
from frontierlm.engine.chat_template import render_chat
from frontierlm.engine.llm_engine import LLMEngine
from frontierlm.outputs import RequestOutput
from frontierlm.sampling_params import SamplingParams


def _is_token_ids(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(
        isinstance(t, int) and not isinstance(t, bool) for t in x)


class LLM:
    def __init__(self, model: str | None = None, **kwargs):
        if model is None:  # the demo model that ships with the package
            from frontierlm.assets import default_model

            model = default_model()
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Generate for one prompt or a list (strings, token-id lists or {"prompt_token_ids": ...} dicts);
        outputs come back in input order."""
        if isinstance(prompts, (str, dict)) or _is_token_ids(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        n = len(prompts)
        params = _per_prompt(sampling_params if sampling_params is not None else SamplingParams(), n,
                             "sampling_params")
        prios = _per_prompt(priority if priority is not None else 0, n, "priority")
        engine = self.llm_engine
        ids = []
        try:
            for prompt, p, prio in zip(prompts, params, prios):
                ids.append(engine.add_request(None, prompt, p, priority=prio))
        except Exception:
            engine.abort_request(ids)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, chat_template: str | None = None,
             priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them, through the chat template."""
        tok = self.get_tokenizer()
        if tok is None:
            raise ValueError("chat needs a tokenizer with a chat template; this model directory has none")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            # special-token text inside messages is tokenized as text, roles are checked (chat_template.py)
            text, ids = render_chat(tok, conv, add_generation_prompt, chat_template=chat_template)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, priority=priority)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        pending = set(ids)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        num_out = 0
        try:
            while pending:
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        pending.discard(out.request_id)
                        done[out.request_id] = out
                        num_out += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        elapsed = bar.format_dict["elapsed"] or 1e-9
                        bar.set_postfix_str(f"{num_out / elapsed:.1f} out tok/s", refresh=False)
        except BaseException:
            engine.abort_request(list(pending))
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]


def _per_prompt(x, n: int, name: str) -> list:
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"{name} has {len(x)} entries for {n} prompts")
        return list(x)
    return [x] * n
