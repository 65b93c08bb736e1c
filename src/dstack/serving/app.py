"""The HTTP server: TGI's API (`/generate`, `/generate_stream`, `/info`, ...) and OpenAI's.

The model loads in the background after the server starts listening, so `/health` answers 503
until it is ready -- what readiness probes expect.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from dstack.core.body_limit import BodySizeLimit, RequestTooLarge
from dstack.serving.engine import TokenInfo
from dstack.serving.openai_api import chat_completions, completions
from dstack.serving.openai_api import router as openai_router
from dstack.serving.sampling import SamplingParams
from dstack.serving.schemas import (
    MAX_BEST_OF,
    MAX_STOP_SEQUENCES,
    MAX_TOP_N_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateParameters,
    GenerateRequest,
    TokenizeRequest,
)
from dstack.serving.service import APIError, ClientGone, Result, Service
from dstack.serving.sse import HotRoutes, SSEResponse, sse_event
from dstack.version import __version__

#: The largest request body the engine reads. Prompts are bounded in tokens after parsing; this
#: bounds the bytes before (a 128k-token chat is a few MiB of JSON).
MAX_BODY_BYTES = 32 * 1024 * 1024


def error_body(message: str, error_type: str) -> dict[str, str]:
    return {"error": message, "error_type": error_type}


def error_response(exc: Exception) -> Response | None:
    """The response for an exception the routes raise on purpose; None for any other."""
    if isinstance(exc, APIError):
        return JSONResponse(error_body(exc.message, exc.error_type), status_code=exc.status)
    if isinstance(exc, ClientGone):
        return Response(status_code=499)
    if isinstance(exc, RequestTooLarge):
        return JSONResponse(error_body(exc.detail, "validation"), status_code=413)
    return None


def token_json(t: TokenInfo) -> dict[str, Any]:
    return {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special}


def sampling_from_tgi(p: GenerateParameters) -> SamplingParams:
    return SamplingParams(
        do_sample=p.do_sample,
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        typical_p=p.typical_p,
        repetition_penalty=p.repetition_penalty,
        frequency_penalty=p.frequency_penalty,
        seed=p.seed,
        top_n_tokens=p.top_n_tokens or 0,
    )


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "parameters")]
        if msg.startswith("`") or not loc:
            parts.append(msg)
        else:
            parts.append(f"`{'.'.join(loc)}`: {msg}")
    return "; ".join(parts) or "invalid request"


def create_app(service: Service) -> BodySizeLimit:
    """The server's ASGI app: the FastAPI app, with its generation routes reached through
    `HotRoutes` (sse.py), every request body bounded by `MAX_BODY_BYTES` (413 over it)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if service.status == "loading" and service.engine is None:
            service.start_loading()
        yield
        service.close()

    app = FastAPI(
        title="dstack serving",
        description="Built-in inference engine: a GGUF model on llama.cpp with continuous "
        "batching, behind the TGI and OpenAI HTTP APIs.",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
    )
    app.state.service = service

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> Response:
        """Swagger UI that also works behind dstack's proxy, which serves the engine under a
        path prefix and says so in X-Forwarded-Prefix."""
        from fastapi.openapi.docs import get_swagger_ui_html

        prefix = request.headers.get("x-forwarded-prefix", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{prefix}{app.openapi_url}", title=f"{app.title} - docs")

    async def _mapped(request: Request, exc: Exception) -> Response:
        response = error_response(exc)
        assert response is not None
        return response

    for raised_on_purpose in (APIError, ClientGone, RequestTooLarge):  # what error_response maps
        app.add_exception_handler(raised_on_purpose, _mapped)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(_validation_message(exc), "validation"), status_code=422)

    @app.get("/health", summary="200 when the model is loaded, 503 before")
    async def health() -> JSONResponse:
        if service.ready:
            return JSONResponse({}, status_code=200)
        message = "Model is loading" if service.status == "loading" else f"Model failed: {service.error}"
        return JSONResponse(error_body(message, "unhealthy"), status_code=503)

    @app.get("/info", summary="Model and router configuration (TGI)")
    async def info() -> dict[str, Any]:
        cfg = service.config
        max_total = service.max_total_tokens
        return {
            "model_id": service.model_id,
            "model_sha": None,
            "model_dtype": "gguf",
            "model_device_type": "cpu",
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": cfg.max_concurrent_requests,
            "max_best_of": MAX_BEST_OF,
            "max_stop_sequences": MAX_STOP_SEQUENCES,
            "max_input_tokens": max_total - 1,
            "max_input_length": max_total - 1,
            "max_total_tokens": max_total,
            "max_batch_total_tokens": max_total * cfg.max_batch_size,
            "max_batch_size": cfg.max_batch_size,
            "max_top_n_tokens": MAX_TOP_N_TOKENS,
            "max_waiting_tokens": 0,
            "waiting_served_ratio": 0.0,
            "validation_workers": 1,
            "max_client_batch_size": 4,
            "router": "dstack-serving",
            "version": __version__,
            "sha": None,
            "docker_label": None,
        }

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render_metrics(service), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize", summary="Tokenize inputs (TGI)")
    async def tokenize(body: TokenizeRequest) -> list[dict[str, Any]]:
        service.require_ready()
        ids = service.tokenize(body.inputs)
        out, data = [], b""
        for tid in ids:
            piece = service.model.piece(tid, True)
            text = piece.decode("utf-8", errors="replace")
            start = len(data.decode("utf-8", errors="ignore"))
            data += piece
            stop = len(data.decode("utf-8", errors="ignore"))
            out.append({"id": tid, "text": text, "start": start, "stop": stop})
        return out

    @app.post("/generate", summary="Generate text (TGI)")
    async def generate(body: GenerateRequest, request: Request) -> JSONResponse:
        return JSONResponse(await _generate(body, request))

    @app.post("/generate_stream", summary="Generate text, streamed as Server-Sent Events (TGI)")
    async def generate_stream(body: GenerateRequest) -> Response:
        return _stream(body)

    @app.post("/", summary="TGI compatibility route: /generate or /generate_stream by `stream`")
    async def compat(body: GenerateRequest, request: Request) -> Response:
        if body.stream:
            return _stream(body)
        return JSONResponse([await _generate(body, request)])

    async def _generate(body: GenerateRequest, request: Request) -> dict[str, Any]:
        p = body.parameters
        best_of = p.best_of or 1
        ticket = service.acquire()
        try:
            sampling = sampling_from_tgi(p)
            reqs = [
                service.build(
                    body.inputs,
                    sampling,
                    p.max_new_tokens,
                    p.stop,
                    truncate=p.truncate,
                    prefill_details=p.decoder_input_details,
                )
                for _ in range(best_of)
            ]
            results: list[Result] = await service.until_disconnect(
                request, asyncio.gather(*(service.collect(r) for r in reqs))
            )
        finally:
            ticket.release()
        best = max(results, key=lambda r: r.logprob)
        prefix = body.inputs if p.return_full_text else ""
        out: dict[str, Any] = {"generated_text": prefix + best.finish.generated_text}
        if p.details or p.decoder_input_details:
            details = _details(best, p)
            if best_of > 1:
                details["best_of_sequences"] = [
                    {"generated_text": prefix + r.finish.generated_text, **_details(r, p)}
                    for r in results
                    if r is not best
                ]
            out["details"] = details
        return out

    def _details(r: Result, p: GenerateParameters) -> dict[str, Any]:
        return {
            "finish_reason": r.finish.reason,
            "generated_tokens": r.finish.generated_tokens,
            "seed": r.finish.seed,
            "prefill": [{"id": t.id, "text": t.text, "logprob": t.logprob} for t in r.finish.prefill]
            if p.decoder_input_details
            else [],
            "tokens": [token_json(t) for t in r.tokens],
            "top_tokens": [[token_json(t) for t in step] for step in r.top_tokens] if p.top_n_tokens else None,
        }

    def _stream(body: GenerateRequest) -> SSEResponse:
        p = body.parameters
        if p.best_of is not None and p.best_of > 1:
            raise APIError(422, "`best_of` != 1 is not allowed for this endpoint", "validation")
        if p.decoder_input_details:
            raise APIError(422, "`decoder_input_details` == true is not supported when streaming tokens", "validation")
        ticket = service.acquire()
        try:
            req = service.build(body.inputs, sampling_from_tgi(p), p.max_new_tokens, p.stop, truncate=p.truncate)
        except BaseException:
            ticket.release()
            raise
        prefix = body.inputs if p.return_full_text else ""
        return SSEResponse(_tgi_events(req, p, prefix), ticket.release)

    async def _tgi_events(req: Any, p: GenerateParameters, prefix: str) -> AsyncIterator[bytes]:
        """TGI's stream: an event per token, the last one with the generated text (and details);
        each item is every event ready at that moment."""
        index = 0
        async with aclosing(service.events(req)) as batches:
            async for batch in batches:
                out = []
                for ev in batch:
                    if ev.error is not None:
                        out.append(sse_event(error_body(ev.error, "generation"), space=False))
                        break
                    assert ev.token is not None
                    index += 1
                    payload: dict[str, Any] = {
                        "index": index,
                        "token": token_json(ev.token),
                        "top_tokens": [token_json(t) for t in ev.top] if p.top_n_tokens else None,
                        "generated_text": None,
                        "details": None,
                    }
                    if ev.finish is not None:
                        payload["generated_text"] = prefix + ev.finish.generated_text
                        if p.details:
                            payload["details"] = {
                                "finish_reason": ev.finish.reason,
                                "generated_tokens": ev.finish.generated_tokens,
                                "seed": ev.finish.seed,
                                "input_length": ev.finish.input_length,
                            }
                    out.append(sse_event(payload, space=False))
                yield "".join(out).encode()

    app.include_router(openai_router)
    hot = {
        "/v1/completions": (CompletionRequest, completions),
        "/v1/chat/completions": (ChatCompletionRequest, chat_completions),
        "/generate_stream": (GenerateRequest, lambda body, request: generate_stream(body)),
    }
    return BodySizeLimit(
        HotRoutes(app, hot, error_response),
        limit_for=lambda path: (MAX_BODY_BYTES, ""),
        error_body=lambda message: error_body(message, "validation"),
    )


