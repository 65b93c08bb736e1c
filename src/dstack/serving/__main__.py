"""`python -m dstack.serving --model ...`: serve one GGUF model over the TGI and OpenAI APIs."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Optional

from dstack.serving.models import ModelError, check_quantize, BUILTIN_MODEL_ID, _BUILTIN_NAMES
from dstack.serving.service import ServeConfig, Service


def parse_args(argv: Optional[list[str]] = None) -> ServeConfig:
    ap = argparse.ArgumentParser(
        prog="python -m dstack.serving",
        description="Serve a GGUF model with continuous batching behind the TGI and OpenAI APIs.",
    )
    ap.add_argument("--model", required=True, help="a .gguf file, a directory, a Hugging Face repo id, or SmolLM2-135M-Instruct")
    ap.add_argument("--quantize", default=None, help="GGUF variant to pick from a repo (e.g. Q4_K_M)")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-concurrent-requests", type=int, default=16, help="in-flight requests before 429")
    ap.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together")
    ap.add_argument("--ctx-size", type=int, default=2048, help="max tokens per request (prompt + generated)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    ap.add_argument("--prefill-chunk", type=int, default=256, help="max prompt tokens per sequence per step")
    ap.add_argument("--kv-cache-type", choices=["q8_0", "f16"], default="q8_0",
                    help="KV cache type; q8_0 keeps greedy results identical with and without batching")
    ap.add_argument("--model-id", default=None, help="name reported by /info and /v1/models")
    ap.add_argument("--verbose", action="store_true", help="show llama.cpp logs")
    a = ap.parse_args(argv)
    for name in ("max_concurrent_requests", "max_batch_size", "ctx_size", "prefill_chunk"):
        if getattr(a, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
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
        kv_cache_type=a.kv_cache_type,
        model_id=model_id,
        verbose=a.verbose,
    )


def main(argv: Optional[list[str]] = None) -> int:
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
