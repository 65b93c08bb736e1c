"""OpenAI-compatible routes: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Sampling follows OpenAI (temperature defaults to 1, 0 means greedy); the generation itself is the
same engine path as TGI's routes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from dstack.core.chat_template import ChatTemplate, ChatTemplateError
from dstack.serving.engine import FINISH_LENGTH, Event, GenerationRequest, TokenInfo
from dstack.serving.sampling import SamplingParams
from dstack.serving.schemas import ChatCompletionRequest, CompletionRequest, _OpenAICommon
from dstack.serving.service import Result, Service, merge, validation_error
from dstack.serving.sse import SSEResponse, sse_event, to_json
from dstack.version import __version__

router = APIRouter(prefix="/v1")

FINGERPRINT = f"dstack-serving-{__version__}"


def _service(request: Request) -> Service:
    return request.app.state.service


def openai_finish_reason(reason: str) -> str:
    return "length" if reason == FINISH_LENGTH else "stop"


def sampling_from_openai(body: _OpenAICommon, top_n: int = 0, logprobs: bool = True) -> SamplingParams:
    """`logprobs`: whether the response carries tokens' log-probabilities (else none are computed)."""
    greedy = body.temperature == 0.0
    return SamplingParams(
        do_sample=not greedy,
        temperature=None if greedy or body.temperature is None else body.temperature,
        top_p=body.top_p if body.top_p is not None and body.top_p < 1.0 and not greedy else None,
        top_k=body.top_k if not greedy else None,
        seed=body.seed,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        repetition_penalty=body.repetition_penalty,
        top_n_tokens=top_n,
        logprobs=logprobs,
    )


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprob_entry(t: TokenInfo, top: list[TokenInfo]) -> dict[str, Any]:
    data = t.text.encode("utf-8")
    return {
        "token": t.text,
        "logprob": t.logprob,
        "bytes": list(data),
        "top_logprobs": [{"token": x.text, "logprob": x.logprob, "bytes": list(x.text.encode("utf-8"))} for x in top],
    }


@router.get("/models", summary="The served model (OpenAI)")
async def models(request: Request) -> dict[str, Any]:
    service = _service(request)
    return {
        "object": "list",
        "data": [{"id": service.model_id, "object": "model", "created": service.started, "owned_by": "dstack"}],
    }


def chat_prompt(template: ChatTemplate, body: ChatCompletionRequest) -> str:
    """The prompt a chat request becomes: its messages as validated, through the model's template."""
    try:
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        return template.render(messages, add_generation_prompt=True)
    except ChatTemplateError as e:
        raise validation_error(str(e)) from e


@router.post("/chat/completions", summary="Chat completion (OpenAI)")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    service = _service(request)
    service.require_ready()
    assert service.chat_template is not None
    prompt = chat_prompt(service.chat_template, body)
    top_n = (body.top_logprobs or 0) if body.logprobs else 0
    max_new = body.max_completion_tokens or body.max_tokens
    return await _run(
        service, request, body, [prompt] * (body.n or 1), max_new, top_n, chat=True, logprobs=bool(body.logprobs)
    )


@router.post("/completions", summary="Text completion (OpenAI)")
async def completions(body: CompletionRequest, request: Request) -> Any:
    service = _service(request)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    n = body.n or 1
    expanded = [p for p in prompts for _ in range(n)]
    top_n = min(body.logprobs or 0, 5)
    return await _run(
        service,
        request,
        body,
        expanded,
        body.max_tokens,
        top_n,
        chat=False,
        logprobs=False,
        echo_prompts=expanded if body.echo else None,
    )


async def _run(
    service: Service,
    request: Request,
    body: _OpenAICommon,
    prompts: list[str],
    max_new: int | None,
    top_n: int,
    *,
    chat: bool,
    logprobs: bool,
    echo_prompts: list[str] | None = None,
) -> Any:
    ticket = service.acquire()
    try:
        sampling = sampling_from_openai(body, top_n, logprobs)
        reqs = [service.build(p, sampling, max_new, body.stop_list) for p in prompts]
    except BaseException:
        ticket.release()
        raise
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if body.stream:
        return SSEResponse(_stream(service, reqs, rid, created, body, logprobs, echo_prompts, chat), ticket.release)
    try:
        results: list[Result] = await service.until_disconnect(
            request, asyncio.gather(*(service.collect(r) for r in reqs))
        )
    finally:
        ticket.release()
    usage = _usage(sum(len(r.prompt) for r in reqs), sum(r.finish.generated_tokens for r in results))
    choices = []
    for i, r in enumerate(results):
        reason = openai_finish_reason(r.finish.reason)
        if chat:
            lp = None
            if logprobs:
                # one list of alternatives per token, or none at all (top_logprobs not asked for)
                tops = r.top_tokens if len(r.top_tokens) == len(r.tokens) else [[] for _ in r.tokens]
                lp = {
                    "content": [_logprob_entry(t, top) for t, top in zip(r.tokens, tops, strict=True) if not t.special]
                }
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": r.finish.generated_text},
                    "logprobs": lp,
                    "finish_reason": reason,
                }
            )
        else:
            text = (echo_prompts[i] if echo_prompts else "") + r.finish.generated_text
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": reason})
    return JSONResponse(
        {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": service.model_id,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            "usage": usage,
        }
    )


