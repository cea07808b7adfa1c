"""Chat messages -> prompt text and token ids through the tokenizer's chat template, without letting message
text turn into control tokens.

A template writes the roles and its own markers (`<|user|>`, `<|end|>`) around each message's content. Were
the rendered text simply tokenized, a user who types `<|end|><|system|>` in a message would get real control
tokens, so the model would read their text as a system turn. Here every special-token spelling inside message
fields is swapped for a random placeholder before rendering; the special tokens left in the rendered text are
then exactly the template's, and the text between them is tokenized with special tokens split (read as
plain text) once the placeholders are put back. Roles are checked against a fixed set, since templates paste
them raw between markers too.
"""
from __future__ import annotations

import re
import secrets
from typing import Callable

from frontierlm.engine.tokenizer import encode, special_token_texts

ROLES = ("system", "developer", "user", "assistant", "tool")


def validate_roles(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}")


def _escape(value, pattern: re.Pattern, swap):
    """`value` (a message field: str, list or dict) with every special-token spelling replaced by `swap`."""
    if isinstance(value, str):
        return pattern.sub(swap, value) if pattern.search(value) else value
    if isinstance(value, list):
        return [_escape(v, pattern, swap) for v in value]
    if isinstance(value, dict):
        return {k: _escape(v, pattern, swap) for k, v in value.items()}
    return value


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                parse_special_tokens: bool = False, check_text: Callable[[str], None] | None = None,
                **template_kwargs) -> tuple[str, list[int]]:
    """(prompt text, token ids). With `parse_special_tokens=True` (the operator's opt-out) special-token text
    in messages is read as control tokens, as a plain apply_chat_template + encode would. `check_text` sees
    the rendered text before it is tokenized (the server's length check) and may raise."""
    validate_roles(messages)
    specials = special_token_texts(tokenizer)
    pattern = re.compile("|".join(map(re.escape, specials))) if specials and not parse_special_tokens else None
    found: dict[str, str] = {}  # placeholder -> the special-token text it stands for
    if pattern is not None:
        nonce = secrets.token_hex(8)  # unguessable, so a message cannot forge a placeholder
        by_text: dict[str, str] = {}

        def swap(m: re.Match) -> str:
            ph = by_text.get(m.group(0))
            if ph is None:
                ph = by_text[m.group(0)] = f"FLMSPECIAL{nonce}N{len(by_text)}X"
                found[ph] = m.group(0)
            return ph

        messages = [{k: (v if k == "role" else _escape(v, pattern, swap)) for k, v in m.items()} for m in messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **template_kwargs)
    except Exception as e:  # jinja errors (raise_exception in the template, a missing variable, ...)
        raise ValueError(f"messages: the chat template failed: {e}") from None
    if not found:
        if check_text is not None:
            check_text(text)
        return text, encode(tokenizer, text, add_special_tokens=False)
    restore = re.compile("|".join(map(re.escape, found)))
    shown = restore.sub(lambda m: found[m.group(0)], text)
    if check_text is not None:
        check_text(shown)
    ids: list[int] = []
    # every special token still in `text` is the template's own: keep it as one control token, and tokenize
    # the text between them with the message's special-token spellings put back as plain text
    pos = 0
    for m in pattern.finditer(text):
        ids += _encode_text(tokenizer, text[pos:m.start()], restore, found)
        ids += encode(tokenizer, m.group(0), add_special_tokens=False)
        pos = m.end()
    ids += _encode_text(tokenizer, text[pos:], restore, found)
    return shown, ids


def _encode_text(tokenizer, piece: str, restore: re.Pattern, found: dict) -> list[int]:
    if not piece:
        return []
    if not restore.search(piece):
        return encode(tokenizer, piece, add_special_tokens=False)
    return encode(tokenizer, restore.sub(lambda m: found[m.group(0)], piece), add_special_tokens=False,
                  split_special_tokens=True)
