"""Continuous batching over one llama.cpp context.

A scheduler thread owns the context. Each step it decodes the next token of every running
sequence and the next prompt chunk of newly admitted ones, samples each sequence from its own
logits row and hands the token to the request's consumer. Requests join and leave between any
two steps; a finished sequence's slot is reused at once, its KV kept for the prefix cache until
then. `llama_decode` releases the GIL, so the asyncio HTTP layer keeps running meanwhile.

How a step is split into `llama_decode` calls depends on the KV layout (llama.py):
- unified (`--kv-layout unified`): one call per step, prompt chunks and decode tokens together, which
  llama.cpp runs as one pass; prefixes are shared by tagging cells, so any length is reused; not
  exact once freed cells are reused (llama.py says how far off);
- one stream per sequence (the default; batch invariant): a call per prompt chunk, then one for all decodes
  (see `_step_streams`); a prefix cached in a slot the new sequence may take is reused in place, one
  cached elsewhere costs a stream copy (see `_place`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from dstack.serving.host_cache import HostPrefixCache, SavedPrefix
from dstack.serving.llama import LlamaModel
from dstack.serving.prefix_cache import PrefixCache
from dstack.serving.sampling import Sampler, SamplingParams
from dstack.serving.text import OutputText

logger = logging.getLogger(__name__)

FINISH_LENGTH = "length"
FINISH_EOS = "eos_token"
FINISH_STOP = "stop_sequence"


@dataclass
class TokenInfo:
    id: int
    text: str
    logprob: float | None
    special: bool = False


@dataclass
class Finish:
    reason: str
    generated_text: str
    generated_tokens: int
    input_length: int
    seed: int | None
    prefill: list[TokenInfo] = field(default_factory=list)


@dataclass
class Event:
    """One generated token (`delta` is the output text it releases) or the end of a request."""

    token: TokenInfo | None
    delta: str = ""
    top: list[TokenInfo] = field(default_factory=list)
    finish: Finish | None = None
    error: str | None = None


@dataclass
class GenerationRequest:
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)
    prefill_details: bool = False
    emit: Callable[[Event], None] = lambda e: None
    # Set (by `Engine.stream`) when `emit` must run on this event loop: the scheduler then hands
    # over all of a step's events for the loop in one thread-safe call instead of one per token.
    loop: asyncio.AbstractEventLoop | None = None
    id: int = field(default_factory=itertools.count(1).__next__)
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)


class _Sequence:
    """Scheduler-side state of one admitted request (touched by the scheduler thread only)."""

    def __init__(self, req: GenerationRequest, slot: int, model: LlamaModel) -> None:
        self.req = req
        self.slot = slot
        self.n_prefilled = 0
        self.n_past = 0
        self.next_token: int | None = None
        self.generated = 0
        self.sampler = Sampler(req.params, model.n_vocab, req.prompt)
        self.out = OutputText(req.stop)
        self.prefill: list[TokenInfo] = []
        self.fed: list[int] = []  # generated tokens already decoded into the KV cache

    @property
    def prefilling(self) -> bool:
        return self.n_prefilled < len(self.req.prompt)

    def kv_tokens(self) -> list[int]:
        """The tokens at positions 0..n_past-1 of this sequence's KV stream."""
        return list(self.req.prompt[: self.n_prefilled]) + self.fed


@dataclass
class EngineStats:
    requests: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    cancelled: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    batch_tokens: int = 0
    queue_size: int = 0
    batch_size: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_tokens: int = 0
    stream_copies: int = 0  # KV stream copies (per-sequence layout): prefixes copied, parked or moved
    host_cache_hits: int = 0  # requests whose prefix came back from host memory (host_cache.py)
    host_cache_saves: int = 0  # prefixes saved to host memory as their slot was overwritten


