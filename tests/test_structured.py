"""Grammar-constrained generation (first slice): xgrammar compiles the request's constraint, every finished
output is valid, greedy parity holds under a grammar that allows what the model chose, bad input is a ValueError."""
import json

import jsonschema
import pytest
import torch

from frontierlm import LLM, SamplingParams, StructuredOutputsParams

pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["ada", "bob", "cy"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), block_size=4)


def test_json_schema_outputs_always_valid(llm):
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=120,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    outs = llm.generate([f"record {i}:" for i in range(20)], params, use_tqdm=False)
    finished = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
    assert len(finished) >= 15
    for c in finished:
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_choice_regex_and_grammar(llm):
    outs = llm.generate(["pick:"] * 6, SamplingParams(temperature=1.0, seed=1, max_tokens=20,
                        structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe so"])),
                        use_tqdm=False)
    assert all(o.outputs[0].text in ("yes", "no", "maybe so") for o in outs)
    outs = llm.generate(["date:"] * 4, SamplingParams(temperature=1.0, seed=2, max_tokens=30,
                        structured_outputs=StructuredOutputsParams(regex=r"\d{4}-\d{2}-\d{2}")), use_tqdm=False)
    import re
    assert all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", o.outputs[0].text) for o in outs)
    gbnf = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
    outs = llm.generate(["sum:"] * 4, SamplingParams(temperature=1.0, seed=3, max_tokens=40,
                        structured_outputs=StructuredOutputsParams(grammar=gbnf)), use_tqdm=False)
    for o in outs:
        if o.outputs[0].finish_reason == "stop":
            assert re.fullmatch(r"\((?:[1-9][0-9]?)(?:\+[1-9][0-9]?)*\)", o.outputs[0].text)


def test_greedy_parity_with_permissive_grammar(llm):
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    # a prompt whose greedy output is clean text (random byte-level tokens can split UTF-8 characters)
    for start in range(10, 400, 7):
        free = llm.generate([[start, start + 1, start + 2]], greedy, use_tqdm=False)[0].outputs[0]
        if "\ufffd" not in free.text:
            break
    # the grammar allows exactly what the model chose, so constrained greedy must choose the same tokens
    exact = StructuredOutputsParams(choice=[free.text])
    constrained = llm.generate([[start, start + 1, start + 2]], SamplingParams(
        temperature=0, max_tokens=10, ignore_eos=True, structured_outputs=exact), use_tqdm=False)[0].outputs[0]
    assert constrained.token_ids == free.token_ids and constrained.text == free.text


def test_bad_constraints_raise_and_cache_hits(llm):
    with pytest.raises(ValueError, match="structured_outputs.regex"):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(regex="(unclosed")),
                     use_tqdm=False)
    with pytest.raises(ValueError, match="structured_outputs.grammar"):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(grammar="root ::= (")),
                     use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    backend = llm.llm_engine.grammar_backend
    hits = backend.cache_hits
    llm.generate(["x"], SamplingParams(max_tokens=2, structured_outputs=StructuredOutputsParams(json=SCHEMA)),
                 use_tqdm=False)
    assert backend.cache_hits == hits + 1


def test_grammar_check_cli(capsys):
    from frontierlm.cli import main

    assert main(["grammar", "check", 'root ::= "ab" [0-9]+', "ab12", "ab7"]) == 0
    assert main(["grammar", "check", 'root ::= "ab" [0-9]+', "ab12", "abx", "ab"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == "reject  'abx': fails at character 2 ('x')"
    assert out[-1].startswith("reject  'ab': ends before the grammar is complete")
    assert main(["grammar", "check", 'root ::= "a" b\nb ::= [a-', "x"]) == 2
    assert "line 2, column 10" in capsys.readouterr().err
    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'
    assert main(["grammar", "check", "--schema", schema, '{"a": 5}']) == 0
    assert main(["grammar", "check", "--schema", schema, '{"a": "x"}']) == 1
    assert main(["grammar", "check", "builtin:no-such-grammar", "x"]) == 2
    assert "builtin grammars" in capsys.readouterr().err


@pytest.mark.parametrize("name", __import__("frontierlm.structured.grammars_lib", fromlist=["x"]).builtin_names())
def test_builtin_grammar_generations_are_accepted(llm, name):
    from frontierlm.structured.grammars_lib import check_text, compile_for_check

    params = SamplingParams(temperature=1.0, seed=5, max_tokens=64,
                            structured_outputs=StructuredOutputsParams(grammar=f"builtin:{name}"))
    outs = llm.generate([f"{name} {i}:" for i in range(20)], params, use_tqdm=False)
    compiled = compile_for_check(grammar=f"builtin:{name}")
    for o in outs:
        c = o.outputs[0]
        if c.finish_reason == "stop":
            assert check_text(compiled, c.text) == (True, None), c.text
        else:  # cut by max_tokens: still a valid prefix
            assert check_text(compiled, c.text)[1] in (None, len(c.text)), c.text


SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
                                                  "role": {"enum": ["a", "b"]}},
                 "required": ["id", "role"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    "array_bounds": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 5},
                     "minItems": 2, "maxItems": 4},
    "number_bounds_optional": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -1, "maximum": 1}, "flag": {"type": "boolean"}},
        "required": ["flag"], "additionalProperties": False},
    "defs_ref_anyof": {"$defs": {"pt": {"type": "object", "properties": {"k": {"enum": [1, 2]}},
                                        "required": ["k"], "additionalProperties": False}},
                       "anyOf": [{"$ref": "#/$defs/pt"}, {"type": "boolean"}]},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_family_outputs_valid(llm, name):
    schema = SCHEMAS[name]
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=120,
                            structured_outputs=StructuredOutputsParams(json=schema))
    outs = llm.generate([f"{name} {i}" for i in range(20)], params, use_tqdm=False)
    finished = [o.outputs[0].text for o in outs if o.outputs[0].finish_reason == "stop"]
    assert len(finished) >= 10
    for text in finished:
        jsonschema.validate(json.loads(text), schema)


