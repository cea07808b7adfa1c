"""Request intake for LLMEngine: validate and tokenize a prompt and its sampling parameters, build the request
group (one sequence per sample), and hand grammars to the compiler. Everything here runs before the first step;
a bad request is a ValueError naming the problem and leaves the engine as it was."""
from __future__ import annotations

import time

import torch

from frontierlm.compat import check_kwargs
from frontierlm.engine.detokenizer import IncrementalDetokenizer
from frontierlm.engine.request import Request, RequestStatus
from frontierlm.engine.request_group import NoText, RequestGroup
from frontierlm.engine.resume import replay_grammar, replay_text, resume_token_ids
from frontierlm.engine.tokenizer import bad_words_token_ids
from frontierlm.outputs import RequestOutput
from frontierlm.sampling_params import SamplingParams


class RequestAdmission:
    """Mixed into LLMEngine; uses its tokenizer, model_config, kv, scheduler, runner and groups."""

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model directory has no tokenizer; pass prompts as token ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def _resolve_max_tokens(self, num_prompt: int, params: SamplingParams) -> int:
        capacity = self.kv.num_blocks * self.kv.block_size
        limit = min(self.max_model_len, capacity)
        if params.max_tokens is None:
            if num_prompt >= limit:
                raise ValueError(f"prompt has {num_prompt} tokens; the context holds {limit}")
            return limit - num_prompt
        total = num_prompt + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                             f"max_model_len ({self.max_model_len})")
        if total > capacity:
            raise ValueError(f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) = {total} can never "
                             f"fit in the KV cache ({capacity} tokens); raise kv_cache_memory_gb")
        return params.max_tokens

    def check_token_ids(self, params: SamplingParams) -> None:
        """Token ids in the sampling parameters must exist in the model's vocabulary (OpenAI and vLLM refuse
        them too, rather than ignoring them). Reads only the config, so any thread may call it."""
        vocab = self.model_config.vocab_size
        for name, ids in (("logit_bias", params.logit_bias or {}), ("stop_token_ids", params.stop_token_ids or ()),
                          ("banned_token_ids", params.banned_token_ids or ())):
            bad = sorted(t for t in ids if not 0 <= t < vocab)
            if bad:
                raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")

    def _bad_words_ids(self, params: SamplingParams) -> list[list[int]]:
        pre = getattr(params, "_bad_words_token_ids", None)  # tokenized at admission (the server's workers)
        if pre is not None:
            return pre
        if self.tokenizer is None:
            raise ValueError("bad_words needs a tokenizer; this model has none")
        return bad_words_token_ids(self.tokenizer, params.bad_words)

    def add_request(self, request_id: str | None, prompt, params: SamplingParams | None = None,
                    priority: int = 0, arrival_time: float | None = None, **kwargs) -> str:
        check_kwargs("add_request", kwargs, ("request_id", "prompt", "params", "priority", "arrival_time"), {"lora_request": None, "tokenization_kwargs": None,
                                                 "trace_headers": None})
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if request_id is None:
            request_id = f"req-{self._counter}"
            self._counter += 1
        if request_id in self.groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, ids = self._tokenize(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        self.check_token_ids(params)
        keep = params.truncate_prompt_tokens
        if keep is not None:  # vLLM: keep the last k tokens (-1: as many as the context holds)
            keep = self.max_model_len if keep == -1 else keep
            if len(ids) > keep:  # the prompt text shown is then that of the kept tokens
                ids = ids[-keep:]
                text = self.tokenizer.decode(ids) if text is not None and self.tokenizer is not None else None
        if params.allowed_token_ids and max(params.allowed_token_ids) >= vocab:
            raise ValueError(f"allowed_token_ids contains ids outside the vocabulary [0, {vocab}): "
                             f"{[t for t in params.allowed_token_ids if t >= vocab][:5]}")
        procs = self.runner.sampler.logits_processors
        if procs:
            procs.validate_params(params)
        max_tokens = self._resolve_max_tokens(len(ids), params)
        resumed = resume_token_ids(params, vocab, max_tokens)  # engine/resume.py: a stream moved here
        bad_words = self._bad_words_ids(params) if params.bad_words else []
        grammar_future = self._compile_grammar(params) if params.structured_outputs is not None else None
        arrival = time.monotonic() if arrival_time is None else arrival_time
        children, detoks = [], []
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            generator = None
            if params.seed is not None:
                # sample i of a seeded request gets its own stream, derived from the seed
                generator = torch.Generator(self.runner.device).manual_seed(params.seed + i * 1_000_003)
            req = Request(child_id, ids, params, max_tokens, tuple(self.model_config.eos_token_ids), priority,
                          arrival, generator=generator,
                          mirostat_mu=2.0 * params.mirostat_tau if params.mirostat_mode else None,
                          bad_words_token_ids=bad_words, grammar_future=grammar_future)
            for t in resumed:
                req.append_token(t)
            children.append(req)
            detoks.append(IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens, params.stop,
                                                 params.include_stop_str_in_output,
                                                 params.spaces_between_special_tokens)
                          if self.tokenizer is not None and params.detokenize else NoText())
            replay_text(detoks[-1], resumed, params)  # text a dead instance held back streams from here
        group = RequestGroup(request_id, text, ids, children, detoks, [[] for _ in children], [""] * len(children),
                       [len(resumed)] * len(children), [(0, len(resumed))] * len(children))
        self.groups[request_id] = group
        for req in children:
            self._child_to_group[req.request_id] = group
            self.scheduler.add_request(req)
        if grammar_future is not None:
            self._compiling.append(group)
        return request_id

    def _compile_grammar(self, params: SamplingParams):
        if self.tokenizer is None:
            raise ValueError("structured_outputs needs the model's tokenizer; this model directory has none")
        if self.grammar_backend is None:
            from frontierlm.structured.backend import GrammarBackend

            self.grammar_backend = GrammarBackend(self.tokenizer, self.model_config.vocab_size,
                                                  list(self.model_config.eos_token_ids),
                                                  mode=self.config.structured_outputs_backend)
        return self.grammar_backend.compile_async(params.structured_outputs)

    def _resolve_grammars(self) -> list[RequestOutput]:
        """Give each request whose grammar finished compiling its matcher; a failed compile ends the request
        (finish_reason "abort", the compiler's message as stop_reason) and is returned as a finished output."""
        outputs, still = [], []
        for group in self._compiling:
            future = group.children[0].grammar_future
            if self.groups.get(group.request_id) is not group:  # aborted meanwhile
                continue
            if not future.done():
                still.append(group)
                continue
            try:
                compiled = future.result()
                for req in group.children:
                    req.grammar = self.grammar_backend.matcher(compiled)
                    if req.output_token_ids:  # resumed from another instance
                        replay_grammar(req)
            except Exception as e:
                for req in group.children:
                    req.stop_reason = str(e)
                    self.scheduler.finish_request(req.request_id, RequestStatus.FINISHED_ABORTED)
                outputs.append(self._output(group))
                self._forget(group)
        self._compiling = still
        return outputs
