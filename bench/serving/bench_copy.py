"""What a KV stream copy costs against the prompt tokens it saves (per-sequence KV layout).

With one KV stream per sequence, reusing a prefix cached in another slot (or parking a cached
prefix before its slot is overwritten) copies the whole stream: llama.cpp copies every cell of
it, used or not. This times, on the engine's own context settings, a 1-token llama_decode with and
without one queued stream copy before it, and llama_decode of prompts of k tokens, so the
prefix cache's `MIN_REUSE_TOKENS` can be set where a copy is cheaper than the prefill it saves.

    PYTHONPATH=src .venv/bin/python bench/serving/bench_copy.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from dstack.serving.llama import LlamaModel  # noqa: E402
from dstack.serving.models import builtin_model_path  # noqa: E402


def timed_decode(model: LlamaModel, seq: int, tokens: list[int], pos0: int) -> float:
    model.batch.clear()
    model.batch.add(seq, tokens, pos0, True)
    t = time.perf_counter()
    rc = model.decode()
    dt = time.perf_counter() - t
    assert rc == 0, rc
    return dt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048, help="context per sequence (the stream's size)")
    ap.add_argument("--slots", type=int, default=20, help="KV streams (max batch 16 + 4 prefix-cache slots)")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    model = LlamaModel(Path(builtin_model_path()), n_ctx_per_seq=a.ctx, n_seq_max=a.slots, threads=a.threads)
    words = model.tokenize("The history of the Roman Empire begins with a small town on the banks of a river " * 2)
    base = words[:16]
    model.clear_seq(0)
    timed_decode(model, 0, base, 0)  # slot 0 holds 16 tokens
    plain, with_copy = [], []
    for r in range(a.reps):
        for seq in (1, 2):
            model.clear_seq(seq)
        plain.append(timed_decode(model, 1, [words[16 + r % 8]], 0))
        model.copy_seq(0, 2)  # queued: runs inside the next llama_decode
        with_copy.append(timed_decode(model, 2, [words[16 + r % 8]], 16))
    prefill = {}
    for k in (1, 2, 4, 8, 16):
        ts = []
        for _ in range(max(3, a.reps // 2)):
            model.clear_seq(3)
            ts.append(timed_decode(model, 3, words[:k], 0))
        prefill[k] = statistics.median(ts) * 1000
    copy_ms = (statistics.median(with_copy) - statistics.median(plain)) * 1000
    print(f"CPU: {os.cpu_count()} CPUs, {a.threads} threads, load {os.getloadavg()[0]:.2f}")
    print(
        f"1-token decode {statistics.median(plain) * 1000:.2f} ms; with a stream copy before it "
        f"{statistics.median(with_copy) * 1000:.2f} ms: a copy of {a.ctx} cells costs {copy_ms:.2f} ms"
    )
    print("prompt of k tokens, one llama_decode (ms): " + ", ".join(f"k={k}: {v:.1f}" for k, v in prefill.items()))
    saved = {k: prefill[k] - prefill[1] for k in prefill if k > 1}
    print("saved by reusing k-1 tokens (ms): " + ", ".join(f"k={k}: {v:.1f}" for k, v in saved.items()))
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
