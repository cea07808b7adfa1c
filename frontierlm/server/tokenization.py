"""Prompt tokenization and chat-template rendering on worker threads, off the asyncio event loop.

A 10 MiB prompt takes tens of seconds to tokenize; done on the loop it froze every stream and /health. Here
each worker thread owns its own tokenizer (HF fast tokenizers carry per-call state and must not be shared
across threads) and encodes through engine.tokenizer.encode, whose Rust call releases the GIL, so the loop
keeps serving while a long prompt is tokenized. Prompts that certainly cannot fit are refused by their length
in characters before any tokenizing.
"""
from __future__ import annotations

import asyncio
import copy
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from frontierlm.engine.chat_template import render_chat
from frontierlm.engine.tokenizer import bad_words_token_ids, encode, max_chars_per_token
from frontierlm.server.errors import APIError


class TokenizerPool:
    """Worker threads that tokenize with private copies of `tokenizer` (made on first use in each thread, so
    they carry whatever the server set on it, such as a chat template given on the command line)."""

    def __init__(self, tokenizer, workers: int | None = None):
        self.prototype = tokenizer
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="frontierlm-tokenize")
        self.chars_per_token = max_chars_per_token(tokenizer)  # None: no certain bound for this tokenizer

    def _tokenizer(self):
        tok = getattr(self._local, "tok", None)
        if tok is None:
            tok = self._local.tok = copy.deepcopy(self.prototype)
        return tok

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def check_length(self, text: str, max_prompt_tokens: int, param: str) -> None:
        """400 when `text` has more characters than `max_prompt_tokens` tokens can cover."""
        bound = self.chars_per_token
        if bound is not None and len(text) > max(0, max_prompt_tokens) * bound:
            raise APIError(400, f"{param} has {len(text)} characters; at most {max(0, max_prompt_tokens)} prompt "
                           f"tokens fit in the context and no token of this tokenizer covers more than {bound} "
                           "characters", param=param, code="context_length_exceeded")

    async def encode(self, text: str, max_prompt_tokens: int, param: str = "prompt",
                     add_special_tokens: bool = True) -> list[int]:
        self.check_length(text, max_prompt_tokens, param)
        return await self._run(lambda: encode(self._tokenizer(), text, add_special_tokens=add_special_tokens))

    async def call(self, fn, *args):
        """fn(tokenizer, *args) on a worker thread, with that thread's tokenizer (decode, id -> token text)."""
        return await self._run(lambda: fn(self._tokenizer(), *args))

    async def tokenize_bad_words(self, params) -> None:
        """Tokenize `params.bad_words` here, at admission, so the engine thread does not (it reads the ids
        from `params._bad_words_token_ids`, vLLM's attribute)."""
        if params.bad_words:
            params._bad_words_token_ids = await self.call(bad_words_token_ids, params.bad_words)

    async def render_chat(self, messages: list[dict], max_prompt_tokens: int, add_generation_prompt: bool,
                          parse_special_tokens: bool, **template_kwargs) -> tuple[str, list[int]]:
        """(prompt text, ids); the rendered text is length-checked before it is tokenized."""
        def work():
            return render_chat(self._tokenizer(), messages, add_generation_prompt, parse_special_tokens,
                               check_text=lambda text: self.check_length(text, max_prompt_tokens, "messages"),
                               **template_kwargs)

        try:
            return await self._run(work)
        except APIError:
            raise
        except ValueError as e:  # roles, template errors
            raise APIError.from_value_error(e) from None
        except Exception as e:  # jinja raises its own types (TemplateError, raise_exception in the template)
            raise APIError(400, f"messages: the chat template failed: {e}", param="messages") from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
