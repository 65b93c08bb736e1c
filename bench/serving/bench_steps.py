"""Engine-only benchmark: drives `dstack.serving.engine.Engine` directly (no HTTP).

For each concurrency level c it submits c greedy requests of --new-tokens tokens at once and
reports aggregate tokens/s plus the per-step cost split into `llama_decode` time and Python time
(batch building, sampling, bookkeeping), and the mean decode time per step by batch size.

    PYTHONPATH=src .venv/bin/python bench/serving/bench_steps.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from dstack.serving.engine import Engine, GenerationRequest  # noqa: E402
from dstack.serving.llama import LlamaModel  # noqa: E402
from dstack.serving.models import builtin_model_path  # noqa: E402
from dstack.serving.sampling import SamplingParams  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import PROMPTS  # noqa: E402  (the same prompts as the HTTP benchmark)


def gguf_path() -> str:
    return str(builtin_model_path())


class Timed:
    """Wraps model.decode and engine._step to split each step into decode and Python time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.decode_s = 0.0
        self.decode_cpu = 0.0
        self.step_s = 0.0
        self.steps = 0
        self.by_n: dict[int, list[float]] = defaultdict(list)
        model = engine.model
        orig_decode = model.decode
        orig_step = engine._step

        def decode() -> int:
            n = model.batch.n
            t = time.perf_counter()
            c0 = time.thread_time()
            rc = orig_decode()
            self.decode_cpu += time.thread_time() - c0
            dt = time.perf_counter() - t
            self.decode_s += dt
            self.by_n[n].append(dt)
            return rc

        def step() -> None:
            t = time.perf_counter()
            orig_step()
            self.step_s += time.perf_counter() - t
            self.steps += 1

        model.decode = decode  # type: ignore[method-assign]
        engine._step = step  # type: ignore[method-assign]

    def reset(self) -> None:
        self.decode_s = self.step_s = self.decode_cpu = 0.0
        self.steps = 0
        self.by_n.clear()


def run_level(engine: Engine, c: int, new_tokens: int, logprobs: bool = False) -> tuple[float, int, list[str]]:
    done = threading.Semaphore(0)
    texts: list[str] = [""] * c

    def make_emit(k: int):  # type: ignore[no-untyped-def]
        def emit(ev) -> None:  # type: ignore[no-untyped-def]
            if ev.finish is not None or ev.error is not None:
                if ev.finish is not None:
                    texts[k] = ev.finish.generated_text
                done.release()

        return emit

    model = engine.model
    reqs = [
        GenerationRequest(
            prompt=model.tokenize(PROMPTS[k % len(PROMPTS)]),
            params=SamplingParams(logprobs=logprobs),
            max_new_tokens=new_tokens,
            emit=make_emit(k),
        )
        for k in range(c)
    ]
    gen0 = engine.stats.generated_tokens
    t = time.perf_counter()
    for r in reqs:
        engine.submit(r)
    for _ in range(c):
        done.acquire()
    dt = time.perf_counter() - t
    return dt, engine.stats.generated_tokens - gen0, texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--kv-type", default="q8_0")
    ap.add_argument("--no-flash-attn", action="store_true")
    ap.add_argument("--kv-unified", action="store_true")
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument(
        "--logprobs",
        action="store_true",
        help="score every token (TGI API); the HTTP benchmark's OpenAI requests do not",
    )
    a = ap.parse_args()
    model = LlamaModel(
        Path(gguf_path()),
        n_ctx_per_seq=a.ctx,
        n_seq_max=16,
        n_batch=a.n_batch,
        threads=a.threads,
        kv_type=a.kv_type,
        flash_attn=not a.no_flash_attn,
        kv_unified=a.kv_unified,
    )
    engine = Engine(model)
    timed = Timed(engine)
    engine.start()
    run_level(engine, 2, 8)  # warm-up
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print(f"threads={a.threads} kv={a.kv_type} fa={not a.no_flash_attn} unified={a.kv_unified}")
    ref: dict[int, list[str]] = {}
    for c in [int(x) for x in a.levels.split(",")]:
        for rep in range(a.reps):
            timed.reset()
            dt, n, texts = run_level(engine, c, a.new_tokens, a.logprobs)
            py = timed.step_s - timed.decode_s
            per_n = " ".join(
                f"b{k}:{1e3 * statistics.mean(v):.1f}ms(x{len(v)})"
                for k, v in sorted(timed.by_n.items())
                if len(v) >= 3
            )
            print(
                f"c={c:2d} rep{rep}: {n / dt:6.1f} tok/s  wall {dt:5.2f}s  steps {timed.steps}  "
                f"decode {1e3 * timed.decode_s / max(1, timed.steps):5.1f}ms/step  "
                f"(caller-thread cpu {1e3 * timed.decode_cpu / max(1, timed.steps):5.1f}ms)  "
                f"python {1e3 * py / max(1, timed.steps):4.2f}ms/step  "
                f"outside-step {1e3 * (dt - timed.step_s) / max(1, timed.steps):4.2f}ms/step | {per_n}",
                flush=True,
            )
            ref.setdefault(c, texts)
    engine.stop()
    model.close()


if __name__ == "__main__":
    main()