def render_metrics(service: Service) -> str:
    """Prometheus text exposition of request and engine counters."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, value: float, labels: dict[str, str] | None = None) -> None:
        if not any(line.startswith(f"# TYPE {name} ") for line in lines):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
        label = ""
        if labels:
            label = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        lines.append(f"{name}{label} {value}")

    c = service.counters
    metric("dstack_serving_ready", "gauge", "1 when the model is loaded", 1 if service.ready else 0)
    metric("dstack_serving_requests_total", "counter", "HTTP generation requests admitted", c.get("requests", 0))
    metric("dstack_serving_requests_rejected_total", "counter", "Requests refused with 429", c.get("rejected", 0))
    metric("dstack_serving_requests_in_flight", "gauge", "Generation requests being served", service.in_flight)
    metric("dstack_serving_sequences_succeeded_total", "counter", "Sequences that finished", c.get("successes", 0))
    metric("dstack_serving_sequences_failed_total", "counter", "Sequences that failed", c.get("failures", 0))
    engine = service.engine
    if engine is not None:
        s = engine.stats
        metric("dstack_serving_sequences_cancelled_total", "counter", "Sequences cancelled (client gone)", s.cancelled)
        for reason, n in sorted(s.finished.items()):
            metric("dstack_serving_finished_total", "counter", "Finished sequences by reason", n, {"reason": reason})
        metric("dstack_serving_prompt_tokens_total", "counter", "Prompt tokens prefilled", s.prompt_tokens)
        metric("dstack_serving_generated_tokens_total", "counter", "Tokens generated", s.generated_tokens)
        metric("dstack_serving_decode_steps_total", "counter", "llama_decode calls", s.decode_steps)
        metric("dstack_serving_batch_tokens_total", "counter", "Tokens sent to llama_decode", s.batch_tokens)
        metric("dstack_serving_queue_size", "gauge", "Sequences waiting for a batch slot", s.queue_size)
        metric("dstack_serving_batch_size", "gauge", "Sequences in the running batch", s.batch_size)
        metric("dstack_serving_batch_max_size", "gauge", "Batch slots", engine.max_active)
        metric(
            "dstack_serving_prefix_cache_hits_total",
            "counter",
            "Requests that reused a cached prompt prefix",
            s.prefix_cache_hits,
        )
        metric(
            "dstack_serving_prefix_cache_tokens_total",
            "counter",
            "Prompt tokens not prefilled thanks to the cache",
            s.prefix_cache_tokens,
        )
        metric(
            "dstack_serving_host_cache_hits_total",
            "counter",
            "Requests whose cached prefix was restored from host memory",
            s.host_cache_hits,
        )
        if engine.host_cache is not None:
            metric(
                "dstack_serving_host_cache_bytes",
                "gauge",
                "Host memory holding cached prefixes",
                engine.host_cache.bytes,
            )
        # TGI's names, for dashboards built for TGI
        metric("tgi_queue_size", "gauge", "Sequences waiting for a batch slot", s.queue_size)
        metric("tgi_batch_current_size", "gauge", "Sequences in the running batch", s.batch_size)
    return "\n".join(lines) + "\n"