def _chunk(
    rid: str, created: int, model: str, obj: str, choices: list[dict[str, Any]], usage_field: bool
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": FINGERPRINT,
        "choices": choices,
    }
    if usage_field:
        chunk["usage"] = None
    return chunk


def _opening_choices(n: int, echo_prompts: list[str] | None, chat: bool) -> list[dict[str, Any]]:
    """What a stream sends before any token: each chat choice's role, or the echoed prompts."""
    if chat:
        return [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(n)
        ]
    return [{"index": i, "text": p, "logprobs": None, "finish_reason": None} for i, p in enumerate(echo_prompts or [])]


def _event_choice(i: int, ev: Event, logprobs: bool, chat: bool) -> dict[str, Any] | None:
    """The streamed choice for one engine event; None when it releases nothing to send."""
    reason = openai_finish_reason(ev.finish.reason) if ev.finish is not None else None
    if not chat:
        if ev.finish is None and not ev.delta:
            return None
        return {"index": i, "text": ev.delta, "logprobs": None, "finish_reason": reason}
    lp = None
    if logprobs and ev.token is not None and not ev.token.special:
        lp = {"content": [_logprob_entry(ev.token, ev.top)]}
    if ev.finish is None and not ev.delta and lp is None:
        return None
    delta = {"role": "assistant", "content": ev.delta} if ev.delta or ev.finish is None else {}
    return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}


def _chunk_object(chat: bool) -> str:
    return "chat.completion.chunk" if chat else "text_completion"


class _ChunkEncoder:
    """A stream's chunks as server-sent events. Everything but the choices is the same in every
    chunk of a stream, so it is encoded once; each chunk encodes only its choice."""

    def __init__(self, rid: str, created: int, model: str, obj: str, usage_field: bool) -> None:
        envelope = to_json(_chunk(rid, created, model, obj, [], usage_field))
        head, tail = envelope.rsplit('"choices": []', 1)
        self.head = "data: " + head + '"choices": ['
        self.tail = "]" + tail + "\n\n"

    def event(self, choice: dict[str, Any]) -> str:
        return self.head + to_json(choice) + self.tail


async def _stream(
    service: Service,
    reqs: list[GenerationRequest],
    rid: str,
    created: int,
    body: _OpenAICommon,
    logprobs: bool,
    echo_prompts: list[str] | None,
    chat: bool,
) -> AsyncIterator[bytes]:
    """A streamed chat or text completion: its chunks as server-sent events, then `[DONE]`; each
    item is every chunk ready at that moment. The opening chunks (each chat choice's role, the
    echoed prompts) go out with the first tokens' chunks."""
    usage = body.include_usage
    encoder = _ChunkEncoder(rid, created, service.model_id, _chunk_object(chat), usage)
    out = [encoder.event(choice) for choice in _opening_choices(len(reqs), echo_prompts, chat)]
    completion_tokens = finished = 0
    async with aclosing(merge([service.events(r) for r in reqs])) as batches:
        async for i, batch in batches:
            for ev in batch:
                if ev.error is not None:
                    out.append(sse_event({"error": {"message": ev.error, "type": "generation"}}))
                    yield "".join(out).encode()
                    return
                if ev.finish is not None:
                    completion_tokens += ev.finish.generated_tokens
                    finished += 1
                choice = _event_choice(i, ev, logprobs, chat)
                if choice is not None:
                    out.append(encoder.event(choice))
            if out and finished < len(reqs):  # the last chunks go out with `[DONE]`
                yield "".join(out).encode()
                out = []
    if usage:
        final = _chunk(rid, created, service.model_id, _chunk_object(chat), [], False)
        final["usage"] = _usage(sum(len(r.prompt) for r in reqs), completion_tokens)
        out.append(sse_event(final))
    out.append("data: [DONE]\n\n")
    yield "".join(out).encode()
