"""GBNF as llama.cpp reads it (grammars/README.md and its parser): the syntax xgrammar lacks (`.`, empty
alternatives, token matches) is translated and enforced on both backends; llama.cpp's own grammar files compile
unchanged; errors name line and column."""
from pathlib import Path

import pytest

from frontierlm import LLM, SamplingParams, StructuredOutputsParams
from frontierlm.structured.gbnf import parse_gbnf, to_lark, to_xgrammar
from frontierlm.structured.grammars_lib import check_text, compile_for_check

pytest.importorskip("xgrammar")
pytest.importorskip("llguidance")

LLAMA_CPP = Path(__file__).parent / "data" / "llama_cpp_grammars"
BACKENDS = ("xgrammar", "guidance")

# (grammar, accepted, rejected): verdicts as llama.cpp's grammar rules define them
SYNTAX = {
    "any char": ('root ::= "a" .*', ["a", "ab\nc", "a\u00e9\U0001F600"], ["b", ""]),
    "any char bounded": ('root ::= . "b"', ["xb", "\nb"], ["b", "xxb"]),
    "empty alternative": ('root ::= "a" | ', ["a", ""], ["b", "aa"]),
    "empty first alternative (llama.cpp's ws)": ('root ::= ws "x"\nws ::= | " " | "\\n" [ \\t]{0,2}',
                                                 ["x", " x", "\n\t x"], ["  x", "\n\t\t\tx"]),
    "empty rule": ("root ::= ", [""], ["a"]),
    "empty group": ('root ::= "a" ( )', ["a"], ["ab"]),
    "repetition forms": ('root ::= "a"{2} "b"{1,} "c"{0,2} "d"{ 1 , 2 }', ["aabd", "aabbbccdd"], ["abd", "aabcccd"]),
    "literal repeated whole": ('root ::= "ab"{2}', ["abab"], ["abb", "ab"]),
    "escapes": ('root ::= "\\x41\\u00e9\\U0001F600\\t\\"\\\\" [\\[\\]]', ["A\u00e9\U0001F600\t\"\\[", "A\u00e9\U0001F600\t\"\\]"],
                ["A\u00e9\U0001F600\t\"\\x"]),
    "negated class": ('root ::= [^"\\\\a-c]+', ["xyz", "d\u00e9"], ['x"', "a", "x\\"]),
    "dash at class end is literal": ("root ::= [a-]+", ["a-a"], ["b"]),
    "rule names with digits and dashes": ('root ::= 1st-rule UPPER_2\n1st-rule ::= "a"\nUPPER_2 ::= "b"', ["ab"], ["a"]),
    "newline after | and in groups": ('root ::= "a" |\n  "b" (\n "c"\n | "d"\n)', ["a", "bc", "bd"], ["c", "b"]),
    "comments and CRLF": ('# top\r\nroot ::= x # trailing\r\nx ::= "y"\r\n', ["y"], ["x"]),
    "later definition wins": ('root ::= "a"\nroot ::= "b"', ["b"], ["a"]),
    "nested repetition": ('root ::= ("a"?)* "b"', ["b", "aaab"], ["ba"]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(SYNTAX))
def test_llama_cpp_syntax_accepts_and_rejects(name, backend):
    grammar, good, bad = SYNTAX[name]
    check = compile_for_check(grammar=grammar, backend=backend)
    for text in good:
        assert check_text(check, text) == (True, None), (grammar, text)
    for text in bad:
        assert not check_text(check, text)[0], (grammar, text)


def test_translation_is_what_xgrammar_and_lark_take():
    g = parse_gbnf('root ::= ws "x" .\nws ::= | " "')
    assert to_xgrammar(g) == 'root ::= ws "x" [\\u0000-\\U0010ffff]\nws ::= "" | " "'
    assert to_lark(g) == 'start: ws "x" /(?s:.)/\nws: "" | " "'
    tokens = parse_gbnf('root ::= <[7]> !<[9]>* <think>')
    assert tokens.uses_tokens
    assert to_lark(tokens, lambda text: {"<think>": 42}[text]) == "start: <[7]> <[^9]>* <[42]>"
    with pytest.raises(ValueError, match="guidance"):
        to_xgrammar(tokens)


@pytest.mark.parametrize("grammar,message", [
    ("root ::= (", "line 1, column 11: expecting ')'"),
    ('root ::= "a"\nb ::= [a-', "line 2, column 10: unexpected end of input in a character class"),
    ('root ::= "\\q"', "unknown escape"),
    ("root ::= x", "rule 'x' is used but never defined"),
    ('x ::= "a"', "no 'root' rule"),
    ('root ::= "a"{3,1}', "maximum is below the minimum"),
    ('root ::= "a"{2001}', "above 2000"),
    ("root ::= *", "expecting an item before '*'"),
    ('root := "a"', "expecting '::='"),
    ("root ::= []a]", "expecting a newline or the end"),  # llama.cpp: `[]` is an empty class, then `a]`
])
def test_syntax_errors_name_the_place(grammar, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")
                       .replace("[", r"\[").replace("{", r"\{")):
        parse_gbnf(grammar)


SAMPLES = {
    "json.gbnf": (['{"a": [1, 2.5e3, "x\\n"], "b": {}}', '{ }'], ['{"a": 01}', "[1]"]),
    "json_arr.gbnf": (['[\n1,\n{"a": null}]'], ["[1]", "{}"]),
    "c.gbnf": (["int main(){x = 1;}", "float f(int a){return a;}"], ["int main(){x = ;}"]),
    "arithmetic.gbnf": (["a+1= 2\n", "(x*3)= y\n"], ["a+= 2\n"]),
    "chess.gbnf": (["1. e4 e5\n2. Nf3 Nc6\n"], ["1. e4 e5\n", "1. e9 e5\n2. a1 a2\n"]),
    "english.gbnf": (["Hello, world!"], ["h\u00e9llo", ""]),
    "japanese.gbnf": (["\u3053\u3093\u306b\u3061\u306f \u4e16\u754c"], ["hello"]),
    "list.gbnf": (["- a\n- b\n"], ["- a", "* a\n"]),
}


def test_every_llama_cpp_file_has_samples():
    assert {p.name for p in LLAMA_CPP.glob("*.gbnf")} == set(SAMPLES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_llama_cpp_grammar_files_compile_unchanged(name, backend):
    check = compile_for_check(grammar=(LLAMA_CPP / name).read_text(), backend=backend)
    good, bad = SAMPLES[name]
    assert all(check_text(check, t) == (True, None) for t in good)
    assert not any(check_text(check, t)[0] for t in bad)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), block_size=4)


