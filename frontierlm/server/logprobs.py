"""Token log-probs in OpenAI's two response shapes: the completions API's parallel lists and the chat API's
per-token objects (each with its top-n alternatives)."""
from __future__ import annotations


def _split(entry: dict, n: int):
    """(sampled (id, Logprob), top-n [(id, Logprob)] by rank) of one token's entry (sampled comes first)."""
    items = list(entry.items())
    top = sorted((kv for kv in items if kv[1].rank is not None and 1 <= kv[1].rank <= n), key=lambda kv: kv[1].rank)
    return items[0], top


def completion_logprobs(entries, n: int, offset: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for entry in entries:
        (tid, lp), top = _split(entry, n)
        text = lp.decoded_token or ""
        tokens.append(text)
        lps.append(lp.logprob)
        tops.append({(t.decoded_token or ""): t.logprob for _, t in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(entries, n: int) -> dict:
    def one(lp):
        s = lp.decoded_token or ""
        return {"token": s, "logprob": lp.logprob, "bytes": list(s.encode())}

    content = []
    for entry in entries:
        (_, lp), top = _split(entry, n)
        content.append({**one(lp), "top_logprobs": [one(t) for _, t in top]})
    return {"content": content}