class Engine:
    """The scheduler: submit requests from any thread, events come back through `emit`."""

    def __init__(
        self, model: LlamaModel, prefill_chunk: int = 256, max_active: int | None = None, host_cache_bytes: int = 0
    ) -> None:
        self.model = model
        self.n_slots = model.n_seq_max
        # At most `max_active` slots decode at once; the others keep finished sequences' KV for
        # the prefix cache, so it still has room when every decoding slot is busy.
        self.max_active = min(max_active or self.n_slots, self.n_slots)
        self.unified = model.kv_unified
        # With a unified KV buffer reuse is a tag on cells: even a short prefix (a repeated
        # prompt) is worth taking from another slot.
        self.cache = PrefixCache(min_reuse=1) if self.unified else PrefixCache()
        # Second level, per-sequence layout only: prefixes no slot holds any more, in host memory.
        self.host_cache = HostPrefixCache(host_cache_bytes) if host_cache_bytes > 0 and not self.unified else None
        # Slots a stream copy queued for the next decode reads from / writes to: until it runs, a
        # destination's cells are not its data yet, and writing a source's cells would change what
        # is copied. Other slots may be saved to and restored from host memory at any time.
        self._copy_sources: set[int] = set()
        self._copy_destinations: set[int] = set()
        self.prefill_chunk = max(1, min(prefill_chunk, model.n_batch))
        self.stats = EngineStats()
        self._cv = threading.Condition()
        self._waiting: deque[GenerationRequest] = deque()
        self._active: dict[int, _Sequence] = {}
        self._free: set[int] = set(range(self.n_slots))
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[Event], None], Event]]] = {}

    # --- public, thread-safe --------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dstack-serving-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def warm_up(self, prompt: list[int], timeout: float = 600) -> None:
        """Prefill `prompt`, decode two tokens and wait for them: the server reports ready only after this.

        A build whose kernels crash on this CPU (see llama.py on AMX) then dies before /health
        ever answers 200, instead of dying on the first user's request after looking ready.
        """
        done = threading.Event()
        result: list[Event] = []

        def emit(ev: Event) -> None:
            if ev.finish is not None or ev.error is not None:
                result.append(ev)
                done.set()

        # Two new tokens: the second one is a decoding step (a one-row batch), the first comes
        # from the prompt's pass (many rows): llama.cpp picks different kernels for the two.
        self.submit(GenerationRequest(prompt=prompt, params=SamplingParams(), max_new_tokens=2, emit=emit))
        if not done.wait(timeout):
            raise RuntimeError(f"warm-up decode did not finish in {timeout:.0f}s")
        if result[0].error is not None:
            raise RuntimeError(f"warm-up decode failed: {result[0].error}")
        with self._cv:
            self.stats = EngineStats(queue_size=self.stats.queue_size)  # metrics count users' requests only

    def submit(self, req: GenerationRequest) -> None:
        with self._cv:
            self._waiting.append(req)
            self.stats.queue_size = len(self._waiting)
            self._cv.notify()

    def cancel(self, req: GenerationRequest) -> None:
        """Stop generating for `req`; its slot is freed before the next decode step."""
        req.cancelled = True
        with self._cv:
            self._cv.notify()

    async def stream(self, req: GenerationRequest) -> AsyncIterator[list[Event]]:
        """Submit `req` and yield its events, as lists of all those that arrived together (the
        events of one scheduling step, or more when the consumer fell behind: a streaming
        response writes each list with one send); leaving the iteration early cancels it."""
        loop = asyncio.get_running_loop()
        inbox = _Inbox()
        req.emit = inbox.put
        req.loop = loop
        self.submit(req)
        done = False
        try:
            while True:
                if not inbox.events:
                    inbox.waiter = loop.create_future()
                    try:
                        await inbox.waiter
                    finally:
                        inbox.waiter = None
                batch, inbox.events = inbox.events, []
                last = batch[-1]  # a request's final event is the last one it is ever sent
                done = last.finish is not None or last.error is not None
                yield batch
                if done:
                    return
        finally:
            if not done:
                self.cancel(req)

    # --- scheduler thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._active:
                    self._cv.wait()
                if self._stopping:
                    break
            try:
                self._reap_cancelled()
                self._admit()
                if self._active:
                    self._step()
            except Exception as e:  # never let the scheduler die with requests hanging
                logger.exception("engine step failed")
                self._fail_all(f"generation failed: {e}")
            self._flush()
        for seq in list(self._active.values()):
            self._send(seq.req, Event(token=None, error="server is shutting down"))
            self._release(seq)
        self._flush()

    def _send(self, req: GenerationRequest, ev: Event) -> None:
        """Queue `ev` for its consumer; `_flush` delivers it (at once when `req` has no event loop)."""
        if req.loop is None:
            req.emit(ev)
        else:
            self._outbox.setdefault(req.loop, []).append((req.emit, ev))

    def _flush(self) -> None:
        """Deliver the queued events: one `call_soon_threadsafe` (one wake-up of the HTTP loop) per
        loop, not one per token -- at 16 sequences, 16 self-pipe writes and loop wake-ups per step
        become one. Called after every sampling pass, so no token waits for another decode call."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _admit(self) -> None:
        with self._cv:
            while self._waiting and len(self._active) < self.max_active:
                req = self._waiting.popleft()
                if req.cancelled:
                    self.stats.cancelled += 1
                    continue
                if self.unified:
                    seq = _Sequence(req, self._take_slot(), self.model)
                    self._reuse_prefix(seq)
                else:
                    seq = self._place(req)
                self._active[seq.slot] = seq
                self.stats.requests += 1
                self.stats.prompt_tokens += len(req.prompt) - seq.n_prefilled  # what is left to prefill
            self.stats.queue_size = len(self._waiting)
            self.stats.batch_size = len(self._active)

    def _take_slot(self) -> int:
        """Unified KV: a free slot for a new sequence, an empty one, else the one whose cached
        prefix was used least recently, so the prefixes other requests may still want survive longest."""
        slot = self.cache.parking_slot(sorted(self._free))
        assert slot is not None
        self._free.remove(slot)
        return slot

    def _reuse_prefix(self, seq: _Sequence) -> None:
        """Unified KV: start `seq` from the longest prefix of its prompt some idle slot's KV holds."""
        slot = seq.slot
        source, n = (
            (None, 0)
            if seq.req.prefill_details
            else self.cache.best(seq.req.prompt, [slot, *sorted(self._free)], (slot,))
        )
        if source != slot:
            self.model.clear_seq(slot)
        if source is not None and source != slot:
            self.model.share_prefix(source, slot, n)
        elif source == slot:
            self.model.truncate_seq(slot, n)
        if source is not None:
            self._started_from_cache(seq, n)
        self.cache.drop(slot)

    def _next_to_active(self) -> list[int]:
        """Separate streams: the free slots a new sequence may take. The active slots always form
        one run of consecutive ids (llama.cpp decodes sequences of separate KV streams in one pass
        only when their ids are consecutive; see `_release`), wherever it lies: a new sequence
        takes a slot next to the run, or any slot when nothing runs."""
        if not self._active:
            return sorted(self._free)
        lo, hi = min(self._active), max(self._active)
        return [s for s in (lo - 1, hi + 1) if s in self._free]

    def _place(self, req: GenerationRequest) -> _Sequence:
        """Separate streams: choose `req`'s slot and start it from the longest prefix of its prompt
        that some idle slot's KV holds.

        If that slot is one the sequence may take (`_next_to_active`; any slot on an idle
        server), the sequence starts there in place and no stream is copied: a follow-up request
        (the same prompt again, a chat's next turn) costs a truncation only. Otherwise it takes
        the empty or least recently used of the slots it may take, and the prefix is copied in
        (one stream copy, plus one to park what that slot held if the cache should keep it).
        """
        near = self._next_to_active()
        source, n = (None, 0) if req.prefill_details else self.cache.best(req.prompt, sorted(self._free), near)
        hit = self._host_prefix(req, near) if n < len(req.prompt) - 1 else None
        if hit is not None and hit[1] > n:
            return self._restore(req, *hit)
        slot = source if source in near else self.cache.parking_slot(near)
        assert slot is not None
        self._free.remove(slot)
        seq = _Sequence(req, slot, self.model)
        if source is None:
            self._park(slot, keep=None)
            self.model.clear_seq(slot)
        elif source != slot:
            self._park(slot, keep=source)
            self._copy_stream(source, slot)  # the whole stream; the tail is cut below
        elif self.cache.prompt_cut(slot, n) >= self.cache.min_reuse:
            # In place, but cutting into the prompt another request left here (another chat
            # sharing only the system prompt): that prompt is kept elsewhere first. A cut into
            # generated tokens alone (the same prompt again) is not worth a copy before the first token.
            self._park(slot, keep=None)
        if source is not None:
            self.model.truncate_seq(slot, n)
            self._started_from_cache(seq, n)
        self.cache.drop(slot)
        return seq

    def _host_prefix(self, req: GenerationRequest, near: list[int]) -> tuple[SavedPrefix, int, int] | None:
        """The longest prefix of `req`'s prompt the host cache holds, its length, and the slot
        `_restore` would write (the empty or least recently used one `req` may take); none when
        that slot is part of a queued stream copy (restoring writes its cells at once)."""
        if self.host_cache is None or req.prefill_details:
            return None
        slot = self.cache.parking_slot(near)
        if slot is None or slot in self._copy_sources or slot in self._copy_destinations:
            return None
        saved, n = self.host_cache.best(req.prompt)
        return None if saved is None else (saved, n, slot)

    def _restore(self, req: GenerationRequest, saved: SavedPrefix, n: int, slot: int) -> _Sequence:
        """Start `req` in `slot` from `saved`'s cells. What that slot held goes to the host cache
        rather than another slot: parking would queue a stream copy from the very cells the
        restore overwrites."""
        self._free.remove(slot)
        seq = _Sequence(req, slot, self.model)
        self._save_to_host(slot)
        self.cache.drop(slot)
        if self.model.restore_seq(saved.data, slot):
            self.model.truncate_seq(slot, n)
            self._started_from_cache(seq, n)
            self.stats.host_cache_hits += 1
        else:  # no room in the stream (cannot happen with one sequence per stream): prefill it all
            self.model.clear_seq(slot)
        return seq

    def _save_to_host(self, slot: int, tokens: np.ndarray | None = None, prompt_len: int = 0) -> None:
        """Keep what `slot` holds (the cache's entry, or `tokens` of the sequence leaving it) in
        host memory before it is overwritten, unless a slot or the host cache has it already."""
        if self.host_cache is None or slot in self._copy_destinations:  # its data has not arrived yet
            return
        if tokens is None:
            held = self.cache.held(slot)
            if held is None:
                return
            tokens, prompt_len = held
        if (
            len(tokens) < self.cache.min_reuse
            or self.cache.held_elsewhere(tokens, slot)
            or self.host_cache.covers(tokens)
        ):
            return
        self.host_cache.put(tokens, prompt_len, self.model.save_seq(slot))
        self.stats.host_cache_saves += 1

    def _started_from_cache(self, seq: _Sequence, n: int) -> None:
        seq.n_prefilled = seq.n_past = n
        self.stats.prefix_cache_hits += 1
        self.stats.prefix_cache_tokens += n

    def _park(self, slot: int, keep: int | None) -> None:
        """Separate streams: before a new sequence overwrites (part of) `slot`, keep the prefix it
        caches, so a prompt a later request may repeat is not thrown away.

        With a host cache it goes there: saving copies its cells only, and restoring them later
        costs less than the stream copy that reusing it from another slot would. Without one it
        is copied to an idle slot (an empty one, else the least recently used if older; never
        `keep`, the slot the new sequence copies its prefix from): one copy of the whole stream
        at the next decode. A copy queued for the next decode also blocks saving its destination
        (see `_copy_destinations`): parking into slots that the same burst of arrivals overwrote
        lost both the parked prefix and the one it displaced."""
        if self.host_cache is not None:
            self._save_to_host(slot)
            return
        park = self.cache.park_target(slot, (s for s in self._free if s != keep))
        if park is not None:
            self._copy_stream(slot, park)
            self.cache.move(slot, park)

    def _copy_stream(self, src: int, dst: int, move: bool = False) -> None:
        (self.model.move_seq if move else self.model.copy_seq)(src, dst)
        self.stats.stream_copies += 1
        self._copy_sources.add(src)
        self._copy_destinations.add(dst)

    def _reap_cancelled(self) -> None:
        for seq in [s for s in self._active.values() if s.req.cancelled]:
            self.stats.cancelled += 1
            self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        """Free a sequence's slot, keeping the active slots one run of consecutive ids.

        llama.cpp decodes sequences of separate KV streams together only when their ids are
        consecutive; a hole would split every following step into several smaller ones. A
        sequence at either end of the run leaves no hole; from inside it, the sequence in the
        highest slot moves into the hole (a copy of its KV stream).
        """
        slot = seq.slot
        del self._active[slot]
        tokens = seq.kv_tokens()
        top = max(self._active, default=-1)
        if not self.unified and min(self._active, default=slot) < slot < top:  # unified: no streams
            # The hole gets the top sequence; this one's KV is kept first, in host memory when
            # there is a host cache, else parked in an idle slot (see `_park`).
            worth_keeping = len(tokens) >= self.cache.min_reuse and not self.cache.held_elsewhere(tokens)
            parks = worth_keeping and self.host_cache is None
            park = self.cache.parking_slot(sorted(self._free)) if parks else None
            if park is not None:
                self._copy_stream(slot, park)
                self.cache.hold(park, tokens, seq.n_prefilled)
            elif worth_keeping:
                self._save_to_host(slot, np.asarray(tokens, dtype=np.int32), seq.n_prefilled)
            moved = self._active.pop(top)
            self._copy_stream(top, slot, move=True)
            moved.slot = slot
            self._active[slot] = moved
            self.cache.drop(top)
            slot = top
        else:
            self.cache.hold(slot, tokens, seq.n_prefilled)  # its KV stays where it is
        self._free.add(slot)
        self.stats.batch_size = len(self._active)

    def _fail_all(self, message: str) -> None:
        for seq in list(self._active.values()):
            self.stats.failed += 1
            self._send(seq.req, Event(token=None, error=message))
            self._release(seq)
        for slot in range(self.n_slots):  # after a failed decode no KV stream is trusted
            self.model.clear_seq(slot)
        self.cache.clear()
        if self.host_cache is not None:
            self.host_cache.clear()

    def _step(self) -> None:
        if self.unified:
            self._step_unified()
        else:
            self._step_streams()

    def _step_unified(self) -> None:
        """One llama_decode call: the next token of every running sequence, then prompt chunks
        of admitted ones, shortest remainder first, up to `n_batch` tokens in all.

        Decode tokens always come first, so a long prompt is chunked (`prefill_chunk` tokens per
        step) alongside the running sequences instead of stalling them, and a new prompt joins
        the very next pass instead of waiting behind one: its first token comes out of the same
        pass as everyone else's next token.
        """
        batch = self.model.batch
        batch.clear()
        decodes = []
        for seq in sorted(self._active.values(), key=lambda s: s.slot):
            if seq.next_token is not None:
                decodes.append((seq, batch.add(seq.slot, [seq.next_token], seq.n_past, True)))
                seq.fed.append(seq.next_token)
                seq.n_past += 1
        prefilling = sorted(
            (s for s in self._active.values() if s.next_token is None and s.prefilling),
            key=lambda s: len(s.req.prompt) - s.n_prefilled,
        )
        chunks = []
        for seq in prefilling:
            budget = self.model.n_batch - batch.n
            if budget <= 0:
                break
            i, k, last = self._add_prompt_chunk(seq, budget)
            chunks.append((seq, i, k, last))
        if batch.n == 0:
            return
        self._decode()
        self._emit_step(chunks, decodes)

    def _emit_step(self, chunks: list[tuple[_Sequence, int, int, bool]], decodes: list[tuple[_Sequence, int]]) -> None:
        """Sample after a call that carried prompt chunks (batch index of the last token, length,
        whether it ends the prompt) and decode tokens (batch index). New prompts' first tokens
        go out first: that is their time to first token. Then the highest slot first: with one
        KV stream per sequence, a sequence that finishes at an end of the active run is released
        without moving anything, so when a whole batch ends in one step (requests of the same
        length started together) no stream is copied to close holes that are closing anyway."""
        for seq, i, k, last in chunks:
            if seq.req.prefill_details:
                self._prefill_logprobs(seq, i - k + 1, k)
            if last and not seq.req.cancelled:
                self._emit(seq, self.model.logits(i))
        for seq, i in sorted(decodes, key=lambda d: -d[0].slot):
            if not seq.req.cancelled:
                self._emit(seq, self.model.logits(i))
        self._flush()

    def _step_streams(self) -> None:
        """One scheduling step: each waiting prompt's next chunk in a llama_decode call of its
        own, shortest first, and one call with the next token of every running sequence.

        With one KV stream per sequence, llama.cpp splits a batch that mixes sequences into
        ubatches holding the same number of tokens of each: two prompts of 100 tokens batched
        together become 100 passes of 2 tokens, where alone each is one pass that multiplies
        all its tokens at once. So prompts never share a call, and decodes (one token each) do.
        A prompt's first token is sampled right after its own call: a new request's time to
        first token is its own prefill, not everyone's, and the running sequences still get a
        token every step. `prefill_chunk` and `n_batch` bound the prompt tokens of one step.

        A prompt with one token left (a repeated prompt or a chat turn whose prefix was cached)
        is shaped like a decode token, so it rides the decoding call instead of a call of its
        own: its first token comes out of the running pass, and nothing is split.

        Which goes first, the prompt calls or the decoding call, is what the new requests wait
        for: a rider waits for every prompt call before the decoding call, a prompt for the
        decoding call before it. On a CPU a call costs about its number of tokens, so the
        decoding call goes first when the riders' wait it saves (riders x prompt tokens) is
        larger than the prompts' wait it adds (prompts x decoding tokens). Requests that arrive
        together with prefixes cached (the same prompts again, chat turns) then get their first
        tokens from one short call instead of queueing behind the others' prefills.
        """
        seqs = [self._active[s] for s in sorted(self._active)]
        prefilling = sorted(
            (s for s in seqs if s.next_token is None and s.prefilling), key=lambda s: len(s.req.prompt) - s.n_prefilled
        )
        riders = [s for s in prefilling if len(s.req.prompt) - s.n_prefilled == 1]
        prompts = prefilling[len(riders) :]
        budget = self.model.n_batch - len(riders)
        prompt_tokens = sum(min(len(s.req.prompt) - s.n_prefilled, self.prefill_chunk) for s in prompts)
        decoding = sum(1 for s in seqs if s.next_token is not None) + len(riders)
        if riders and prompts and len(riders) * min(prompt_tokens, budget) > len(prompts) * decoding:
            self._decode_running(seqs, riders)
            self._prefill_prompts([s for s in prompts if self._active.get(s.slot) is s], budget)
            return
        self._prefill_prompts(prompts, budget)
        # A prompt call may have finished (and released) a sequence or moved one to another slot.
        self._decode_running(seqs, riders)

    def _prefill_prompts(self, prompts: list[_Sequence], budget: int) -> None:
        """The next chunk of each prompt, a call each, in order, within `budget` tokens in all."""
        for seq in prompts:
            if budget <= 0:
                break
            budget -= self._prefill_chunk(seq, budget)

    def _decode_running(self, seqs: list[_Sequence], riders: list[_Sequence]) -> None:
        """One call with the next token of every running sequence and the last prompt token of
        each rider (of `seqs`, those still active)."""
        riding = {id(s) for s in riders}
        running = [s for s in seqs if self._active.get(s.slot) is s and (s.next_token is not None or id(s) in riding)]
        if not running:
            return
        batch = self.model.batch
        batch.clear()
        # Slot order: llama.cpp packs consecutive sequence ids into one ubatch.
        decodes, chunks = [], []
        for seq in sorted(running, key=lambda s: s.slot):
            if seq.next_token is None:
                chunks.append((seq, *self._add_prompt_chunk(seq, 1)))
                continue
            decodes.append((seq, batch.add(seq.slot, [seq.next_token], seq.n_past, True)))
            seq.fed.append(seq.next_token)
            seq.n_past += 1
        self._decode()
        self._emit_step(chunks, decodes)

    def _add_prompt_chunk(self, seq: _Sequence, budget: int) -> tuple[int, int, bool]:
        """Add the next chunk of `seq`'s prompt (at most `budget` and `prefill_chunk` tokens) to the
        batch and advance its position; returns the batch index of the chunk's last token, the
        chunk's length, and whether it ends the prompt (its logits then give the first token)."""
        batch = self.model.batch
        start = seq.n_prefilled
        k = min(len(seq.req.prompt) - start, budget, self.prefill_chunk)
        last = start + k == len(seq.req.prompt)
        i = batch.add(seq.slot, seq.req.prompt[start : start + k], start, last)
        if seq.req.prefill_details:
            batch.set_all_logits(i - k + 1, i + 1)
        seq.n_prefilled += k
        seq.n_past = seq.n_prefilled
        return i, k, last

    def _prefill_chunk(self, seq: _Sequence, budget: int) -> int:
        """Decode the next chunk of `seq`'s prompt alone; sample its first token after the last chunk."""
        self.model.batch.clear()
        i, k, last = self._add_prompt_chunk(seq, budget)
        self._decode()
        if seq.req.prefill_details:
            self._prefill_logprobs(seq, i - k + 1, k)
        if last and not seq.req.cancelled:
            self._emit(seq, self.model.logits(i))
            self._flush()  # its first token goes out now, not after the running sequences' call
        return k

    def _decode(self) -> None:
        rc = self.model.decode()
        # llama.cpp ran the queued stream copies first
        self._copy_sources.clear()
        self._copy_destinations.clear()
        self.stats.decode_steps += 1
        self.stats.batch_tokens += self.model.batch.n
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _prefill_logprobs(self, seq: _Sequence, start: int, k: int) -> None:
        """Log-probability of each prompt token given the ones before it (TGI `prefill`)."""
        model = self.model
        prompt = seq.req.prompt
        p0 = seq.n_prefilled - k
        if p0 == 0:
            seq.prefill.append(TokenInfo(prompt[0], model.detokenize([prompt[0]], True), None))
        for j in range(k):
            pos = p0 + j + 1
            if pos >= len(prompt):
                break
            row = model.logits(start + j)
            m = float(row.max())
            lse = m + float(np.log(np.exp(row - m, dtype=np.float64).sum()))
            tok = prompt[pos]
            seq.prefill.append(TokenInfo(tok, model.detokenize([tok], True), float(row[tok]) - lse))

    def _emit(self, seq: _Sequence, logits: np.ndarray) -> None:
        model = self.model
        choice = seq.sampler.sample(logits)
        tok = choice.token
        seq.sampler.accept(tok)
        seq.generated += 1
        self.stats.generated_tokens += 1
        eog = model.is_eog(tok)
        special = model.is_special(tok)
        if eog:
            text = model.piece(tok, special=True).decode("utf-8", errors="replace")
        else:
            text = seq.out.append(model.piece(tok))
        reason: str | None = None
        if eog:
            reason = FINISH_EOS
        elif seq.out.stopped_at is not None:
            reason = FINISH_STOP
        elif seq.generated >= seq.req.max_new_tokens or seq.n_past + 1 > model.n_ctx_per_seq:
            reason = FINISH_LENGTH
        top = [
            TokenInfo(t, model.piece(t, True).decode("utf-8", errors="replace"), lp, model.is_special(t))
            for t, lp in choice.top
        ]
        token = TokenInfo(tok, text, choice.logprob, special)
        if reason is None:
            seq.next_token = tok
            self._send(seq.req, Event(token=token, delta=seq.out.release(), top=top))
            return
        seq.out.flush()
        delta = seq.out.release(finished=True)
        finish = Finish(
            reason=reason,
            generated_text=seq.out.final,
            generated_tokens=seq.generated,
            input_length=len(seq.req.prompt),
            seed=seq.sampler.seed,
            prefill=seq.prefill,
        )
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        self._release(seq)
        self._send(seq.req, Event(token=token, delta=delta, top=top, finish=finish))


class _Inbox:
    """One streamed request's undelivered events, filled on its event loop (by `_deliver`)."""

    __slots__ = ("events", "waiter")

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.waiter: asyncio.Future[None] | None = None

    def put(self, ev: Event) -> None:
        self.events.append(ev)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def _deliver(items: list[tuple[Callable[[Event], None], Event]]) -> None:
    """Runs on the event loop: hand a step's events to their requests' queues, in order."""
    for emit, ev in items:
        emit(ev)
