"""A chat stream with tool calls survives its instance's death: the router resumes it on another instance with
what the client has of the call (router/migration.py, server/tools/streaming.py), and the client, the official
openai package, assembles the same call as from an uninterrupted run, no delta repeated or lost."""
import threading
import time

import pytest

from fleet import MODEL, Instance, Router, start_all

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.usefixtures("one_thread")

# a long string argument: the call is many tokens long, so the instance can be killed in the middle of it
NOTE = {"type": "object", "properties": {"text": {"type": "string", "minLength": 80, "maxLength": 90}},
        "required": ["text"]}
TOOLS = [{"type": "function", "function": {"name": "take_note", "parameters": NOTE}}]
REQUEST = dict(model=MODEL, messages=[{"role": "user", "content": "Note the weather in Paris."}], tools=TOOLS,
               tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=300)


@pytest.fixture(scope="module")
def workers(tiny_model_dir):
    from frontierlm.assets import DEMO_MODEL

    extra = ("--chat-template", str(DEMO_MODEL / "chat_template.jinja"), "--enable-auto-tool-choice")
    insts = [Instance(tiny_model_dir("llama", max_position_embeddings=2048), extra=extra) for _ in range(2)]
    try:
        yield start_all(insts)
    finally:
        for inst in insts:
            inst.stop()


def _assemble(chunks, progress: dict) -> None:
    """Accumulate a streamed choice the way clients do, into progress: calls {index: [id, name, arguments]},
    content, finish, and the deltas that broke OpenAI's rules (a call announced twice, a continuation that
    names it again)."""
    progress.update(calls={}, content="", finish=None, bad=[], chunks=0)
    for chunk in chunks:
        progress["chunks"] += 1
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        progress["content"] += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.index not in progress["calls"]:
                if not (d.id and d.function.name and d.type == "function"):
                    progress["bad"].append(d)
                progress["calls"][d.index] = [d.id, d.function.name, ""]
            elif d.id is not None or d.function.name is not None:
                progress["bad"].append(d)
            progress["calls"][d.index][2] += d.function.arguments or ""
        progress["finish"] = choice.finish_reason or progress["finish"]


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_tool_call_stream_survives_its_instance_dying(workers):
    want: dict = {}
    _assemble(_client(workers[0].url).chat.completions.create(stream=True, **REQUEST), want)
    (call,) = want["calls"].values()
    assert call[1] == "take_note" and len(call[2]) > 80 and want["finish"] == "tool_calls" and not want["bad"]

    router = Router(workers=[w.url for w in workers], policy="round_robin")
    try:
        got: dict = {}
        errors = []

        def run():
            try:
                _assemble(_client(router.url).chat.completions.create(stream=True, **REQUEST), got)
            except Exception as e:  # the assertion below names it
                errors.append(e)

        t = threading.Thread(target=run)
        t.start()
        deadline = time.time() + 60
        while len(next(iter(got.get("calls", {}).values()), ["", "", ""])[2]) < 20 and time.time() < deadline:
            time.sleep(0.005)
        serving = [w for w, i in zip(workers, router.app.state.router.targets) if i.in_flight]
        assert len(serving) == 1
        serving[0].kill()
        at_kill = next(iter(got["calls"].values()))[2]
        t.join(120)
        assert not t.is_alive() and not errors, errors
        assert len(at_kill) < len(call[2]), "the instance died in the middle of the call's arguments"
        assert router.metric("frontierlm:router_migrations_total") == 1
        assert not got["bad"], got["bad"]
        assert [c[1:] for c in got["calls"].values()] == [c[1:] for c in want["calls"].values()]
        assert got["content"] == want["content"] and got["finish"] == want["finish"]
        survivor = next(w for w in workers if w is not serving[0])
        assert survivor.wait_no_blocks_in_use() == 0
    finally:
        router.stop()


def test_a_resumed_tool_streamer_sends_only_what_follows():
    """Without a server: a streamer started from what another one sent, fed the whole output, sends exactly
    the rest, for every point the first one could have stopped at."""
    from test_tools import CALL, SAMPLES, _plan

    from frontierlm.server.tools import ToolStreamer
    from frontierlm.server.tools.protocol import ResumeToolStream

    text = SAMPLES["hermes"] % (CALL["get_weather"], CALL["add"])
    plan = _plan("hermes")

    def deltas(streamer, start, stop):
        return [streamer.feed(text[:i], final=i == len(text)) for i in range(start, stop + 1)]

    def flat(ds):
        content = "".join(d.get("content", "") for d in ds)
        items = [(i["index"], i.get("id") is not None, i["function"].get("name"), i["function"]["arguments"])
                 for d in ds for i in d.get("tool_calls", [])]
        return content, items

    whole = flat(deltas(ToolStreamer(plan), 1, len(text)))
    for cut in range(1, len(text), 7):
        first = ToolStreamer(plan)
        before = deltas(first, 1, cut)
        state = ResumeToolStream(content_chars=first.content_sent,
                                 calls=[{"id": cid, "arguments_chars": n} for cid, n in first.calls_sent])
        after = deltas(ToolStreamer(plan, state), len(text), len(text))  # the new instance: the whole output
        content_a, items_a = flat(before)
        content_b, items_b = flat(after)
        assert content_a + content_b == whole[0]
        merged = items_a + items_b
        assert [(i, n) for i, _, n, _ in merged if n] == [(i, n) for i, _, n, _ in whole[1] if n]
        args = {}
        for index, _, _, a in merged:
            args[index] = args.get(index, "") + a
        assert list(args.values()) == list(CALL.values())
        assert sum(1 for _, has_id, _, _ in merged if has_id) == len(CALL)  # each call announced once