def test_generation_with_dot_and_empty_alternatives(llm):
    grammar = 'root ::= "<" inner ">"\ninner ::= | [a-z] .{0,3} | "=" inner'
    check = compile_for_check(grammar=grammar)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=16,
                             structured_outputs=StructuredOutputsParams(grammar=grammar)) for s in range(8)]
    outs = llm.generate(["g"] * 8, params, use_tqdm=False)
    assert llm.llm_engine.grammar_backend.served["xgrammar"] >= 8
    for o in outs:
        c = o.outputs[0]
        if c.finish_reason == "stop":
            assert check_text(check, c.text) == (True, None), c.text


def test_token_matches_go_to_guidance(llm, tiny_model_dir):
    tok = llm.get_tokenizer()
    a, b = tok.encode("a", add_special_tokens=False)[0], tok.encode("b", add_special_tokens=False)[0]
    grammar = f"root ::= <[{a}]> !<[{a}]>{{2}} <[{b}]>"
    served = dict(llm.llm_engine.grammar_backend.served) if llm.llm_engine.grammar_backend else {"guidance": 0}
    outs = llm.generate(["t"] * 4, [SamplingParams(temperature=1.0, seed=s, max_tokens=8, structured_outputs=
                                                   StructuredOutputsParams(grammar=grammar)) for s in range(4)],
                        use_tqdm=False)
    assert llm.llm_engine.grammar_backend.served["guidance"] == served["guidance"] + 4
    for o in outs:
        ids = o.outputs[0].token_ids
        assert ids[0] == a and a not in ids[1:3] and ids[3] == b, ids
    strict = LLM(tiny_model_dir("llama"), block_size=4, structured_outputs_backend="xgrammar")
    with pytest.raises(ValueError, match="token matches .* not supported by the xgrammar backend"):
        strict.generate(["t"], SamplingParams(structured_outputs=StructuredOutputsParams(grammar=grammar)),
                        use_tqdm=False)


def test_cli_check_refuses_token_grammars(capsys):
    from frontierlm.cli import main

    assert main(["grammar", "check", "root ::= <[5]>", "x"]) == 2
    assert "needs a model's tokenizer" in capsys.readouterr().err
    assert main(["grammar", "check", "--backend", "guidance", 'root ::= "a" .', "ab", "a"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == "accept  'ab'" and out[-1].startswith("reject  'a': ends before")
