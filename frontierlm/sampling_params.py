"""User-facing generation options, following vLLM's names and defaults.

Every field is checked in ``__post_init__``; a bad value raises ValueError whose message starts with the
field name, so the server can turn it into an HTTP 400 without guessing what was wrong.
"""
from __future__ import annotations

import copy
import enum
import json as _json
import math
from dataclasses import dataclass
from typing import Any, Iterable

from frontierlm.compat import UNSUPPORTED_SAMPLING_ARGS, strict_dataclass_init

# Temperatures below this are treated as greedy (as vLLM does): dividing by ~0 would overflow.
GREEDY_TEMPERATURE_EPS = 1e-5


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(name: str, v: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    if not _is_int(v):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v}")
    return v


def _check_float(name: str, v: Any, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> float:
    # Ints are fine (temperature=1), bools and strings are not; NaN/inf would poison the whole batch.
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v}")
    return float(v)


def _check_token_ids(name: str, v: Any) -> list[int]:
    if isinstance(v, (str, bytes, dict)) or not isinstance(v, Iterable):
        raise ValueError(f"{name} must be a list of token ids, got {v!r}")
    out = list(v)
    for t in out:
        if not _is_int(t) or t < 0:
            raise ValueError(f"{name} must contain non-negative integer token ids, got {t!r}")
    return out


def _check_strings(name: str, v: Any) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"{name} must be a string or a list of strings, got {v!r}")
    for s in v:
        if not isinstance(s, str):
            raise ValueError(f"{name} must contain only strings, got {s!r}")
        if not s:
            raise ValueError(f"{name} must not contain empty strings")
    return list(v)


@dataclass
class StructuredOutputsParams:
    """Constrain the output to exactly one of: a JSON schema, a grammar (GBNF/EBNF), a regex, a choice
    among strings, or any JSON object. The grammar engine itself lives in frontierlm/structured/."""

    json: str | dict | None = None
    grammar: str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool | None = None
    # xgrammar's structural tag as JSON (vLLM's field): tagged regions, e.g. tool calls, each under its own schema
    structural_tag: str | None = None
    jump_forward: bool = False  # append tokens the grammar forces without sampling them

    _KINDS = ("json", "grammar", "regex", "choice", "json_object", "structural_tag")

    def __post_init__(self):
        # json_object=False means "not asked", like leaving it None.
        set_fields = [name for name in self._KINDS
                      if getattr(self, name) is not None and not (name == "json_object" and self.json_object is False)]
        if not isinstance(self.jump_forward, bool):
            raise ValueError(f"jump_forward must be a bool, got {self.jump_forward!r}")
        if len(set_fields) != 1:
            raise ValueError("structured_outputs: exactly one of json, grammar, regex, choice, json_object, "
                             "structural_tag must be "
                             f"set, got {set_fields or 'none'}")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = _json.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"json must be a valid JSON schema string: {e}") from None
            else:
                schema = self.json
            if not isinstance(schema, dict):
                raise ValueError(f"json must be a JSON schema object (dict or JSON string), got {self.json!r}")
        for name in ("grammar", "regex", "structural_tag"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{name} must be a non-empty string, got {v!r}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, (list, tuple)) or not self.choice:
                raise ValueError(f"choice must be a non-empty list of strings, got {self.choice!r}")
            if not all(isinstance(c, str) for c in self.choice):
                raise ValueError(f"choice must contain only strings, got {self.choice!r}")
            self.choice = list(self.choice)
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError(f"json_object must be a bool, got {self.json_object!r}")


class RequestOutputKind(enum.IntEnum):
    """What each streamed RequestOutput carries (vLLM's names): everything so far, only what is new since the
    previous output, or nothing until the request finishes."""
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class GuidedDecodingParams(StructuredOutputsParams):
    """vLLM's older name for StructuredOutputsParams (deprecated there and here): the same fields."""
    backend: str | None = None  # vLLM's per-request backend and whitespace: refused with a reason, not ignored
    whitespace_pattern: str | None = None

    def __post_init__(self):
        warn_deprecated("GuidedDecodingParams", "StructuredOutputsParams")
        if self.backend is not None:
            raise ValueError("GuidedDecodingParams.backend is not supported: the backend is chosen per engine "
                             "(structured_outputs_backend='auto' | 'xgrammar' | 'guidance')")
        if self.whitespace_pattern is not None:
            raise ValueError("GuidedDecodingParams.whitespace_pattern is not supported")
        super().__post_init__()


_warned: set[str] = set()


