"""Held-out evaluation of a code model on the standard library (the demo model's model card and tests):

- `heldout_stdlib_text()`: the validation modules of the `python-stdlib` split (training never saw them);
- `bits_per_byte(model, tokenizer, text)`: cross-entropy per UTF-8 byte, comparable across tokenizers (a
  per-token perplexity is not: a coarser vocabulary has fewer, harder tokens);
- `function_headers()` + `completes_to_valid_python()`: greedy-complete a `def` line and check the finished
  function with `ast.parse`.
"""
from __future__ import annotations

import ast
import math

import torch

from frontierlm.train.corpus import load_corpus, split_documents

# The demo model's recipe holds out this share of the stdlib's modules (frontierlm/train/examples/demo.yaml).
DEMO_VAL_FRACTION = 0.04


def heldout_stdlib_docs(val_fraction: float = DEMO_VAL_FRACTION) -> list[str]:
    docs, groups = load_corpus("python-stdlib")
    return split_documents(docs, val_fraction, groups=groups)[1]


def heldout_stdlib_text(max_chars: int, val_fraction: float = DEMO_VAL_FRACTION) -> str:
    return "\n".join(heldout_stdlib_docs(val_fraction))[:max_chars]


@torch.inference_mode()
def bits_per_byte(model, tokenizer, text: str, window: int = 512) -> dict:
    """Cross-entropy of `text` under `model` (an engine model) in non-overlapping windows of `window` tokens:
    bits per UTF-8 byte, per-token perplexity and the counts behind them."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    nll, predicted = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start:start + window + 1]])
        if chunk.shape[1] < 2:
            break
        x = chunk[:, :-1]
        logits = model.compute_logits(model(x, torch.arange(x.shape[1])[None]))[0].float()
        nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        predicted += x.shape[1]
    n_bytes = len(text.encode("utf-8"))
    return {"bits_per_byte": nll / math.log(2) / n_bytes, "token_ppl": math.exp(nll / predicted),
            "tokens": predicted, "bytes": n_bytes}


def function_headers(docs: list[str], limit: int, per_doc: int = 2) -> list[str]:
    """Up to `limit` top-level `def` lines (one-line headers with their newline) from `docs`, at most `per_doc`
    from each, so that the sample spans many modules."""
    headers = []
    for text in docs:
        taken = 0
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.decorator_list and node.body[0].lineno > node.lineno:
                line = lines[node.lineno - 1]
                if line.rstrip().endswith(":") and line.startswith("def ") and taken < per_doc:
                    headers.append(line if line.endswith("\n") else line + "\n")
                    taken += 1
                    if len(headers) == limit:
                        return headers
    return headers


def finished_function(header: str, completion: str) -> str:
    """The function a completion writes after `header`: its lines up to the first non-blank line back at
    column 0 (where the body has ended); a last line cut off mid-way (no newline) is dropped."""
    body = []
    for line in completion.splitlines(keepends=True):
        if line.strip() and not line[0].isspace():
            break
        if not line.endswith("\n"):
            break
        body.append(line)
    return header + "".join(body)


def completes_to_valid_python(header: str, completion: str) -> bool:
    try:
        ast.parse(finished_function(header, completion))
    except SyntaxError:
        return False
    return True
