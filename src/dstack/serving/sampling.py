"""Per-request token selection over one logits row, in numpy.

Done in numpy rather than llama.cpp's sampler chain so that one decode call can serve sequences
with different parameters, each with its own RNG, and so greedy is a plain argmax that depends
only on the logits row.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

# Below this many candidates a top-p cut is computed on a partial sort (the usual case: the
# nucleus of a trained model holds far fewer tokens than the vocabulary).
_NUCLEUS_PREFETCH = 1024


@dataclass
class SamplingParams:
    """TGI generation parameters that affect which token is picked."""

    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    top_n_tokens: int = 0
    # Whether the caller reads each token's log-probability. The TGI API always returns it; an
    # OpenAI request without `logprobs` does not, and skipping it saves a pass over the
    # vocabulary per token (~30us: half the scheduler's Python time per sequence and step).
    logprobs: bool = True

    @property
    def sampling(self) -> bool:
        """TGI semantics: sample when asked, or when any warper would change the distribution."""
        return bool(
            self.do_sample
            or (self.temperature is not None and self.temperature != 1.0)
            or (self.top_k is not None and self.top_k > 0)
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
        )


@dataclass
class Choice:
    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


def _logsumexp(x: np.ndarray, m: float | None = None) -> float:
    """log(sum(exp(x))) in float32: one pass over the vocabulary per token, ~30us."""
    if m is None:
        m = float(x.max())
    return m + float(np.log(np.exp(x - np.float32(m)).sum(dtype=np.float64)))


class Sampler:
    """Selects tokens for one sequence; holds its RNG and the counts penalties need."""

    def __init__(self, params: SamplingParams, n_vocab: int, prompt_tokens: list[int]) -> None:
        self.params = params
        self.sampling = params.sampling
        self.seed: int | None = None
        self.rng: np.random.Generator | None = None
        if self.sampling:
            self.seed = params.seed if params.seed is not None else random.getrandbits(63)
            self.rng = np.random.default_rng(self.seed)
        self._rep = params.repetition_penalty if params.repetition_penalty not in (None, 1.0) else None
        self._freq = params.frequency_penalty if params.frequency_penalty not in (None, 0.0) else None
        self._pres = params.presence_penalty if params.presence_penalty not in (None, 0.0) else None
        self._seen: np.ndarray | None = None
        self._counts: np.ndarray | None = None
        if self._rep is not None:
            self._seen = np.zeros(n_vocab, dtype=bool)
            if prompt_tokens:
                self._seen[np.asarray(prompt_tokens)] = True
        if self._freq is not None or self._pres is not None:
            self._counts = np.zeros(n_vocab, dtype=np.float32)

    def accept(self, token: int) -> None:
        """Record a generated token for the penalties."""
        if self._seen is not None:
            self._seen[token] = True
        if self._counts is not None:
            self._counts[token] += 1.0

    def _penalised(self, logits: np.ndarray) -> np.ndarray:
        if self._seen is None and self._counts is None:
            return logits
        x = logits.copy()
        if self._seen is not None:
            # HF/TGI repetition penalty: make every seen token less likely, whatever its sign
            idx = np.flatnonzero(self._seen)
            v = x[idx]
            x[idx] = np.where(v < 0, v * self._rep, v / self._rep)
        if self._freq is not None:
            x -= np.float32(self._freq) * self._counts
        if self._pres is not None:
            x -= np.float32(self._pres) * (self._counts > 0)
        return x

    def sample(self, logits: np.ndarray) -> Choice:
        p = self.params
        x = self._penalised(logits)
        scored = p.logprobs or p.top_n_tokens > 0
        if not self.sampling:
            tok = int(np.argmax(x))
            if not scored:
                return Choice(tok, None)
            lse = _logsumexp(x, float(x[tok]))
            return Choice(tok, float(x[tok]) - lse, self._top(x, lse))
        if p.temperature is not None and p.temperature != 1.0:
            x = x / np.float32(p.temperature)
        tok = self._draw(x)
        if not scored:
            return Choice(tok, None)
        lse = _logsumexp(x)
        return Choice(tok, float(x[tok]) - lse, self._top(x, lse))

    def _top(self, x: np.ndarray, lse: float) -> list[tuple[int, float]]:
        n = self.params.top_n_tokens
        if not n:
            return []
        idx = np.argpartition(-x, n)[:n] if n < x.shape[0] else np.arange(x.shape[0])
        idx = idx[np.argsort(-x[idx], kind="stable")]
        return [(int(i), float(x[i]) - lse) for i in idx]

    def _draw(self, x: np.ndarray) -> int:
        p = self.params
        assert self.rng is not None
        n = x.shape[0]
        top_k = p.top_k if p.top_k and p.top_k < n else None
        top_p = p.top_p if p.top_p is not None and p.top_p < 1.0 else None
        typical_p = p.typical_p if p.typical_p is not None and p.typical_p < 1.0 else None
        if top_k is None and top_p is None and typical_p is None:
            probs = np.exp(x - x.max(), dtype=np.float64)
            return self._pick(np.arange(n), probs)
        if top_k is not None:
            cand = np.argpartition(-x, top_k - 1)[:top_k]
        elif top_p is not None and typical_p is None and n > _NUCLEUS_PREFETCH:
            full = np.exp(x - x.max(), dtype=np.float64)
            full /= full.sum()
            cand = np.argpartition(-x, _NUCLEUS_PREFETCH - 1)[:_NUCLEUS_PREFETCH]
            if full[cand].sum() < top_p:  # a flat distribution: fall back to the whole vocabulary
                cand = np.arange(n)
        else:
            cand = np.arange(n)
        cand = cand[np.argsort(-x[cand], kind="stable")]
        probs = np.exp(x[cand] - x[cand[0]], dtype=np.float64)
        probs /= probs.sum()
        if top_p is not None:
            keep = int(np.searchsorted(np.cumsum(probs), top_p, side="left")) + 1
            cand, probs = cand[:keep], probs[:keep]
            probs = probs / probs.sum()
        if typical_p is not None:
            logp = np.log(probs)
            entropy = -float((probs * logp).sum())
            order = np.argsort(np.abs(-logp - entropy), kind="stable")
            keep = int(np.searchsorted(np.cumsum(probs[order]), typical_p, side="left")) + 1
            sel = order[:keep]
            cand, probs = cand[sel], probs[sel]
        return self._pick(cand, probs)

    def _pick(self, cand: np.ndarray, weights: np.ndarray) -> int:
        assert self.rng is not None
        cdf = np.cumsum(weights)
        r = self.rng.random() * cdf[-1]
        i = int(np.searchsorted(cdf, r, side="right"))
        return int(cand[min(i, len(cand) - 1)])
