"""What the HTTP layer needs from the engine: loading, admission, validation, collection.

Shared by the TGI and OpenAI routes so both apply the same limits and the same semantics.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from starlette.requests import Request

from dstack.core.chat_template import CHATML_TEMPLATE, ChatTemplate
from dstack.serving.engine import Engine, Event, Finish, GenerationRequest, TokenInfo
from dstack.serving.sampling import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")


#: The warm-up decodes this prompt (a few dozen tokens: llama.cpp's matrix-matrix kernels, which
#: every prompt of 2+ tokens and every batched step use) and then one more token (the
#: matrix-vector kernels of single-sequence decoding), so a kernel that crashes on this CPU crashes
#: before /health answers 200. A one-token prompt would exercise only the second: on an AMX host with
#: weight repacking forced on, "Hello" warmed up fine and the first real prompt died (SIGSEGV).
WARM_UP_PROMPT = (
    "The quick brown fox jumps over the lazy dog while the engine checks, before it reports "
    "ready, that every kernel it will use runs on this processor."
)


@dataclass
class ServeConfig:
    model: str
    quantize: str | None = None
    host: str = "0.0.0.0"
    port: int = 8000
    max_concurrent_requests: int = 16
    max_batch_size: int = 16
    ctx_size: int = 2048  # per request: prompt + generated tokens (TGI's max_total_tokens)
    threads: int | None = None
    prefill_chunk: int = 256
    prefix_cache_slots: int = 4  # KV streams that only keep finished requests' prefixes for reuse
    host_cache_mib: int = 512  # prefixes no slot holds any more, kept in host memory (host_cache.py)
    kv_cache_type: str = "q8_0"  # q8_0 keeps greedy output batch-invariant (see llama.py)
    kv_unified: bool = False  # True: one KV buffer for all sequences; False: a stream each (batch-invariant)
    weight_repack: str = "auto"  # auto | on | off (see llama.py: off where AMX is present)
    model_id: str | None = None
    verbose: bool = False


class APIError(Exception):
    """An error answered as TGI does: `{"error": ..., "error_type": ...}` with a status code."""

    def __init__(self, status: int, message: str, error_type: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


def validation_error(message: str) -> APIError:
    return APIError(422, message, "validation")


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


@dataclass
class Result:
    """A finished generation, as collected for a non-streaming response."""

    finish: Finish
    tokens: list[TokenInfo] = field(default_factory=list)
    top_tokens: list[list[TokenInfo]] = field(default_factory=list)

    @property
    def logprob(self) -> float:
        return sum(t.logprob or 0.0 for t in self.tokens)


class Ticket:
    """One admitted HTTP request; `release` is idempotent so every exit path can call it."""

    def __init__(self, service: Service) -> None:
        self._service = service
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._service.in_flight -= 1


class Service:
    """The loaded model and its engine, plus request accounting for /metrics."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.model_id = config.model_id or config.model
        self.status = "loading"
        self.error: str | None = None
        self.model_path: Path | None = None
        self.model: Any = None
        self.engine: Engine | None = None
        self.chat_template: ChatTemplate | None = None
        self.chat_template_source: str | None = None
        self.in_flight = 0
        self.counters: dict[str, int] = {}
        self.started = int(time.time())
        self._loader: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------------
    def start_loading(self) -> None:
        self._loader = threading.Thread(target=self._load, name="dstack-serving-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        from dstack.serving.llama import LlamaModel
        from dstack.serving.models import read_chat_metadata, resolve_model

        try:
            t0 = time.monotonic()
            path = resolve_model(self.config.model, self.config.quantize)
            self.model_path = path
            template, bos, eos = read_chat_metadata(path)
            model = LlamaModel(
                path,
                n_ctx_per_seq=self.config.ctx_size,
                n_seq_max=self.config.max_batch_size + self.config.prefix_cache_slots,
                threads=self.config.threads,
                verbose=self.config.verbose,
                kv_type=self.config.kv_cache_type,
                kv_unified=self.config.kv_unified,
                repack=self.config.weight_repack,
            )
            self.chat_template_source = template
            self.chat_template = ChatTemplate(template or CHATML_TEMPLATE, bos, eos)
            engine = Engine(
                model,
                prefill_chunk=self.config.prefill_chunk,
                max_active=self.config.max_batch_size,
                host_cache_bytes=self.config.host_cache_mib * 1024 * 1024,
            )
            engine.start()
            engine.warm_up(model.tokenize(WARM_UP_PROMPT, add_special=True))
            self.model, self.engine = model, engine
            self.status = "ready"
            print(
                f"Model {path.name} loaded and warmed up in {time.monotonic() - t0:.1f}s "
                f"(ctx {model.n_ctx_per_seq} tokens x {engine.max_active} sequences, "
                f"{model.n_seq_max - engine.max_active} more for the prefix cache, "
                f"{'unified' if model.kv_unified else 'per-sequence'} KV, "
                f"{model.threads} threads, weight repacking {'on' if model.repack else 'off'}, "
                f"extra buffer types: {', '.join(model.extra_buffer_types) or 'none'})",
                flush=True,
            )
            if model.kv_unified:
                print(
                    "Warning: the unified KV layout is not exact: once other requests' cells are freed, "
                    "llama.cpp's logits for a running request differ from the exact ones by up to 1.6 "
                    "(bench/serving/unified_cell_order_check.py); --kv-layout per-sequence is exact",
                    flush=True,
                )
        except Exception as e:
            self.status = "failed"
            self.error = f"{type(e).__name__}: {e}" if not str(e) else str(e)
            print(f"Failed to load model: {self.error}", flush=True)
            self.on_load_failed()

    def on_load_failed(self) -> None:
        """Hook: the CLI replaces it to stop the server."""

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def require_ready(self) -> Engine:
        if self.status == "failed":
            raise APIError(503, f"Model failed to load: {self.error}", "unhealthy")
        if self.engine is None:
            raise APIError(503, "Model is loading", "unhealthy")
        return self.engine

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # --- admission --------------------------------------------------------------------------
    def acquire(self) -> Ticket:
        self.require_ready()
        if self.in_flight >= self.config.max_concurrent_requests:
            self.count("rejected")
            raise APIError(429, "Model is overloaded", "overloaded")
        self.in_flight += 1
        self.count("requests")
        return Ticket(self)

    # --- request building -------------------------------------------------------------------
    @property
    def max_total_tokens(self) -> int:
        return int(self.model.n_ctx_per_seq) if self.model is not None else self.config.ctx_size

    def tokenize(self, text: str) -> list[int]:
        bos = self.chat_template.bos_token if self.chat_template else ""
        add_special = not (bos and text.startswith(bos))
        return self.model.tokenize(text, add_special=add_special, parse_special=True)

    def build(
        self,
        text: str,
        sampling: SamplingParams,
        max_new_tokens: int | None,
        stop: list[str],
        *,
        truncate: int | None = None,
        prefill_details: bool = False,
    ) -> GenerationRequest:
        """Tokenize and check lengths the way TGI does (422 when they can't fit)."""
        self.require_ready()
        tokens = self.tokenize(text)
        if truncate is not None and len(tokens) > truncate:
            tokens = tokens[-truncate:]
        n = len(tokens)
        if n == 0:
            raise validation_error("`inputs` cannot be empty")
        max_total = self.max_total_tokens
        if n >= max_total:
            raise validation_error(f"`inputs` must have less than {max_total} tokens. Given: {n}")
        if max_new_tokens is None:
            max_new_tokens = max_total - n
        if n + max_new_tokens > max_total:
            raise validation_error(
                f"`inputs` tokens + `max_new_tokens` must be <= {max_total}. "
                f"Given: {n} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
            )
        return GenerationRequest(
            prompt=tokens,
            params=sampling,
            max_new_tokens=max_new_tokens,
            stop=stop,
            prefill_details=prefill_details,
        )

    # --- running ----------------------------------------------------------------------------
    async def events(self, req: GenerationRequest) -> AsyncIterator[list[Event]]:
        """The engine's events for `req`, in lists of those ready together (`Engine.stream`);
        closing this iterator cancels the generation."""
        engine = self.require_ready()
        async with aclosing(engine.stream(req)) as batches:
            async for batch in batches:
                last = batch[-1]
                if last.error is not None:
                    self.count("failures")
                elif last.finish is not None:
                    self.count("successes")
                yield batch

    async def collect(self, req: GenerationRequest) -> Result:
        tokens: list[TokenInfo] = []
        tops: list[list[TokenInfo]] = []
        async with aclosing(self.events(req)) as batches:
            async for batch in batches:
                for ev in batch:
                    if ev.error is not None:
                        raise APIError(500, ev.error, "generation")
                    assert ev.token is not None
                    tokens.append(ev.token)
                    if ev.top:
                        tops.append(ev.top)
                    if ev.finish is not None:
                        return Result(ev.finish, tokens, tops)
        raise APIError(500, "generation ended without a result", "incomplete_generation")

    async def until_disconnect(self, request: Request, work: Awaitable[T]) -> T:
        """Run `work`, cancelling it (and so its sequences) if the client goes away."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                return task.result()
            self.count("cancelled")
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
            raise ClientGone()
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()


async def _wait_disconnect(request: Request) -> None:
    # the body has been read already, so the next ASGI message can only be the disconnect
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def merge(streams: list[AsyncIterator[list[Event]]]) -> AsyncIterator[tuple[int, list[Event]]]:
    """Interleave several streams of event lists as they arrive, each list tagged with its stream's index."""
    if len(streams) == 1:
        async for batch in streams[0]:
            yield 0, batch
        return
    queue: asyncio.Queue[tuple[int, list[Event] | None, BaseException | None]] = asyncio.Queue()

    async def pump(i: int, it: AsyncIterator[list[Event]]) -> None:
        try:
            async for batch in it:
                await queue.put((i, batch, None))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, None, e))
            return
        await queue.put((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, batch, exc = await queue.get()
            if exc is not None:
                raise exc
            if batch is None:
                remaining -= 1
                continue
            yield i, batch
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for it in streams:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:
                    pass
