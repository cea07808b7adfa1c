"""JSON schemas enforced as written: per keyword and per older-draft form, 20 seeded samples at temperature 1 are
valid against the original schema (jsonschema, with format checks), hand-written strings get jsonschema's verdict
from `frontierlm grammar check --schema`, `auto` moves exactly the schemas xgrammar cannot enforce to guidance,
and a keyword no backend enforces is refused with its name and JSON pointer."""
import json

import jsonschema
import pytest
from jsonschema.validators import validator_for

from frontierlm import LLM, GuidedDecodingParams, SamplingParams, StructuredOutputsParams
from frontierlm.structured.backend import plan_constraint
from frontierlm.structured.grammars_lib import check_text, compile_for_check
from frontierlm.structured.schema import canonical_key, normalize_schema
from frontierlm.structured.schema_drafts import upgrade_draft

pytest.importorskip("xgrammar")
pytest.importorskip("llguidance")
pytestmark = pytest.mark.usefixtures("one_thread")

DRAFT7 = "http://json-schema.org/draft-07/schema#"
DRAFT4 = "http://json-schema.org/draft-04/schema#"

# name: (schema, backend auto must pick, [texts]) -- each text's expected verdict comes from jsonschema
CASES = {
    "minimum without type": ({"minimum": 0}, "xgrammar", ["-1", "3", '"a"', "0.5"]),
    "pattern without type": ({"pattern": "^[a-z]*$"}, "xgrammar", ['"Hello World"', '"abc"', "1"]),
    "minLength without type": ({"minLength": 3}, "guidance", ['"ab"', '"abc"', "[]", '"a\tbc"']),
    "minItems / maxItems without type": ({"minItems": 2, "maxItems": 3}, "xgrammar", ["[1]", "[1, 2]", '"x"']),
    "format without type": ({"format": "date"}, "xgrammar", ['"2024-13-01"', '"2024-01-31"', "5"]),
    "format email": ({"type": "string", "format": "email"}, "xgrammar", ['"x"', '"a@b.co"']),
    "maxLength": ({"type": "string", "maxLength": 3}, "guidance", ['"abcd"', '"ab"', '"a\tb"']),
    "exclusiveMinimum / maximum": ({"type": "number", "exclusiveMinimum": 0, "maximum": 1}, "xgrammar",
                                   ["0", "0.5", "1.5"]),
    "integer bounds that are not integers": ({"type": "integer", "minimum": 0.5, "exclusiveMaximum": 3.5},
                                             "xgrammar", ["0", "1", "3", "4"]),
    "multipleOf integer": ({"type": "integer", "multipleOf": 3, "minimum": 0, "maximum": 30}, "xgrammar",
                           ["4", "6"]),
    "enum beside other keywords": ({"type": "integer", "enum": [1, 5, 9], "minimum": 3}, "xgrammar",
                                   ["1", "5", "9"]),
    "const": ({"const": "x"}, "xgrammar", ['"x"', '"y"']),
    "type list with keywords": ({"type": ["integer", "string"], "minimum": 3, "pattern": "^[ab]*$"}, "xgrammar",
                                ["1", '"abc"', "4", '"ab"']),
    "oneOf with disjoint branches": ({"oneOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                {"type": "boolean"}]}, "xgrammar", ['"x"', "true", "3"]),
    "prefixItems, items false": ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}],
                                  "items": False}, "xgrammar", ["[1, true]", "[1, true, 2]", "[true]"]),
    "min / maxProperties": ({"type": "object", "minProperties": 1, "maxProperties": 2,
                             "additionalProperties": {"type": "integer"}}, "xgrammar",
                            ["{}", '{"a": 1}', '{"a": "x"}']),
    "patternProperties anchored": ({"type": "object", "patternProperties": {"^x[a-z]$": {"type": "integer"}},
                                    "additionalProperties": False, "maxProperties": 2}, "xgrammar",
                                   ['{"xa": 1}', '{"xa": "s"}', '{"xab": 1}']),
    # beyond xgrammar: auto moves these to guidance
    "patternProperties searched": ({"type": "object", "patternProperties": {"^x": {"type": "integer"}},
                                    "additionalProperties": False, "maxProperties": 2}, "guidance",
                                   ['{"xa": 1}', '{"xa": "s"}', '{"b": 1}']),
    "multipleOf number": ({"type": "number", "multipleOf": 0.5, "minimum": 0, "maximum": 10}, "guidance",
                          ["1.25", "1.5"]),
    "pattern with lengths": ({"type": "string", "pattern": "^[a-z]+$", "minLength": 2, "maxLength": 4},
                             "guidance", ['"a"', '"abc"', '"abcde"', '"aB"']),
    "pattern unanchored": ({"type": "string", "pattern": "ab", "maxLength": 6}, "guidance",
                           ['"xaby"', '"xy"']),
    "format with length": ({"type": "string", "format": "email", "maxLength": 8}, "guidance",
                           ['"a@b.co"', '"abc@defgh.com"', '"ab"']),
    "required without properties": ({"type": "object", "required": ["a"], "maxProperties": 1}, "guidance",
                                    ["{}", '{"a": 1}']),
    "allOf": ({"allOf": [{"type": "integer"}, {"minimum": 5}, {"maximum": 50}]}, "guidance", ["1", "6", '"x"']),
    "anyOf beside properties": ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                                        "maximum": 9}},
                                 "anyOf": [{"required": ["a"]}], "additionalProperties": False}, "guidance",
                                ["{}", '{"a": 1}', '{"a": "s"}']),
    "dependentRequired": ({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependentRequired": {"a": ["b"]}, "additionalProperties": False}, "guidance",
                          ['{"a": 1}', '{"a": 1, "b": 2}', '{"b": 2}', "{}"]),
    # older drafts, rewritten to 2020-12 (jsonschema judges them by their own $schema)
    "draft-07 tuple items": ({"$schema": DRAFT7, "type": "array", "items": [{"type": "integer"},
                                                                            {"type": "boolean"}]},
                             "xgrammar", ['[1, true]', '["a"]', '[1, true, "a"]']),
    "draft-07 additionalItems false": ({"$schema": DRAFT7, "type": "array", "items": [{"type": "integer"}],
                                        "additionalItems": False}, "xgrammar", ["[1]", "[1, 2]", '["a"]']),
    "draft-07 additionalItems schema": ({"$schema": DRAFT7, "type": "array", "items": [{"type": "integer"}],
                                         "additionalItems": {"type": "boolean"}, "maxItems": 3}, "xgrammar",
                                        ["[1, true]", "[1, 2]"]),
    "draft-07 definitions": ({"$schema": DRAFT7, "definitions": {"n": {"type": "integer", "minimum": 1,
                                                                       "maximum": 9}},
                              "type": "object", "properties": {"x": {"$ref": "#/definitions/n"}}, "required": ["x"],
                              "additionalProperties": False}, "xgrammar", ['{"x": 3}', '{"x": 0}', "{}"]),
    "draft-07 dependencies": ({"$schema": DRAFT7, "type": "object", "properties": {"a": {"type": "integer"},
                                                                                   "b": {"type": "integer"}},
                               "dependencies": {"a": ["b"]}, "additionalProperties": False}, "guidance",
                              ['{"a": 1}', '{"a": 1, "b": 2}', '{"b": 2}']),
    "draft-04 boolean exclusive bounds": ({"$schema": DRAFT4, "type": "number", "minimum": 0,
                                           "exclusiveMinimum": True, "maximum": 1, "exclusiveMaximum": True},
                                          "xgrammar", ["0", "0.5", "1"]),
}


