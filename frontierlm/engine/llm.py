"""LLM: the offline entry point (vLLM's shape): generate(), chat() and beam_search() over an LLMEngine."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from frontierlm.jsonfile import read_json_object
from frontierlm.compat import UNSUPPORTED_ENGINE_ARGS, check_kwargs
from frontierlm.config import EngineConfig
from frontierlm.engine.chat_template import render_chat
from frontierlm.engine.llm_engine import LLMEngine
from frontierlm.outputs import RequestOutput
from frontierlm.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

# generation_config.json keys that are sampling defaults, and the SamplingParams field each sets (vLLM's set)
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_config_defaults(directory: Path) -> dict:
    """SamplingParams keyword defaults from `directory`/generation_config.json ({} when there is none): the
    one reader behind LLM.get_default_sampling_params and `serve --generation-config`."""
    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return {}
    config = read_json_object(path)
    defaults = {ours: config[key] for key, ours in GENERATION_DEFAULTS.items() if config.get(key) is not None}
    if config.get("do_sample") is False:  # transformers' greedy flag
        defaults["temperature"] = 0.0
    return defaults


# vLLM keywords of generate / chat that only make sense for features FrontierLM lacks: accepted at None
_NOT_YET = {"lora_request": None, "prompt_adapter_request": None, "mm_processor_kwargs": None,
            "tokenization_kwargs": None, "concurrency_limit": None, "truncate_prompt_tokens": None}


def _is_token_ids(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(
        isinstance(t, int) and not isinstance(t, bool) for t in x)


class LLM:
    def __init__(self, model: str | None = None, **kwargs):
        if model is None:  # the demo model that ships with the package
            from frontierlm.assets import default_model

            model = default_model()
        known = [f.name for f in dataclasses.fields(EngineConfig)]
        check_kwargs("LLM()", kwargs, known, UNSUPPORTED_ENGINE_ARGS)
        kwargs = {k: v for k, v in kwargs.items() if k in known}  # neutral-valued vLLM options ask for nothing
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's: SamplingParams() with the sampling defaults of the model's generation_config.json (temperature,
        top_p, top_k, min_p, repetition_penalty; max_new_tokens as max_tokens) where it sets them."""
        return SamplingParams(**generation_config_defaults(Path(self.llm_engine.config.model)))

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None, **kwargs) -> list[RequestOutput]:
        """Generate for one prompt or a list (strings, token-id lists or {"prompt_token_ids": ...} dicts);
        outputs come back in input order, each complete (the output_kind of the params does not matter here)."""
        check_kwargs("LLM.generate", kwargs, ("prompts", "sampling_params", "use_tqdm", "priority"), _NOT_YET)
        if isinstance(prompts, (str, dict)) or _is_token_ids(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        n = len(prompts)
        params = _per_prompt(sampling_params if sampling_params is not None else SamplingParams(), n,
                             "sampling_params")
        # only the final output of each request is wanted (as vLLM's LLM does), without touching the caller's
        params = [_final_only(p) for p in params]
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
             priority: Sequence[int] | None = None, continue_final_message: bool = False,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
             chat_template_content_format: str = "auto", **kwargs) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} dicts) or a list of them, through the chat template.
        continue_final_message=True leaves the last (assistant) message open for the model to continue."""
        check_kwargs("LLM.chat", kwargs, ("messages", "sampling_params", "use_tqdm", "add_generation_prompt",
                                          "chat_template", "priority", "continue_final_message", "tools",
                                          "chat_template_kwargs", "chat_template_content_format"), _NOT_YET)
        tok = self.get_tokenizer()
        if tok is None:
            raise ValueError("chat needs a tokenizer with a chat template; this model directory has none")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message=True needs add_generation_prompt=False (vLLM's rule: the "
                             "model continues the last message instead of starting a new one)")
        if chat_template_content_format not in ("auto", "string"):
            raise ValueError(f"chat_template_content_format={chat_template_content_format!r} is not supported "
                             "yet (messages are rendered with string content)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for conv in conversations:
            if continue_final_message and (not conv or conv[-1].get("role") != "assistant"):
                raise ValueError("continue_final_message=True needs the conversation to end with an assistant "
                                 "message")
            # special-token text inside messages is tokenized as text, roles are checked (chat_template.py)
            text, ids = render_chat(tok, conv, add_generation_prompt, continue_final_message=continue_final_message,
                                    chat_template=chat_template, tools=tools, **(chat_template_kwargs or {}))
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, priority=priority)

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False, **kwargs):
        """Beam search (engine/beam_search.py): one BeamSearchOutput per prompt, its `sequences` best first.
        Prompts: strings, token-id lists, or {"prompt": ...} / {"prompt_token_ids": ...} dicts."""
        from frontierlm.engine.beam_search import beam_search

        check_kwargs("LLM.beam_search", kwargs, ("prompts", "params", "use_tqdm"), _NOT_YET)
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if isinstance(prompts, (str, dict)) or _is_token_ids(prompts):
            prompts = [prompts]
        ids = [self.llm_engine._tokenize(p)[1] for p in prompts]
        if any(not i for i in ids):
            raise ValueError("prompt is empty")
        return beam_search(self.llm_engine, ids, params)

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


def _final_only(p):
    """A shallow copy asking for the final output only (already validated: no second __post_init__)."""
    if not isinstance(p, SamplingParams) or p.output_kind == RequestOutputKind.FINAL_ONLY:
        return p
    q = copy.copy(p)
    q.output_kind = RequestOutputKind.FINAL_ONLY
    return q


def _per_prompt(x, n: int, name: str) -> list:
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"{name} has {len(x)} entries for {n} prompts")
        return list(x)
    return [x] * n
