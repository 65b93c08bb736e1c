"""More conversations than KV slots: what the host-memory prefix cache (`--host-cache-mib`) buys.

`--conversations` chats (default 32: more than dstack's 16 decoding + 4 cache slots and
llama-server's 16 slots) take turns one request at a time, round-robin: turn 1 of every chat, then
turn 2 of every chat, and so on. By the time a chat's next turn comes, 31 other prompts have gone
through the slots, so its earlier turns are in a slot only if the server kept them elsewhere.
Reports TTFT p50 of the first turns (nothing cached) and of the later ones, per server, in the same
run: dstack, dstack without the host cache (`dstack-nohost`), llama-server (its own host-RAM prompt
cache, `--cache-ram`, on by default).

    PYTHONPATH=src .venv/bin/python bench/serving/bench_many_chats.py --llama-server /tmp/llama-build/bin/llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import ROOT, SYSTEM_PROMPT, USER_TURNS, chat_turn, cpu_description, dstack_repacks, start  # noqa: E402


async def round_robin(url: str, conversations: int, turns: int, n: int) -> list[list[float]]:
    """TTFT of each turn of each conversation, [turn][conversation]."""
    chats = [[{"role": "system", "content": SYSTEM_PROMPT + f" (Shop {k}.)"}] for k in range(conversations)]
    by_turn: list[list[float]] = []
    async with httpx.AsyncClient(timeout=600) as client:
        for turn in range(turns):
            ttfts = []
            for messages in chats:
                messages.append({"role": "user", "content": USER_TURNS[turn % len(USER_TURNS)]})
                answer, ttft = await chat_turn(client, url, messages, n)
                messages.append({"role": "assistant", "content": answer})
                ttfts.append(ttft)
            by_turn.append(ttfts)
    return by_turn


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--servers", default="dstack,dstack-nohost,llama-server")
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--llama-server", default=shutil.which("llama-server") or "/tmp/llama-build/bin/llama-server")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from dstack.serving.models import resolve_model

    gguf = str(resolve_model("SmolLM2-135M-Instruct"))
    names = [s for s in a.servers.split(",") if s]
    if "llama-server" in names and not Path(a.llama_server).exists():
        print(f"llama-server binary not found ({a.llama_server}); skipping it")
        names.remove("llama-server")
    repack = dstack_repacks()
    results: dict[str, tuple[float, float]] = {}
    for name in names:  # one at a time: each has the machine to itself
        srv = start(name, gguf, a.threads, a.llama_server, a.ctx, repack)
        try:
            srv.wait_ready()
            by_turn = asyncio.run(round_robin(srv.url, a.conversations, a.turns, a.new_tokens))
        finally:
            srv.stop()
        first = statistics.median(by_turn[0]) * 1000
        later = statistics.median([t for ts in by_turn[1:] for t in ts]) * 1000
        results[name] = (first, later)
        print(
            f"{name:15s} turn 1 TTFT p50 {first:7.1f} ms, later turns {later:7.1f} ms  load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
    print(
        f"\nCPU: {cpu_description()}; {a.conversations} conversations round-robin, {a.turns} turns, {a.new_tokens} new tokens a turn"
    )
    print("| server | turn 1 TTFT p50 ms | later turns TTFT p50 ms | later / first |\n|---|---:|---:|---:|")
    for name, (first, later) in results.items():
        print(f"| {name} | {first:.0f} | {later:.0f} | {later / first:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
