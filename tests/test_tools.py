"""Tool calling through the official openai client, LangChain and instructor: every call the server reports
parses and validates against its function's schema (the call is decoded under a grammar built from it)."""
import concurrent.futures as cf
import json

import httpx
import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
from test_server import MODEL, LiveServer  # noqa: E402

from frontierlm.assets import DEMO_MODEL  # noqa: E402
from frontierlm.server.options import ServeOptions  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -5, "maximum": 99},
                                        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
       "required": ["a", "flags"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
SEEDS = range(50)
MAX_TOKENS = 160  # the tiny tokenizer spells markup almost letter by letter; most of it is jump-forwarded


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    template = (DEMO_MODEL / "chat_template.jinja").read_text()  # the demo model's, with tools
    srv = LiveServer(tiny_model_dir("llama", max_position_embeddings=2048), max_num_seqs=64,
                     options=ServeOptions(chat_template=template, enable_auto_tool_choice=True, log_requests=False))
    yield srv
    srv.stop()


def _validate(name: str, arguments: str) -> None:
    assert name in SCHEMAS, name
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def _concurrently(fn, seeds=SEEDS):
    with cf.ThreadPoolExecutor(16) as pool:
        return list(pool.map(fn, seeds))


def _create(server, seed, **kw):
    return server.client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, seed=seed,
                                                 max_tokens=MAX_TOKENS, **kw)


def _stream(server, seed, **kw) -> tuple[dict, str, str | None]:
    """Accumulate a streamed choice the way clients do: ({index: [id, name, arguments]}, content, finish)."""
    calls, content, finish = {}, "", None
    for chunk in _create(server, seed, stream=True, **kw):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.function.name and d.type == "function"  # the first delta of a call
                calls[d.index] = [d.id, d.function.name, ""]
            else:
                assert d.id is None and d.function.name is None
            calls[d.index][2] += d.function.arguments or ""
        finish = choice.finish_reason or finish
    return calls, content, finish


def test_named_tool_choice_50_seeds(server):
    for r in _concurrently(lambda s: _create(server, s, tool_choice=NAMED)):
        c = r.choices[0]
        assert c.finish_reason == "stop", c  # OpenAI: a forced function finishes with "stop"
        assert c.message.content is None
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        _validate(call.function.name, call.function.arguments)


def test_named_tool_choice_streamed_50_seeds(server):
    for calls, content, finish in _concurrently(lambda s: _stream(server, s, tool_choice=NAMED)):
        assert finish == "stop" and content == ""
        assert list(calls) == [0] and calls[0][1] == "get_weather"
        _validate(calls[0][1], calls[0][2])


def test_required_tool_choice_50_seeds(server):
    names = set()
    for r in _concurrently(lambda s: _create(server, s, tool_choice="required")):
        c = r.choices[0]
        assert c.message.tool_calls, c
        assert c.finish_reason in ("tool_calls", "length")
        if c.finish_reason == "tool_calls":
            assert c.message.content is None
        for call in c.message.tool_calls:
            _validate(call.function.name, call.function.arguments)
            names.add(call.function.name)
    assert names == {"get_weather", "add"}  # the model chose between them


def test_required_tool_choice_streamed_50_seeds(server):
    for calls, content, finish in _concurrently(lambda s: _stream(server, s, tool_choice="required")):
        assert calls and finish in ("tool_calls", "length") and content == ""
        if finish == "tool_calls":
            for _, name, arguments in calls.values():
                _validate(name, arguments)
        else:  # cut off by max_tokens: every call before the last is complete
            for _, name, arguments in list(calls.values())[:-1]:
                _validate(name, arguments)


def test_streamed_and_plain_agree(server):
    r = _create(server, 7, tool_choice="required", temperature=0)
    calls, content, finish = _stream(server, 7, tool_choice="required", temperature=0)
    c = r.choices[0]
    assert finish == c.finish_reason and content == (c.message.content or "")
    assert [(n, a) for _, n, a in calls.values()] == [(t.function.name, t.function.arguments)
                                                      for t in c.message.tool_calls]


def test_parallel_tool_calls_false_gives_one_call(server):
    for r in _concurrently(lambda s: _create(server, s, tool_choice="required", parallel_tool_calls=False),
                           range(10)):
        c = r.choices[0]
        assert len(c.message.tool_calls) == 1 and c.finish_reason == "tool_calls"
        _validate(c.message.tool_calls[0].function.name, c.message.tool_calls[0].function.arguments)


