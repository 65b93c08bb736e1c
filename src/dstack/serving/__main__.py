"""`python -m dstack.serving --model ...`: serve one GGUF model over the TGI and OpenAI APIs."""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys

from dstack.serving.models import _BUILTIN_NAMES, BUILTIN_MODEL_ID, ModelError, check_quantize
from dstack.serving.service import ServeConfig, Service


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    ap = argparse.ArgumentParser(
        prog="python -m dstack.serving",
        description="Serve a GGUF model with continuous batching behind the TGI and OpenAI APIs.",
    )
    ap.add_argument(
        "--model", required=True, help="a .gguf file, a directory, a Hugging Face repo id, or SmolLM2-135M-Instruct"
    )
    ap.add_argument("--quantize", default=None, help="GGUF variant to pick from a repo (e.g. Q4_K_M)")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-concurrent-requests", type=int, default=16, help="in-flight requests before 429")
    ap.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together")
    ap.add_argument("--ctx-size", type=int, default=2048, help="max tokens per request (prompt + generated)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    ap.add_argument("--prefill-chunk", type=int, default=256, help="max prompt tokens per sequence per step")
    ap.add_argument(
        "--prefix-cache-slots",
        type=int,
        default=4,
        help="extra KV streams that keep finished requests' prompts for prefix reuse (0: only idle decoding slots)",
    )
    ap.add_argument(
        "--host-cache-mib",
        type=int,
        default=None,
        help="host memory for prompt prefixes no KV slot holds any more, restored instead of prefilled "
        "(default 512 with the per-sequence KV layout, 0 with unified, which it does not work with; 0: off)",
    )
    ap.add_argument(
        "--kv-cache-type",
        choices=["q8_0", "f16"],
        default="q8_0",
        help="KV cache type; q8_0 keeps greedy results identical with and without batching",
    )
    ap.add_argument(
        "--kv-layout",
        choices=["unified", "per-sequence"],
        default="per-sequence",
        help="per-sequence: one KV stream each, exact, greedy output identical alone and batched; unified: "
        "one KV buffer, prompts and decodes in one pass, any shared prefix reused, but not exact (after "
        "other requests finish, llama.cpp's logits for a running one stray by up to 1.6); "
        "bench/serving/RESULTS-serving.md compares them",
    )
    ap.add_argument(
        "--weight-repack",
        choices=["auto", "on", "off"],
        default=os.environ.get("DSTACK_SERVING_REPACK", "auto"),
        help="let llama.cpp repack weights for faster CPU kernels; auto: not where the "
        "AMX path is present (it crashes there), see dstack/serving/llama.py",
    )
    ap.add_argument("--model-id", default=None, help="name reported by /info and /v1/models")
    ap.add_argument("--verbose", action="store_true", help="show llama.cpp logs")
    a = ap.parse_args(argv)
    for name in ("max_concurrent_requests", "max_batch_size", "ctx_size", "prefill_chunk"):
        if getattr(a, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= a.prefix_cache_slots <= 64 or a.max_batch_size + a.prefix_cache_slots > 256:
        ap.error("--prefix-cache-slots must be 0..64, and with --max-batch-size at most 256 (llama.cpp's limit)")
    if a.host_cache_mib is None:
        a.host_cache_mib = 0 if a.kv_layout == "unified" else 512
    if not 0 <= a.host_cache_mib <= 65536:
        ap.error("--host-cache-mib must be 0..65536")
    if a.host_cache_mib and a.kv_layout == "unified":
        ap.error("--host-cache-mib works with --kv-layout per-sequence only (unified shares prefixes between cells)")
    model_id = a.model_id or (BUILTIN_MODEL_ID if a.model.lower() in _BUILTIN_NAMES else a.model)
    return ServeConfig(
        model=a.model,
        quantize=a.quantize,
        host=a.host,
        port=a.port,
        max_concurrent_requests=a.max_concurrent_requests,
        max_batch_size=a.max_batch_size,
        ctx_size=a.ctx_size,
        threads=a.threads,
        prefill_chunk=a.prefill_chunk,
        prefix_cache_slots=a.prefix_cache_slots,
        host_cache_mib=a.host_cache_mib,
        kv_cache_type=a.kv_cache_type,
        kv_unified=a.kv_layout == "unified",
        weight_repack=a.weight_repack,
        model_id=model_id,
        verbose=a.verbose,
    )


def main(argv: list[str] | None = None) -> int:
    # A crash inside llama.cpp (a signal, not an exception) then leaves the Python stack of every
    # thread in the job's log, next to the "engine crashed: SIGSEGV" the server reports.
    faulthandler.enable()
    config = parse_args(argv)
    try:
        check_quantize(config.quantize)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from dstack.serving.app import create_app

    service = Service(config)
    failed = {"value": False}

    def stop_server() -> None:
        failed["value"] = True
        os.kill(os.getpid(), signal.SIGTERM)

    service.on_load_failed = stop_server  # type: ignore[method-assign]
    app = create_app(service)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning" if not config.verbose else "info")
    return 1 if failed["value"] else 0


if __name__ == "__main__":
    sys.exit(main())
