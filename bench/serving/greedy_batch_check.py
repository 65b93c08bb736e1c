"""Does llama.cpp's own server give the same greedy tokens to a prompt alone and batched?

Our unified-KV layout can change greedy output between a request alone and one batched with
others (at near-ties). This asks whether llama-server, built from the same source, behaves the
same way, so our tests assert what llama.cpp guarantees and no more. For each server layout it
sends the same prompts one at a time, then all at once (staggered a little, as the engine's test
does), 24 greedy tokens each, and reports per prompt whether the tokens match and, where they
differ first, the top-2 log-probability gap of the run alone at that token.

    .venv/bin/python bench/serving/greedy_batch_check.py --llama-server /tmp/llama-build/bin/llama-server
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

PROMPTS = [  # tests/serving/test_serving.py's
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "List three colors:",
    "The meaning of life is",
    "In 1492, Columbus",
]
# llama-server's layouts, then ours (server "dstack"): --kv-layout per-sequence / unified.
LAYOUTS = {
    "llama-server -np 1": ["-np", "1"],
    "llama-server -np 16 (a KV stream per slot)": ["-np", "16"],
    "llama-server -np 16 --kv-unified": ["-np", "16", "--kv-unified"],
    "llama-server -np 16 --kv-unified, q8_0 KV, flash attention (dstack's KV settings)": [
        "-np",
        "16",
        "--kv-unified",
        "-ctk",
        "q8_0",
        "-ctv",
        "q8_0",
        "-fa",
        "on",
    ],
    "dstack --kv-layout per-sequence": ["--kv-layout", "per-sequence"],
    "dstack --kv-layout unified": ["--kv-layout", "unified"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Token = tuple[int, float]  # greedy token id, top-2 log-probability gap


CACHE_PROMPT = False  # llama-server's prompt cache (--cache-prompt): reuse a slot's cached prefix


def complete_llama(url: str, prompt: str) -> list[Token]:
    body = {"prompt": prompt, "n_predict": 24, "temperature": 0, "n_probs": 2, "cache_prompt": CACHE_PROMPT}
    r = httpx.post(url + "/completion", json=body, timeout=300)
    r.raise_for_status()
    out = r.json()["completion_probabilities"]
    return [(t["id"], t["top_logprobs"][0]["logprob"] - t["top_logprobs"][1]["logprob"]) for t in out]


def complete_dstack(url: str, prompt: str) -> list[Token]:
    params = {"max_new_tokens": 24, "details": True, "top_n_tokens": 2}
    r = httpx.post(url + "/generate", json={"inputs": prompt, "parameters": params}, timeout=300)
    r.raise_for_status()
    d = r.json()["details"]
    return [
        (t["id"], top[0]["logprob"] - top[1]["logprob"]) for t, top in zip(d["tokens"], d["top_tokens"], strict=True)
    ]


def run(binary: str, gguf: str, flags: list[str], threads: int) -> list[tuple[list[Token], list[Token]]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if flags[0] == "--kv-layout":
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        cmd = [sys.executable, "-m", "dstack.serving", "--model", gguf, "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--threads", str(threads), "--max-batch-size", "8", *flags]
        complete = complete_dstack
    else:
        env = None
        cmd = [binary, "-m", gguf, "--port", str(port), "-c", "32768", "-t", str(threads), "--no-webui", *flags]
        complete = complete_llama
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        alone = [complete(url, p) for p in PROMPTS]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = []
            for p in PROMPTS:
                futures.append(pool.submit(complete, url, p))
                time.sleep(0.03)
            batched = [f.result() for f in futures]
        return list(zip(alone, batched, strict=True))
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-server", default="/tmp/llama-build/bin/llama-server")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", default="", help="run only the layouts whose name contains this")
    ap.add_argument("--cache-prompt", action="store_true", help="let llama-server reuse cached prompts")
    a = ap.parse_args()
    global CACHE_PROMPT
    CACHE_PROMPT = a.cache_prompt
    from dstack.serving.models import builtin_model_path

    gguf = str(builtin_model_path())
    for name, flags in LAYOUTS.items():
        if a.only not in name:
            continue
        for rep in range(a.repeat):
            diverged = []
            for k, (alone, batched) in enumerate(run(a.llama_server, gguf, flags, a.threads)):
                first = next((i for i, (x, y) in enumerate(zip(alone, batched, strict=False)) if x[0] != y[0]), None)
                if first is not None:
                    diverged.append(f"prompt {k} at token {first} (gap alone {alone[first][1]:.3f})")
            print(f"{name} rep {rep}: {len(PROMPTS) - len(diverged)}/{len(PROMPTS)} identical; " + "; ".join(diverged))
    return 0


if __name__ == "__main__":
    sys.exit(main())
