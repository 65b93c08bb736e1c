"""Sampler: skipping log-probabilities (OpenAI requests that do not ask for them) changes no token."""

from __future__ import annotations

import numpy as np

from dstack.serving.sampling import Sampler, SamplingParams


def _rows(n: int = 20, vocab: int = 4096) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal(vocab).astype(np.float32) * 3 for _ in range(n)]


def test_unscored_greedy_and_seeded_sampling_pick_the_same_tokens() -> None:
    for params in (
        dict(),
        dict(do_sample=True, temperature=0.7, top_p=0.9, seed=3),
        dict(do_sample=True, top_k=20, seed=5, repetition_penalty=1.3),
    ):
        scored = Sampler(SamplingParams(**params), 4096, [1, 2, 3])
        unscored = Sampler(SamplingParams(logprobs=False, **params), 4096, [1, 2, 3])
        for row in _rows():
            a, b = scored.sample(row), unscored.sample(row)
            assert a.token == b.token
            assert a.logprob is not None and a.logprob <= 0
            assert b.logprob is None
            scored.accept(a.token)
            unscored.accept(b.token)


def test_top_tokens_are_still_scored_without_logprobs() -> None:
    s = Sampler(SamplingParams(logprobs=False, top_n_tokens=3), 4096, [])
    row = _rows(1)[0]
    choice = s.sample(row)
    assert choice.token == int(np.argmax(row))
    assert choice.logprob is not None and len(choice.top) == 3
    assert choice.top[0][0] == choice.token