def test_auto_text_or_valid_calls(server):
    """The random model mostly writes text under "auto"; whatever it writes, reported calls validate."""
    for r in _concurrently(lambda s: _create(server, s, max_completion_tokens=24), range(10)):
        c = r.choices[0]
        for call in c.message.tool_calls or []:
            _validate(call.function.name, call.function.arguments)
        assert c.finish_reason in ("stop", "length", "tool_calls")


def test_tool_choice_none_is_plain_text(server):
    r = _create(server, 1, tool_choice="none", max_completion_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_history_with_tool_calls_and_tool_results(server):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    history = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [call]},
                          {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 degrees"}]
    r = server.client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                              max_tokens=4)
    assert r.choices[0].message.role == "assistant"
    ids = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": history, "tools": TOOLS}).json()
    assert ids["count"] == r.usage.prompt_tokens
    text = httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    assert "<tool_response>\nsunny, 21 degrees\n</tool_response>" in text
    assert '"name": "add"' in text  # the tools' signatures are in the prompt


@pytest.mark.parametrize("body,match", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope' is not among the tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "not both"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "function names must be"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, "must be unique"),
])
def test_bad_tool_requests_are_400(server, body, match):
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": MODEL, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]["message"]


def test_auto_needs_the_flag_and_completions_refuse_tools(tiny_model_dir):
    srv = LiveServer(tiny_model_dir("llama", max_position_embeddings=2048), options=ServeOptions(
        chat_template=(DEMO_MODEL / "chat_template.jinja").read_text(), log_requests=False))
    try:
        with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice"):
            srv.client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=4)
        r = srv.client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=NAMED,
                                               max_tokens=MAX_TOKENS, seed=0)
        _validate("get_weather", r.choices[0].message.tool_calls[0].function.arguments)
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "tools": TOOLS})
        assert r.status_code == 400 and "/v1/chat/completions" in r.json()["error"]["message"]
    finally:
        srv.stop()


# ---- frameworks -------------------------------------------------------------------------------------------
def test_langchain_bind_tools(server):
    lc = pytest.importorskip("langchain_openai", reason="pip install langchain-openai")
    from langchain_core.tools import tool
    from pydantic import BaseModel, Field

    class WeatherArgs(BaseModel):  # short strings, so the random model finishes within max_tokens
        city: str = Field(max_length=8)
        unit: str = Field(max_length=10)

    @tool(args_schema=WeatherArgs)
    def get_weather(city: str, unit: str) -> str:
        """Weather of a city."""
        return "sunny"

    llm = lc.ChatOpenAI(base_url=server.url + "/v1", api_key="none", model=MODEL, max_tokens=MAX_TOKENS,
                        temperature=1.0, seed=3, max_retries=0)
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?")
    (call,) = msg.tool_calls
    assert msg.response_metadata["finish_reason"] == "stop" and not msg.invalid_tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    assert all(isinstance(v, str) for v in call["args"].values())
    auto = llm.bind_tools([get_weather]).invoke("Weather in Paris?")  # tool_choice "auto": text or a call
    assert isinstance(auto.content, str)
    chunks = list(llm.bind_tools([get_weather], tool_choice="required").stream("Weather in Paris?"))
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    assert merged.tool_calls and merged.tool_calls[0]["name"] == "get_weather"


def test_instructor_default_mode(server):
    instructor = pytest.importorskip("instructor", reason="pip install instructor")
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        city: str = Field(max_length=8)
        unit: str = Field(pattern="^(celsius|fahrenheit)$")
        days: int = Field(ge=1, le=7)

    client = instructor.from_openai(openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0))
    for seed in range(3):
        w = client.chat.completions.create(model=MODEL, response_model=Weather, messages=MESSAGES, seed=seed,
                                           max_tokens=MAX_TOKENS, max_retries=0)
        assert isinstance(w, Weather) and 1 <= w.days <= 7