def warn_deprecated(old: str, new: str) -> None:
    """One log line per old name and process: vLLM's older structured-output spellings still work."""
    if old not in _warned:
        _warned.add(old)
        import logging

        logging.getLogger("frontierlm.sampling_params").warning("%s is deprecated; use %s", old, new)


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    typical_p: float = 1.0
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    banned_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_decoding: StructuredOutputsParams | None = None  # vLLM's older name of structured_outputs
    # top-N log-probs of every prompt token after the first, from the prefill logits (raw model distribution)
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None  # sample only among these (a mask before penalties)
    detokenize: bool = True  # False: token ids only, text stays ""
    truncate_prompt_tokens: int | None = None  # keep the last k prompt tokens (-1: the context length)
    spaces_between_special_tokens: bool = True  # passed to decode; HF fast tokenizers ignore it, as in vLLM
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict[str, Any] | None = None  # free-form per-request arguments for custom logits processors

    def __post_init__(self):
        _check_int("n", self.n, lo=1)
        self.presence_penalty = _check_float("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        self.frequency_penalty = _check_float("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        self.repetition_penalty = _check_float("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        self.temperature = _check_float("temperature", self.temperature, lo=0.0)
        self.top_p = _check_float("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_int("top_k", self.top_k, lo=-1)
        if self.top_k == -1:  # OpenAI/vLLM clients send -1 for "off"; one spelling internally
            self.top_k = 0
        self.min_p = _check_float("min_p", self.min_p, lo=0.0, hi=1.0)
        self.typical_p = _check_float("typical_p", self.typical_p, lo=0.0, hi=1.0, lo_open=True)
        if not _is_int(self.mirostat_mode) or self.mirostat_mode not in (0, 1, 2):
            raise ValueError(f"mirostat_mode must be 0 (off), 1 or 2, got {self.mirostat_mode!r}")
        self.mirostat_tau = _check_float("mirostat_tau", self.mirostat_tau, lo=0.0, lo_open=True)
        self.mirostat_eta = _check_float("mirostat_eta", self.mirostat_eta, lo=0.0, lo_open=True)
        if self.seed is not None:
            # torch.Generator.manual_seed accepts exactly this range.
            _check_int("seed", self.seed, lo=-(2 ** 63), hi=2 ** 64 - 1)
        self.stop = [] if self.stop is None else _check_strings("stop", self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else _check_token_ids(
            "stop_token_ids", self.stop_token_ids)
        if self.bad_words is not None:
            self.bad_words = _check_strings("bad_words", self.bad_words)
        if self.banned_token_ids is not None:
            self.banned_token_ids = _check_token_ids("banned_token_ids", self.banned_token_ids)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=1)
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0)
        if self.logit_bias is not None:
            self.logit_bias = self._normalize_logit_bias(self.logit_bias)
        if self.guided_decoding is not None:
            warn_deprecated("SamplingParams(guided_decoding=...)", "structured_outputs")
            if self.structured_outputs is not None:
                raise ValueError("give structured_outputs or guided_decoding (its older name), not both")
            self.structured_outputs = self.guided_decoding
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, lo=0)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _check_token_ids("allowed_token_ids", self.allowed_token_ids)
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must not be empty")
        for name in ("detokenize", "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not self.detokenize and self.stop:
            raise ValueError("stop strings need detokenize=True (use stop_token_ids with detokenize=False)")
        if self.truncate_prompt_tokens is not None:
            _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, lo=-1)
            if self.truncate_prompt_tokens == 0:
                raise ValueError("truncate_prompt_tokens must be >= 1 or -1 (the context length), got 0")
        try:
            self.output_kind = RequestOutputKind(self.output_kind)
        except ValueError:
            raise ValueError(f"output_kind must be a RequestOutputKind (0, 1 or 2), got {self.output_kind!r}") from None
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise ValueError(f"extra_args must be a dict, got {self.extra_args!r}")
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}")

    @staticmethod
    def _normalize_logit_bias(bias: Any) -> dict[int, float]:
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {bias!r}")
        out: dict[int, float] = {}
        for k, v in bias.items():
            # OpenAI's JSON bodies can only carry string keys: accept "123" as token 123.
            if isinstance(k, str):
                try:
                    k = int(k.strip())
                except ValueError:
                    raise ValueError(f"logit_bias keys must be token ids, got {k!r}") from None
            if not _is_int(k) or k < 0:
                raise ValueError(f"logit_bias keys must be non-negative token ids, got {k!r}")
            out[k] = _check_float(f"logit_bias[{k}]", v, lo=-100.0, hi=100.0)
        return out

    # ---- derived views used by the engine and the sampler -------------------------------------------------
    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def all_stop_token_ids(self, eos_token_ids: Iterable[int] = ()) -> set[int]:
        """Token ids that end the request: stop_token_ids, plus EOS unless ignore_eos."""
        ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            ids.update(eos_token_ids)
        return ids

    def clone(self) -> "SamplingParams":
        """A deep copy (the engine fans one request out to n sequences and may adjust each)."""
        return copy.deepcopy(self)


strict_dataclass_init(SamplingParams, UNSUPPORTED_SAMPLING_ARGS)


@dataclass
class BeamSearchParams:
    """LLM.beam_search options (vLLM's names). The search itself is engine/beam_search.py."""
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # > 0: search over the temperature-scaled log-probs
    length_penalty: float = 1.0  # score = cumulative logprob / generated_length ** length_penalty
    include_stop_str_in_output: bool = False  # keep the EOS token in `tokens` of a finished sequence

    def __post_init__(self):
        _check_int("beam_width", self.beam_width, lo=1)
        _check_int("max_tokens", self.max_tokens, lo=1)
        self.temperature = _check_float("temperature", self.temperature, lo=0.0)
        self.length_penalty = _check_float("length_penalty", self.length_penalty)
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


strict_dataclass_init(BeamSearchParams)
