"""The prefill leg of a disaggregated request, the way vLLM's example proxy does it: the request goes to a
prefill instance with max_tokens=1 and `kv_transfer_params: {"do_remote_decode": true}`; that instance computes
the prompt, holds its KV blocks and answers with the `kv_transfer_params` a decode instance needs to pull them
(frontierlm/kv_transfer). The router then sends the original request, with those parameters, to a decode
instance, which streams the answer. (SGLang's bootstrap room pairs the two sides before the prefill instead;
the proxy way keeps the instances unaware of each other until the decode side pulls, which is what lets the
decode side skip the blocks its own prefix cache already holds.)

A prefill leg that fails is retried once on another prefill instance; if that fails too, the request goes to
the decode instance without parameters and is prefilled there (counted as a local-prefill fallback)."""
from __future__ import annotations

import time

from fastapi.responses import Response

from frontierlm.logger import init_logger
from frontierlm.router.instances import RETRYABLE

logger = init_logger(__name__)

# fields that shape the answer but not the prompt's KV: left out of the one-token prefill request
_ANSWER_ONLY = ("stream", "stream_options", "logprobs", "top_logprobs", "min_tokens", "response_format",
                "structured_outputs", "grammar", "json_schema", "guided_json", "guided_regex", "guided_choice",
                "guided_grammar", "n", "max_completion_tokens", "return_token_ids", "stop", "stop_token_ids")


def prefill_body(body: dict) -> dict:
    out = {k: v for k, v in body.items() if k not in _ANSWER_ONLY}
    out.update(max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
    if body.get("tools"):
        out["tool_choice"] = "none"  # the tools still shape the prompt; no call grammar for one token
    return out


async def prefill(router, path: str, body: dict, prompt: str) -> dict | Response:
    """The body to send to the decode instance (with kv_transfer_params when the prefill leg worked), or the
    prefill instance's own answer when it refused the request (a 4xx: the client's request is at fault)."""
    start = time.monotonic()
    answer, why, tried = await router.post_with_retry(router.prefills, router.prefill_policy, path,
                                                      prefill_body(body), prompt)
    if answer is not None and answer.status_code not in RETRYABLE:
        if answer.status_code != 200:
            return Response(answer.content, answer.status_code, media_type=answer.headers.get("content-type"))
        params = answer.json().get("kv_transfer_params")
        if isinstance(params, dict):
            router.metrics.prefill.observe(time.monotonic() - start)
            return {**body, "kv_transfer_params": params}
        why = f"{tried[-1].url} returned no kv_transfer_params (is it serving with kv_role kv_producer?)"
    logger.warning("prefill leg failed (%s): prefilling on the decode instance", why)
    router.metrics.fallbacks.inc()
    return body