UNBOUNDED = {"format email"}  # the random model rarely ends an unbounded e-mail address inside max_tokens


def verdict(schema, text: str) -> bool:
    """jsonschema's verdict on strict JSON (a raw control character inside a string is not JSON)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    cls = validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER).is_valid(value)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), block_size=4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_grammar_check_gives_jsonschemas_verdict(name, capsys):
    from frontierlm.cli import main

    schema, _, texts = CASES[name]
    expected = [verdict(schema, t) for t in texts]
    assert True in expected and False in expected or len(texts) == 1, "cases must show both verdicts"
    main(["grammar", "check", "--schema", json.dumps(schema), *texts])
    lines = capsys.readouterr().out.splitlines()
    assert [line.startswith("accept") for line in lines] == expected, lines


@pytest.mark.parametrize("name", sorted(CASES))
def test_auto_picks_guidance_exactly_where_xgrammar_falls_short(name):
    import xgrammar as xgr

    schema, backend, texts = CASES[name]
    params = StructuredOutputsParams(json=schema)
    plan = plan_constraint(params, "auto")
    assert plan.backend == backend
    if backend == "xgrammar":
        return
    # xgrammar on the (already normalised) schema gets a verdict wrong or cannot compile it: guidance is needed
    with pytest.raises(ValueError, match="xgrammar backend does not enforce"):
        plan_constraint(params, "xgrammar")
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False)
    try:
        compiled = compiler.compile_json_schema(plan.payload, any_whitespace=True, strict_mode=False)
    except RuntimeError:
        return
    wrong = []
    for t in texts:
        m = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        if (all(m.accept_string(c) for c in t) and m.is_completed()) != verdict(schema, t):
            wrong.append(t)
    assert wrong, "xgrammar enforced this schema: auto should have kept it"


@pytest.mark.parametrize("name", sorted(CASES))
def test_twenty_seeds_at_temperature_one_are_valid(llm, name):
    schema, backend, _ = CASES[name]
    engine = llm.llm_engine
    before = dict(engine.grammar_backend.served) if engine.grammar_backend else {"xgrammar": 0, "guidance": 0}
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=24,
                             structured_outputs=StructuredOutputsParams(json=schema)) for seed in range(20)]
    outs = llm.generate(["value:"] * 20, params, use_tqdm=False)
    assert engine.grammar_backend.served[backend] == before[backend] + 20
    check = compile_for_check(json_schema=json.dumps(schema))
    for o in outs:
        c = o.outputs[0]
        if c.finish_reason == "stop":
            assert verdict(schema, c.text), c.text
        else:  # cut by max_tokens: a prefix the schema can still complete, or a value it allows
            accepted, pos = check_text(check, c.text)
            assert pos == len(c.text) or (accepted and verdict(schema, c.text)), c.text
    if name not in UNBOUNDED:
        assert any(o.outputs[0].finish_reason == "stop" for o in outs), "no sample finished inside max_tokens"


REFUSED = [
    ({"type": "array", "uniqueItems": True}, "'uniqueItems' at #"),
    ({"type": "object", "properties": {"tags": {"type": "array", "contains": {"const": 1}}}},
     "'contains' at #/properties/tags"),
    ({"anyOf": [{"type": "string"}, {"not": {"type": "integer"}}]}, "'not' at #/anyOf/1"),
    ({"if": {"type": "integer"}, "then": {"minimum": 3}}, "'if' at #"),
    ({"type": "object", "propertyNames": {"maxLength": 2}}, "'propertyNames' at #"),
    ({"type": "object", "unevaluatedProperties": False}, "'unevaluatedProperties' at #"),
    ({"$schema": DRAFT7, "type": "object", "dependencies": {"a": {"required": ["b"]}}}, "'dependentSchemas' at #"),
    ({"type": "string", "format": "iri"}, "'format' at #.*'iri'"),
    ({"type": "string", "pattern": "^(?=a)b$"}, "'pattern' at #.*look-around"),
    ({"$ref": "https://example.com/schema.json"}, "'\\$ref' at #.*inside the schema"),
    ({"$defs": {"a": {"type": "integer"}}, "$ref": "#/$defs/b"}, "'\\$ref' at #.*points at nothing"),
    ({"type": "integer", "minimun": 3}, "'minimun' at #.*not a JSON Schema 2020-12 keyword"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "'oneOf' at #.*may overlap"),
]


@pytest.mark.parametrize("schema,message", REFUSED)
def test_unenforceable_keywords_are_refused_by_name_and_path(llm, schema, message):
    with pytest.raises(ValueError, match="structured_outputs.json: keyword " + message):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(json=schema)), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_values_no_sibling_allows_are_refused():
    with pytest.raises(ValueError, match="no value of 'enum' / 'const' at #/properties/a"):
        normalize_schema({"type": "object", "properties": {"a": {"const": 1, "minimum": 3}}})


def test_draft_rewrites():
    old = {"definitions": {"p": {"items": [{"type": "integer"}], "additionalItems": False}},
           "properties": {"x": {"$ref": "#/definitions/p"}, "y": {"$ref": "#/definitions/p/items/0"}},
           "dependencies": {"a": ["b"], "c": {"required": ["d"]}},
           "minimum": 1, "exclusiveMinimum": True, "maximum": 5, "exclusiveMaximum": False, "id": "urn:x"}
    assert upgrade_draft(old) == {
        "$defs": {"p": {"prefixItems": [{"type": "integer"}], "items": False}},
        "properties": {"x": {"$ref": "#/$defs/p"}, "y": {"$ref": "#/$defs/p/prefixItems/0"}},
        "dependentRequired": {"a": ["b"]}, "dependentSchemas": {"c": {"required": ["d"]}},
        "exclusiveMinimum": 1, "maximum": 5}


def test_types_inferred_from_keywords():
    assert normalize_schema({"minimum": 0, "title": "t"}).schema == {
        "title": "t", "anyOf": [{"type": "number", "minimum": 0},
                                {"type": ["string", "array", "object", "boolean", "null"]}]}
    assert normalize_schema({"type": "integer", "enum": [1, 5, 9], "minimum": 3}).schema == {"enum": [5, 9]}


def test_json_object_is_a_top_level_object(llm):
    for backend in ("auto", "guidance"):
        plan = plan_constraint(StructuredOutputsParams(json_object=True), backend)
        assert json.loads(plan.payload) == {"type": "object"}
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=24,
                             structured_outputs=StructuredOutputsParams(json_object=True)) for s in range(8)]
    finished = [o.outputs[0].text for o in llm.generate(["json:"] * 8, params, use_tqdm=False)
                if o.outputs[0].finish_reason == "stop"]
    assert finished and all(isinstance(json.loads(t), dict) for t in finished)


@pytest.mark.parametrize("backend", ["xgrammar", "guidance"])
def test_property_order_is_the_schemas(tiny_model_dir, backend):
    llm = LLM(tiny_model_dir("llama"), block_size=4, structured_outputs_backend=backend)
    schema = {"type": "object", "properties": {"reasoning": {"type": "string", "pattern": "^[a-z]{0,6}$"},
                                               "answer": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["reasoning", "answer"], "additionalProperties": False}
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=30,
                             structured_outputs=StructuredOutputsParams(json=schema)) for s in range(6)]
    outs = llm.generate(["q"] * 6, params, use_tqdm=False)
    assert llm.llm_engine.grammar_backend.served[backend] == 6
    finished = [json.loads(o.outputs[0].text) for o in outs if o.outputs[0].finish_reason == "stop"]
    assert finished and all(list(d) == ["reasoning", "answer"] for d in finished)


def test_cache_key_ignores_keyword_order_not_property_order(llm):
    a = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "boolean"}}}
    b = {"properties": {"x": {"type": "integer"}, "y": {"type": "boolean"}}, "type": "object"}
    c = {"type": "object", "properties": {"y": {"type": "boolean"}, "x": {"type": "integer"}}}
    assert canonical_key(a) == canonical_key(b) != canonical_key(c)
    llm.generate(["x"], SamplingParams(max_tokens=2, structured_outputs=StructuredOutputsParams(json=a)),
                 use_tqdm=False)
    backend = llm.llm_engine.grammar_backend
    hits = backend.cache_hits
    llm.generate(["x"], SamplingParams(max_tokens=2, structured_outputs=StructuredOutputsParams(json=b)),
                 use_tqdm=False)
    assert backend.cache_hits == hits + 1
    llm.generate(["x"], SamplingParams(max_tokens=2, structured_outputs=StructuredOutputsParams(json=c)),
                 use_tqdm=False)
    assert backend.cache_hits == hits + 1


def test_guided_decoding_alias(llm, capsys):
    import frontierlm.sampling_params as sp

    sp._warned.clear()
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=8,
                            guided_decoding=GuidedDecodingParams(choice=["left", "right"]))
    err = capsys.readouterr().err
    assert "GuidedDecodingParams is deprecated" in err and "guided_decoding=...) is deprecated" in err
    assert params.structured_outputs.choice == ["left", "right"]
    assert llm.generate(["pick"], params, use_tqdm=False)[0].outputs[0].text in ("left", "right")
    with pytest.raises(ValueError, match="backend is chosen per engine"):
        GuidedDecodingParams(json={"type": "integer"}, backend="outlines")
    with pytest.raises(ValueError, match="not both"):
        SamplingParams(structured_outputs=StructuredOutputsParams(regex="a"),
                       guided_decoding=GuidedDecodingParams(regex="b"))


def test_unknown_backend_is_a_value_error(tiny_model_dir):
    with pytest.raises(ValueError, match="structured_outputs_backend must be"):
        LLM(tiny_model_dir("llama"), structured_outputs_backend="outlines")


def test_hostile_nesting_is_a_value_error():
    deep = {"type": "integer"}
    for _ in range(5000):
        deep = {"type": "array", "items": deep}
    with pytest.raises(ValueError, match="nested too deeply"):
        plan_constraint(StructuredOutputsParams(json=deep))
    with pytest.raises(ValueError, match="nested too deeply"):
        plan_constraint(StructuredOutputsParams(grammar="root ::= " + "(" * 5000 + '"a"' + ")" * 5000))
