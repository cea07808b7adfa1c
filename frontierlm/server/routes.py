"""vLLM's utility routes: /tokenize, /detokenize, /ping, /v1/models/{id}."""
from __future__ import annotations

from typing import Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

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


def add_routes(app: FastAPI, ctx, ready_context, check_model) -> None:
    def tokenizer(c):
        if c.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", param="model")
        return c.tokenizer

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        c = await ready_context()
        tok = tokenizer(c)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.prompt is not None:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
        else:
            template = c.options.chat_template or getattr(tok, "chat_template", None)
            if not template:
                raise APIError(400, "this model has no chat template", param="messages")
            try:
                text = tok.apply_chat_template(
                    [m.template_dict() for m in body.messages], tokenize=False,
                    tools=[t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None,
                    add_generation_prompt=body.add_generation_prompt, chat_template=c.options.chat_template)
            except Exception as e:  # jinja errors
                raise APIError(400, f"chat template failed: {e}", param="messages") from None
            ids = tok.encode(text, add_special_tokens=bool(body.add_special_tokens))
        return {"count": len(ids), "max_model_len": c.engine.engine.max_model_len, "tokens": ids,
                "token_strs": tok.convert_ids_to_tokens(ids) if body.return_token_strs else None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        c = await ready_context()
        tok = tokenizer(c)
        vocab = c.engine.engine.model_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens out of range [0, {vocab}): {bad[:5]}", param="tokens")
        return {"prompt": tok.decode(body.tokens)}

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