# ---- the formats, without a server: reading calls back, streamed or whole, and their grammars -----------------
CALL = {"get_weather": '{"city": "Paris", "unit": "celsius"}', "add": '{"a": 3, "flags": [true]}'}
SAMPLES = {
    "hermes": "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": %s}\n</tool_call>\n"
              "<tool_call>\n{\"name\": \"add\", \"arguments\": %s}\n</tool_call>",
    "llama3_json": '{"name": "get_weather", "parameters": %s}; {"name": "add", "parameters": %s}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": %s}, {"name": "add", "arguments": %s}]',
    "deepseek_v3": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n%s\n```"
                   "<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n```json\n%s\n```"
                   "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
}


def _plan(parser, choice="auto", parallel=None):
    from frontierlm.server.tools.plan import plan_tools
    from frontierlm.server.tools.protocol import NamedToolChoice, Tool

    if isinstance(choice, dict):
        choice = NamedToolChoice.model_validate(choice)
    return plan_tools([Tool.model_validate(t) for t in TOOLS], choice, parallel, parser_name=parser,
                      enable_auto=True, chat_template=None)


def _matcher(plan):
    import xgrammar as xgr

    compiled = xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False).compile_structural_tag(
        plan.structured_outputs().structural_tag)
    return xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)


@pytest.mark.parametrize("parser", sorted(SAMPLES))
def test_parser_reads_calls_whole_and_streamed(parser):
    from frontierlm.server.tools import ToolStreamer

    text = SAMPLES[parser] % (CALL["get_weather"], CALL["add"])
    plan = _plan(parser)
    content, calls = plan.split(text, final=True)
    assert [(c.name, c.arguments) for c in calls] == list(CALL.items())
    assert content == ("Let me check." if parser == "hermes" else "")
    streamer, streamed, args = ToolStreamer(plan), "", {}
    for i in range(1, len(text) + 1):  # one character per step: the worst case for markers split across steps
        delta = streamer.feed(text[:i], final=i == len(text))
        streamed += delta.get("content", "")
        for item in delta.get("tool_calls", []):
            if "id" in item:  # the first delta of a call names it
                args[item["index"]] = [item["function"]["name"], ""]
            args[item["index"]][1] += item["function"]["arguments"]
    assert streamed == content and [tuple(v) for v in args.values()] == list(CALL.items())


@pytest.mark.parametrize("parser", sorted(SAMPLES))
def test_grammar_accepts_the_format_and_refuses_bad_calls(parser):
    text = SAMPLES[parser] % (CALL["get_weather"], CALL["add"])
    calls_only = text.replace("Let me check.\n", "")
    assert _matcher(_plan(parser, "required")).accept_string(calls_only)
    assert not _matcher(_plan(parser, "required")).accept_string("Let me check.")  # required: calls only
    assert not _matcher(_plan(parser, "required", parallel=False)).accept_string(calls_only)  # one call at most
    bad_args = SAMPLES[parser] % ('{"city": "Paris", "unit": "kelvin"}', CALL["add"])
    assert not _matcher(_plan(parser, "required")).accept_string(bad_args.replace("Let me check.\n", ""))
    named = _matcher(_plan(parser, NAMED))
    assert named.accept_string(_one_call(parser)) and named.is_completed()
    assert not _matcher(_plan(parser, NAMED)).accept_string(_one_call(parser).replace("get_weather", "add"))
    assert _matcher(_plan(parser, "required", parallel=False)).accept_string(_one_call(parser))


def _one_call(parser) -> str:
    return {"hermes": '<tool_call>\n{"name": "get_weather", "arguments": %s}\n</tool_call>',
            "llama3_json": '{"name": "get_weather", "parameters": %s}',
            "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": %s}]',
            "deepseek_v3": "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n%s"
                           "\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>"}[parser] % CALL["get_weather"]


@pytest.mark.parametrize("parser", sorted(SAMPLES))
def test_auto_allows_text_then_constrains_the_call(parser):
    plan = _plan(parser, "auto")
    assert _matcher(plan).accept_string("Plain text, no call at all.")
    m = _matcher(plan)
    trigger = plan.parser.trigger
    assert m.accept_string("Some text first. " + trigger)
    # once a call has begun, only a listed function with schema-valid arguments may follow
    good = _one_call(parser)
    assert _matcher(plan).accept_string("Some text first. " + good)
    assert not _matcher(plan).accept_string("Some text first. " + good.replace("get_weather", "rm_rf"))
    assert not _matcher(plan).accept_string("Some text first. " + good.replace("celsius", "kelvin"))


def test_parser_detection_from_templates():
    from frontierlm.server.tools import detect_parser

    assert detect_parser((DEMO_MODEL / "chat_template.jinja").read_text()) == "hermes"
    assert detect_parser("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_parser("{{ '<｜tool▁calls▁begin｜>' }}") == "deepseek_v3"
    assert detect_parser("{{ '<|python_tag|>' }}") == "llama3_json"
    assert detect_parser(None) == "hermes"
    from frontierlm.server.args import TOOL_PARSERS
    from frontierlm.server.tools import PARSERS

    assert sorted(TOOL_PARSERS) == sorted(PARSERS)  # the serve flag's choices (kept import-free) match


def test_control_characters_in_strings_are_escaped():
    from frontierlm.server.tools.jsonscan import escape_controls

    assert escape_controls('{"a": "x\x1ay", "b":\n1}') == '{"a": "x\\u001ay", "b":\n1}'
    assert json.loads(escape_controls('{"a": "\x00\\"\x07"}')) == {"a": '\x00"\x07'}
