"""SamplingParams / StructuredOutputsParams validation: every bad value is a ValueError naming its field."""
from __future__ import annotations

import math

import pytest

from frontierlm.sampling_params import SamplingParams, StructuredOutputsParams

INVALID = [
    ("n", 0), ("n", -1), ("n", 1.5), ("n", True), ("n", "2"),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", "x"), ("presence_penalty", math.nan),
    ("frequency_penalty", 3.0), ("frequency_penalty", -3), ("frequency_penalty", None),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("temperature", -0.1), ("temperature", "hot"), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", True),
    ("top_p", 0.0), ("top_p", 1.1), ("top_p", -0.5), ("top_p", "1"),
    ("top_k", -2), ("top_k", 2.0), ("top_k", False), ("top_k", "5"),
    ("min_p", -0.1), ("min_p", 1.5),
    ("typical_p", 0.0), ("typical_p", 1.01),
    ("mirostat_mode", 3), ("mirostat_mode", -1), ("mirostat_mode", 1.0), ("mirostat_mode", True),
    ("mirostat_tau", 0.0), ("mirostat_tau", -5.0),
    ("mirostat_eta", 0.0), ("mirostat_eta", "fast"),
    ("seed", 1.0), ("seed", "42"), ("seed", True), ("seed", 2 ** 64),
    ("stop", ""), ("stop", ["ok", ""]), ("stop", 5), ("stop", ["a", 3]),
    ("stop_token_ids", [1, -2]), ("stop_token_ids", [1.0]), ("stop_token_ids", 5), ("stop_token_ids", "12"),
    ("bad_words", [""]), ("bad_words", [1]), ("bad_words", 7),
    ("banned_token_ids", [-1]), ("banned_token_ids", [True]), ("banned_token_ids", 3),
    ("ignore_eos", 1), ("ignore_eos", "yes"),
    ("include_stop_str_in_output", None), ("skip_special_tokens", 0),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 10.0), ("max_tokens", True),
    ("min_tokens", -1), ("min_tokens", 17), ("min_tokens", 1.5),
    ("logprobs", -1), ("logprobs", 2.5), ("logprobs", True),
    ("logit_bias", {5: 101.0}), ("logit_bias", {5: -100.5}), ("logit_bias", {-1: 1.0}), ("logit_bias", {"abc": 1.0}),
    ("logit_bias", {1.5: 1.0}), ("logit_bias", {5: "big"}), ("logit_bias", {5: math.nan}), ("logit_bias", [1, 2]),
    ("structured_outputs", "json"), ("structured_outputs", 3),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_raises_naming_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.typical_p) == (1, 1.0, 1.0, 0, 0.0, 1.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.seed) == (16, 0, None, None)
    assert (p.mirostat_mode, p.mirostat_tau, p.mirostat_eta) == (0, 5.0, 0.1)
    assert p.stop == [] and p.stop_token_ids == [] and p.bad_words is None and p.logit_bias is None
    assert not p.ignore_eos and p.skip_special_tokens and not p.include_stop_str_in_output
    assert not p.greedy and not p.uses_penalties


def test_normalizations():
    p = SamplingParams(stop="###", top_k=-1, stop_token_ids=(7, 8), logit_bias={"12": 5, 3: -1.5})
    assert p.stop == ["###"] and p.top_k == 0 and p.stop_token_ids == [7, 8]
    assert p.logit_bias == {12: 5.0, 3: -1.5} and all(type(k) is int for k in p.logit_bias)
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(bad_words="x").bad_words == ["x"]


def test_valid_edge_values():
    SamplingParams(temperature=0, top_p=1, min_p=1.0, presence_penalty=-2, frequency_penalty=2, top_k=1,
                   max_tokens=None, min_tokens=1000, logprobs=0, seed=-3, logit_bias={0: 100, 1: -100},
                   mirostat_mode=2, repetition_penalty=0.01)
    SamplingParams(max_tokens=5, min_tokens=5)
    assert SamplingParams(temperature=0.0).greedy and SamplingParams(temperature=1e-7).greedy


def test_helpers():
    p = SamplingParams(stop_token_ids=[9], repetition_penalty=1.1)
    assert p.uses_penalties
    assert p.all_stop_token_ids([2]) == {2, 9}
    assert SamplingParams(stop_token_ids=[9], ignore_eos=True).all_stop_token_ids([2]) == {9}
    c = p.clone()
    assert c == p and c is not p and c.stop_token_ids is not p.stop_token_ids


# ---- structured outputs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(json={"type": "object"}), dict(json='{"type": "string"}'),
                                dict(grammar='root ::= "a"'), dict(regex="[0-9]+"), dict(choice=["yes", "no"]),
                                dict(json_object=True)])
def test_structured_outputs_valid(kw):
    s = StructuredOutputsParams(**kw)
    assert SamplingParams(structured_outputs=s).structured_outputs is s
    assert SamplingParams(structured_outputs=kw).structured_outputs == s  # a dict (server body) is accepted


@pytest.mark.parametrize("kw,field", [
    ({}, "structured_outputs"),
    (dict(json_object=False), "structured_outputs"),
    (dict(json={"type": "object"}, regex="a+"), "structured_outputs"),
    (dict(choice=["a"], grammar="root ::= x"), "structured_outputs"),
    (dict(json="{not json"), "json"),
    (dict(json="[1, 2]"), "json"),
    (dict(json=5), "json"),
    (dict(grammar=""), "grammar"),
    (dict(regex=3), "regex"),
    (dict(choice=[]), "choice"),
    (dict(choice="yes"), "choice"),
    (dict(choice=["a", 1]), "choice"),
    (dict(json_object="yes"), "json_object"),
])
def test_structured_outputs_invalid(kw, field):
    with pytest.raises(ValueError, match=field):
        StructuredOutputsParams(**kw)