def test_grammar_with_n3_and_preemption(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), block_size=4)
    bpt = llm.llm_engine.model_config.kv_cache_bytes_per_token()
    tight = LLM(tiny_model_dir("llama"), block_size=4, kv_cache_memory_gb=24 * 4 * bpt / 2**30)
    params = SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=60,
                            structured_outputs=StructuredOutputsParams(json=SCHEMAS["array_bounds"]))
    prompts = [list(range(20 + i, 40 + i)) for i in range(4)]
    ref = llm.generate(prompts, params, use_tqdm=False)
    got = tight.generate(prompts, params, use_tqdm=False)
    assert tight.llm_engine.get_stats()["num_preemptions"] > 0
    for r, g in zip(ref, got):
        assert [c.token_ids for c in r.outputs] == [c.token_ids for c in g.outputs]
        for c in g.outputs:
            if c.finish_reason == "stop":
                jsonschema.validate(json.loads(c.text), SCHEMAS["array_bounds"])


def test_slow_compile_does_not_stall_running_requests(tiny_model_dir, monkeypatch):
    import threading

    from frontierlm.structured.backend import GrammarBackend

    llm = LLM(tiny_model_dir("llama"), block_size=4)
    engine = llm.llm_engine
    release = threading.Event()
    original = GrammarBackend.compile

    def slow_compile(self, *args):
        release.wait(30)  # held until the other request has finished
        return original(self, *args)

    monkeypatch.setattr(GrammarBackend, "compile", slow_compile)
    engine.add_request("plain", [5, 6, 7], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    engine.add_request("json", "x", SamplingParams(max_tokens=40, temperature=1.0, seed=0,
                                                   structured_outputs=StructuredOutputsParams(json=SCHEMA)))
    done = {}
    while "plain" not in done:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert len(done["plain"].outputs[0].token_ids) == 12 and "json" not in done
    assert engine.get_requests("json")[0].num_output_tokens == 0  # it waited, the batch went on
    release.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    c = done["json"].outputs[0]
    if c.finish_reason == "stop":
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert c.token_ids


def test_failed_compile_ends_only_that_request(tiny_model_dir, monkeypatch):
    from frontierlm.structured.backend import GrammarBackend

    llm = LLM(tiny_model_dir("llama"), block_size=4)

    def broken(self, *args):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(GrammarBackend, "compile", broken)
    outs = llm.generate(["a", "b"], [SamplingParams(max_tokens=4, ignore_eos=True),
                                     SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(
                                         regex="[ab]+"))], use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) == 4
    assert outs[1].outputs[0].finish_reason == "abort" and "exploded" in outs[1].outputs[0].stop_reason
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_jump_forward_appends_forced_tokens(tiny_model_dir, backend):
    llm = LLM(tiny_model_dir("llama"), block_size=4, structured_outputs_backend=backend)
    engine = llm.llm_engine
    schema = SCHEMAS["nested"]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=80, structured_outputs=StructuredOutputsParams(
        json=schema, jump_forward=True))
    engine.add_request("jf", "go", params)
    steps, out = 0, None
    while engine.has_unfinished_requests():
        steps += 1
        for o in engine.step():
            out = o
    c = out.outputs[0]
    assert c.finish_reason == "stop"
    assert json.loads(c.text)["user"]["role"] in ("a", "b")
    jsonschema.validate(json.loads(c.text), schema)
    # forced text ('{"user": {"id": ' and friends) arrived without a sampling step per token
    assert steps < len(c.token_ids)
    tok = llm.get_tokenizer()
    assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_matcher_interface_of_both_backends(tiny_model_dir, backend):
    """The calls the engine makes on a matcher behave alike on both backends: bitmask fill, accept (a refused
    token changes nothing), rollback, termination on the stop token, jump-forward text."""
    from frontierlm.structured.backend import GrammarBackend, fill_grammar_bitmask

    llm = LLM(tiny_model_dir("llama"), block_size=4)
    tok, mc = llm.get_tokenizer(), llm.llm_engine.model_config
    gb = GrammarBackend(tok, mc.vocab_size, list(mc.eos_token_ids), mode=backend)
    params = StructuredOutputsParams(json={"type": "object", "properties": {"k": {"enum": ["yes", "no"]}},
                                           "required": ["k"], "additionalProperties": False})
    m = gb.matcher(gb.compile_async(params).result())
    assert gb.served[backend] == 1
    assert m.find_jump_forward_string().startswith('{"k": "')
    start = fill_grammar_bitmask([m], mc.vocab_size).clone()
    brace = tok.encode("{", add_special_tokens=False)[0]
    assert not m.accept_token(tok.encode("x", add_special_tokens=False)[0])  # refused, state unchanged
    assert m.accept_token(brace)
    assert not torch.equal(fill_grammar_bitmask([m], mc.vocab_size), start)
    m.rollback(1)
    assert torch.equal(fill_grammar_bitmask([m], mc.vocab_size), start)
    for t in tok.encode('{"k": "no"}', add_special_tokens=False):
        assert m.accept_token(t)
    assert not m.is_terminated()
    eos = mc.eos_token_ids[0]
    allowed = fill_grammar_bitmask([m], mc.vocab_size)[0]
    assert (allowed[eos // 32] >> (eos % 32)) & 1  # only now may the sequence end
    assert m.accept_token(eos) and m.is_terminated()
