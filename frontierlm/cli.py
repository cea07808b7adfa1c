"""`frontierlm` command line: generate, chat, serve, grammar check, bench serve, train, train-tokenizer, distill
(plan and sim come later)."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from frontierlm import cli_args


MODEL_HELP = "HF-format model directory (default: the packaged demo model)"
CHAT_COMMANDS = {"/help": "list these commands", "/reset": "clear the conversation (keeps --system)",
                 "/exit": "quit (also /quit or Ctrl-D)"}


class _Formatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every option that has a default and does not say it already."""

    def _get_help_string(self, action):
        help_ = action.help or ""
        if "default" in help_ or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return help_
        return f"{help_} (default: %(default)s)".strip()


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line on stderr and exit status 2 (argparse prints the whole usage block)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    from frontierlm import __version__

    parser = _Parser(prog="frontierlm", description="FrontierLM: LLM inference and serving")
    parser.add_argument("--version", action="version", version=f"frontierlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate completions for one or more prompts")
    gen.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object per prompt (text, token ids, finish and stop reason, logprobs)")
    cli_args.add_engine_args(gen)
    cli_args.add_sampling_args(gen, structured=True)

    chat = sub.add_parser("chat", help="interactive chat that streams tokens to the terminal")
    chat.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    chat.add_argument("--system", default=None, help="system prompt")
    cli_args.add_engine_args(chat)
    cli_args.add_sampling_args(chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    cli_args.add_engine_args(serve)
    from frontierlm.server.args import add_serve_args

    add_serve_args(serve)

    router = sub.add_parser("router", help="one OpenAI-compatible endpoint over several serve instances "
                            "(data parallel, or disaggregated prefill / decode)")
    from frontierlm.router.args import add_router_args

    add_router_args(router)

    grammar = sub.add_parser("grammar", help="grammar tools")
    check = grammar.add_subparsers(dest="grammar_command", required=True).add_parser(
        "check", help="say whether each TEXT is accepted by a GBNF grammar (or a JSON schema)")
    check.add_argument("grammar", help="a .gbnf file, builtin:NAME, inline GBNF, or with --schema a JSON schema file")
    check.add_argument("texts", nargs="+", metavar="TEXT")
    check.add_argument("--schema", action="store_true", help="GRAMMAR is a JSON schema file (or inline JSON)")
    check.add_argument("--backend", choices=("auto", "xgrammar", "guidance"), default="auto",
                       help="structured-output backend to check with (auto: the one a request would get)")

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from frontierlm.bench.serve import add_bench_serve_args

    add_bench_serve_args(bench_sub.add_parser("serve", help="load an OpenAI-compatible server; latency report"))
    from frontierlm.train import cli as train_cli

    train_cli.add_parsers(sub)
    from frontierlm.plan import cli as plan_cli

    plan_cli.add_parsers(sub)  # plan, sim, profile
    from frontierlm.quant import cli as quant_cli

    quant_cli.add_parsers(sub)
    _use_formatter(parser)
    return parser


def _use_formatter(parser: argparse.ArgumentParser) -> None:
    """Subcommand parsers built elsewhere (train, bench, serve) show their defaults too, also for options that
    have no help text (argparse prints nothing for those)."""
    parser.formatter_class = _Formatter
    for action in parser._actions:
        if action.help is None and action.option_strings and action.default not in (None, False):
            action.help = "(default: %(default)s)"
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _use_formatter(child)


def _preflight(args) -> None:
    """Everything about the model path, device and backend that can be checked before a load (or a server) starts:
    a ValueError with one line to print."""
    import torch

    from frontierlm.config import check_attention_backend, check_model_dir

    config = cli_args.engine_config(args)
    path = check_model_dir(config.model, config.load_format)
    try:
        is_mla = "kv_lora_rank" in json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    check_attention_backend(torch.device(config.device), is_mla)
    if args.command == "serve":
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
        from uvicorn.config import LOG_LEVELS

        if args.uvicorn_log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"--uvicorn-log-level must be one of {', '.join(LOG_LEVELS)}, "
                             f"got {args.uvicorn_log_level!r}")
        args.uvicorn_log_level = args.uvicorn_log_level.lower()
    if getattr(args, "num_threads", None):
        torch.set_num_threads(args.num_threads)


def _load_engine(args):
    from frontierlm.engine.llm_engine import LLMEngine

    return LLMEngine(cli_args.engine_config(args))


def _logprobs_json(c, n: int) -> list | None:
    """Per generated token: its log-prob and rank, and the top n tokens (which may include it)."""
    if c.logprobs is None:
        return None
    out = []
    for t, step in zip(c.token_ids, c.logprobs):
        top = sorted(((i, lp) for i, lp in step.items() if lp.rank is not None and lp.rank <= n),
                     key=lambda x: x[1].rank)
        out.append({"token_id": t, "token": step[t].decoded_token, "logprob": step[t].logprob, "rank": step[t].rank,
                    "top": [{"token_id": i, "token": lp.decoded_token, "logprob": lp.logprob} for i, lp in top]})
    return out


