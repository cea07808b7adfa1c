"""`frontierlm train`, `frontierlm train-tokenizer` and `frontierlm distill`: parsers and commands.

Every TrainConfig field is also a flag (`--lr` -> optim.lr, `--hidden-size` -> model.hidden_size); flags
override the YAML file.
"""
from __future__ import annotations

import argparse
import json
import typing

from frontierlm.train.config import TrainConfig, flag_fields

_PREFIX = "cfg__"


def _metavar(hint) -> str:
    if typing.get_origin(hint) is tuple:
        return "A,B"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return {dict: "JSON", float: "X", int: "N", str: "STR"}.get(base, "VALUE")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("train config (overrides the YAML file)")
    defaults = TrainConfig().to_dict()
    for flag, dotted, hint in flag_fields():
        dest = _PREFIX + dotted.replace(".", "__")
        default = defaults
        for part in dotted.split("."):
            default = default[part]
        help_ = f"{dotted} (default: {default})"
        if hint is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:  # strings: TrainConfig coerces them to the field's type and names the field on error
            group.add_argument(flag, dest=dest, default=None, metavar=_metavar(hint), help=help_)


def config_from_args(args: argparse.Namespace, path: str | None) -> TrainConfig:
    overrides = {k[len(_PREFIX):].replace("__", "."): v for k, v in vars(args).items()
                 if k.startswith(_PREFIX) and v is not None}
    return TrainConfig.load(path, overrides)


def add_parsers(sub) -> None:
    """Add the train, train-tokenizer and distill subcommands to the top-level subparsers."""
    train = sub.add_parser("train", help="train a model of the engine's own classes (HF-format output)")
    train.add_argument("config", nargs="?", default=None, help="YAML train config (flags override it)")
    add_config_flags(train)

    tok = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer with a chat template")
    tok.add_argument("--corpus", default="python-docs", help="python-docs, a text file or a folder")
    tok.add_argument("--vocab-size", type=int, default=4096)
    tok.add_argument("--max-chars", type=int, default=None, help="use at most this many corpus characters")
    tok.add_argument("--out", required=True, help="output directory")

    dist = sub.add_parser("distill", help="distill a teacher model directory into a smaller student")
    dist.add_argument("--teacher", required=True, help="teacher HF-format model directory")
    dist.add_argument("--student", default=None, help="YAML train config of the student (flags override it)")
    add_config_flags(dist)


def _print_summary(summary: dict) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary))


def cmd_train(args: argparse.Namespace) -> int:
    from frontierlm.train.trainer import Trainer

    trainer = Trainer(config_from_args(args, args.config))
    try:
        _print_summary(trainer.train())
    finally:
        trainer.close()
    return 0


def cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from frontierlm.train.corpus import load_texts
    from frontierlm.train.tokenizer import train_tokenizer

    try:
        texts = load_texts(args.corpus, args.max_chars)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    tok = train_tokenizer(texts, args.vocab_size, args.out)
    print(json.dumps({"out": args.out, "vocab_size": len(tok), "documents": len(texts)}))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from frontierlm.train.distill import distill

    _print_summary(distill(config_from_args(args, args.student), args.teacher))
    return 0


COMMANDS = {"train": cmd_train, "train-tokenizer": cmd_train_tokenizer, "distill": cmd_distill}
