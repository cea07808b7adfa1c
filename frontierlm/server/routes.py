"""vLLM's utility routes: /tokenize, /detokenize, /ping, /v1/models/{id}."""
from __future__ import annotations

from typing import Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from frontierlm.engine.tokenizer import encode
from frontierlm.server.errors import APIError
from frontierlm.server.protocol import ChatMessage
from frontierlm.server.tools.protocol import Tool


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TokenizeRequest(_Body):
    """vLLM's two shapes: a `prompt`, or chat `messages` rendered through the chat template first."""
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[bool] = None  # default: True for a prompt, False for messages (vLLM's)
    add_generation_prompt: bool = True
    tools: Optional[list[Tool]] = None
    return_token_strs: bool = False


class DetokenizeRequest(_Body):
    model: Optional[str] = None
    tokens: list[int] = Field(max_length=1_000_000)


def _add_special_tokens(tok, ids: list[int]) -> list[int]:
    """`ids` wrapped in the special tokens the tokenizer's post-processor adds to any text (a BOS, say),
    found by encoding one letter with and without them (for /tokenize of messages with add_special_tokens)."""
    core, full = encode(tok, "a", add_special_tokens=False), encode(tok, "a", add_special_tokens=True)
    for i in range(len(full) - len(core) + 1):
        if full[i:i + len(core)] == core:
            return full[:i] + ids + full[i + len(core):]
    return ids


def add_routes(app: FastAPI, ctx, ready_context, check_model) -> None:
    def tokenizer(c):
        if c.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", param="model")
        return c.tokenizer

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        # on the tokenizer pool's worker threads (a long prompt must not stall the loop), with the completion
        # and chat routes' rules: a raw prompt's special-token text is control tokens (the caller wrote the
        # prompt), a message's is plain text unless the operator opted out (--parse-special-tokens-in-content)
        check_model(body.model)
        c = await ready_context()
        tokenizer(c)
        pool = c.tokenizer_pool
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        limit = c.engine.engine.max_model_len
        if body.prompt is not None:
            ids = await pool.encode(body.prompt, limit, add_special_tokens=body.add_special_tokens is not False)
        else:
            if not (c.options.chat_template or getattr(c.tokenizer, "chat_template", None)):
                raise APIError(400, "this model has no chat template", param="messages")
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            _, ids = await pool.render_chat([m.template_dict() for m in body.messages], limit,
                                            body.add_generation_prompt, c.parse_special_tokens_in_content,
                                            tools=tools, chat_template=c.options.chat_template)
            if body.add_special_tokens:
                ids = await pool.call(_add_special_tokens, ids)
        param = "prompt" if body.prompt is not None else "messages"
        if len(ids) > limit:  # vLLM's answer too
            raise APIError(400, f"{param} has {len(ids)} tokens; the model's context is {limit} tokens",
                           param=param, code="context_length_exceeded")
        strs = await pool.call(lambda tok: tok.convert_ids_to_tokens(ids)) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": limit, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        c = await ready_context()
        tokenizer(c)
        vocab = c.engine.engine.model_config.vocab_size

        def work(tok):  # up to a million ids: checked and decoded off the loop
            bad = [t for t in body.tokens if not 0 <= t < vocab]
            return bad, (None if bad else tok.decode(body.tokens))

        bad, text = await c.tokenizer_pool.call(work)
        if bad:
            raise APIError(400, f"tokens out of range [0, {vocab}): {bad[:5]}", param="tokens")
        return {"prompt": text}

    async def ping():
        # vLLM's liveness probe (SageMaker's name): 200 once the model serves, 503 before and while stopping
        ready = ctx.engine.is_ready and not ctx.shutting_down and ctx.engine.dead is None
        return Response(status_code=200 if ready else 503)

    # one route per method, so the OpenAPI document gets distinct operation ids
    app.add_api_route("/ping", ping, methods=["GET"], operation_id="ping_get")
    app.add_api_route("/ping", ping, methods=["POST"], operation_id="ping_post")

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        from frontierlm.server.api import model_card

        c = await ready_context()
        if model_id not in c.options.served_model_names:
            return JSONResponse({"error": {"message": f"The model {model_id!r} does not exist",
                                           "type": "invalid_request_error", "param": "model",
                                           "code": "model_not_found"}}, status_code=404)
        return model_card(c, model_id)