def cmd_generate(args) -> int:
    from frontierlm.engine.llm import LLM

    params = cli_args.sampling_params(args)
    llm = LLM(args.model, **cli_args.engine_kwargs(args))
    outputs = llm.generate(args.prompt, params, use_tqdm=sys.stderr.isatty())
    for out in outputs:
        if args.json:
            print(json.dumps({"prompt": out.prompt, "outputs": [
                {"index": c.index, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
                 "stop_reason": c.stop_reason, "cumulative_logprob": c.cumulative_logprob,
                 "logprobs": _logprobs_json(c, params.logprobs or 0)} for c in out.outputs]}))
            continue
        for c in out.outputs:
            if len(out.outputs) > 1:
                print(f"--- sample {c.index + 1} of {len(out.outputs)} ---")
            print(f"{out.prompt}{c.text}")
            if c.logprobs is not None:
                for entry in _logprobs_json(c, params.logprobs or 0):
                    top = "  ".join(f"{t['token']!r} {t['logprob']:.3f}" for t in entry["top"])
                    print(f"  {entry['token']!r:>16} {entry['logprob']:8.3f}  rank {entry['rank']:<4}"
                          + (f" top: {top}" if top else ""))
                print(f"  cumulative_logprob {c.cumulative_logprob:.3f}")
            stop = f", stop_reason={c.stop_reason!r}" if c.stop_reason is not None else ""
            print(f"[finish_reason={c.finish_reason}{stop}, {len(c.token_ids)} tokens]", file=sys.stderr)
    return 0


def stream_reply(engine, prompt_ids: list[int], params, out=sys.stdout) -> str:
    """Generate one reply, writing text to `out` as it arrives; returns the whole reply."""
    rid = engine.add_request(None, prompt_ids, params)
    printed = ""
    try:
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.request_id != rid:
                    continue
                text = o.outputs[0].text
                out.write(text[len(printed):])
                out.flush()
                printed = text
    except KeyboardInterrupt:
        engine.abort_request(rid)
        out.write(" [interrupted]")
    out.write("\n")
    return printed


def cmd_chat(args) -> int:
    from frontierlm.engine.chat_template import render_chat

    engine = _load_engine(args)
    tok = engine.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        print("error: this model has no tokenizer chat template", file=sys.stderr)
        return 2
    params = cli_args.sampling_params(args, max_tokens=256)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Type a message; /help lists the commands, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        command = line.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if command in ("/help", "/?"):
            for name, what in CHAT_COMMANDS.items():
                print(f"  {name:<8} {what}")
            continue
        if command.startswith("/") and " " not in command:
            print(f"unknown command {command}; /help lists the commands", file=sys.stderr)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        try:
            ids = render_chat(tok, messages)[1]  # typed special-token text stays text
            reply = stream_reply(engine, ids, params)
        except ValueError as e:  # e.g. the conversation outgrew the context
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


def cmd_serve(args) -> int:
    from frontierlm.server.launch import run_server

    return run_server(args)


def cmd_grammar(args) -> int:
    """Exit 0 if every text is accepted, 1 if any is rejected, 2 if the grammar does not compile."""
    from pathlib import Path

    from frontierlm.structured.grammars_lib import check_text, compile_for_check

    spec = args.grammar
    if Path(spec).is_file():
        spec = Path(spec).read_text()
    compiled = compile_for_check(json_schema=spec, backend=args.backend) if args.schema else \
        compile_for_check(grammar=spec, backend=args.backend)
    all_ok = True
    for text in args.texts:
        ok, pos = check_text(compiled, text)
        all_ok &= ok
        if ok:
            print(f"accept  {text!r}")
        elif pos == len(text):
            print(f"reject  {text!r}: ends before the grammar is complete (at character {pos})")
        else:
            print(f"reject  {text!r}: fails at character {pos} ({text[pos]!r})")
    return 0 if all_ok else 1


def cmd_router(args) -> int:
    from frontierlm.router.app import run_router

    return run_router(args)


def cmd_bench(args) -> int:
    from frontierlm.bench import serve

    return {"serve": serve.main}[args.bench_command](args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _build_parser().parse_args(argv)
    if args.command == "serve":
        from frontierlm.server.args import resolve_model

        try:
            resolve_model(args)  # --model, and the model id as typed
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if args.command in ("generate", "chat", "serve"):
        try:
            if args.model is None:
                from frontierlm.assets import default_model

                args.model = default_model()
            _preflight(args)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if getattr(args, "node_rank", None):  # a multi-node run's other nodes serve nothing: they run workers
            from frontierlm.distributed.launch import run_worker_node

            return run_worker_node(cli_args.engine_config(args))
    try:
        from frontierlm.plan.cli import COMMANDS as planning_commands
        from frontierlm.quant.cli import COMMANDS as quant_commands
        from frontierlm.train.cli import COMMANDS as train_commands

        commands = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "bench": cmd_bench,
                    "router": cmd_router,
                    "grammar": cmd_grammar, **train_commands, **planning_commands, **quant_commands}
        return commands[args.command](args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
