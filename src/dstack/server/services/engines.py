"""Which engine serves an `engine:` job, decided when the host is known (at provisioning).

- the job got NVIDIA GPUs and the host's agent runs containers: TGI's image, started by its own
  launcher (`--model-id`, `--port`, ...);
- the job got GPUs, no containers: vLLM, pip-installed into a shared venv, behind dstack's TGI
  bridge (`python -m dstack.serving.tgi_bridge`) so the job still answers the TGI API
  (`/generate`, `/generate_stream`, `/info`, `/health`) that services with an engine declare;
  vLLM's own OpenAI routes (`/v1/...`) pass through;
- no GPU, or GGUF weights (a `.gguf` path, a GGUF repository, a GGUF `quantize` type): the
  built-in llama.cpp engine, i.e. the submission is left as it is.

Everything here is pure: it maps a configuration and facts about the host to submission fields.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

from dstack.core.models.configurations import BaseRunConfiguration, EngineSpec
from dstack.core.quantize import GPU_QUANTIZE, TGI_QUANTIZE, VLLM_QUANTIZE

TGI_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.5"
VLLM_VERSION = "0.33.0"
BUILTIN_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the safetensors original of the built-in GGUF
_BUILTIN_NAMES = {"smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"}
HF_TOKEN_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

# EngineSpec.dtype spellings -> each engine's own name (None: the engine's default).
_DTYPES = {
    "auto": None,
    "gguf": None,
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}
_TGI_DTYPES = {"float16", "bfloat16"}


class EngineError(ValueError):
    """The engine settings cannot be served by the engine this host gets; the message says why,
    `field` which setting."""

    def __init__(self, msg: str, field: str) -> None:
        super().__init__(msg)
        self.field = field


def choose_engine(engine: EngineSpec, gpus: list[int], containers: bool) -> str:
    """ "tgi", "vllm" or "builtin" for this engine on a host with these GPUs reserved.

    TGI's image where containers run, unless the weight format is one only vLLM loads (hqq)."""
    if not gpus or is_gguf(engine):
        return "builtin"
    quant = (engine.quantize or "").lower()
    if containers and (not quant or quant in TGI_QUANTIZE):
        return "tgi"
    return "vllm"


def check_engine_settings(engine: EngineSpec, gpu_requested: bool) -> None:
    """Refuse, before anything starts, settings no engine the run can get would serve.

    Without `resources.gpu` the run lands on the built-in llama.cpp engine, which loads GGUF
    weights only; with a GPU, GPU weight formats go to TGI or vLLM, but never with GGUF files."""
    quant = (engine.quantize or "").lower()
    if quant in GPU_QUANTIZE:
        if _names_gguf(engine.model_name):
            raise EngineError(
                f"quantize {engine.quantize} is a GPU weight format, but {engine.model_name} is GGUF, "
                "which only the built-in engine loads: use a GGUF quantization type (e.g. Q4_K_M)",
                "engine.quantize",
            )
        if not gpu_requested:
            raise EngineError(
                f"quantize {engine.quantize} is a GPU weight format; without a GPU the built-in engine runs GGUF "
                "models on llama.cpp. Use a GGUF quantization type (e.g. Q4_K_M, Q8_0), or ask for a GPU "
                f"(resources: gpu: 1) to serve {engine.quantize} weights on TGI or vLLM",
                "engine.quantize",
            )
    if engine.dtype:
        _dtype(engine, None, "any engine")  # unknown spellings
        if engine.dtype.lower() not in ("auto", "gguf") and not gpu_requested:
            raise EngineError(
                f"dtype {engine.dtype} needs a GPU engine; the built-in CPU engine serves GGUF "
                "weights as stored (drop dtype, or ask for a GPU in resources)",
                "engine.dtype",
            )


def is_gguf(engine: EngineSpec) -> bool:
    """GGUF weights, which only the built-in (llama.cpp) engine loads."""
    name = engine.model_name.strip()
    gguf_quant = engine.quantize is not None and engine.quantize.lower() not in GPU_QUANTIZE
    if name.lower() in _BUILTIN_NAMES:  # also published as safetensors: GGUF only when asked
        return gguf_quant
    return _names_gguf(name) or gguf_quant


def _names_gguf(model_name: str) -> bool:
    """A local path, a `.gguf` file or a GGUF repository (by its name)."""
    name = model_name.strip()
    local = name.startswith(("/", "./", "../", "~")) or name.lower().endswith(".gguf")
    return local or "gguf" in name.lower()


def hf_model_id(engine: EngineSpec) -> str:
    name = engine.model_name.strip()
    return BUILTIN_HF_ID if name.lower() in _BUILTIN_NAMES else name


def engine_submission(
    conf: BaseRunConfiguration, gpus: list[int], agent: Mapping[str, Any], env: Mapping[str, str]
) -> dict[str, Any]:
    """The agent-submission fields that replace the built-in engine's on this host ({}: keep it).

    `agent` is the instance's stored agent info (`containers`: whether it runs images); `env` the
    job's environment as built so far.
    """
    engine: EngineSpec | None = getattr(conf, "engine", None)
    if engine is None:
        return {}
    kind = choose_engine(engine, gpus, bool(agent.get("containers")))
    if kind == "tgi":
        return tgi_submission(engine, env)
    if kind == "vllm":
        return vllm_submission(engine, env)
    return {}


def _env_with_token(env: Mapping[str, str], kind: str) -> dict[str, str]:
    """The job env plus DSTACK_ENGINE, with a Hugging Face token under both names engines read."""
    out = dict(env)
    token = next((env[n] for n in HF_TOKEN_NAMES if env.get(n)), None)
    if token:
        for n in HF_TOKEN_NAMES:
            out.setdefault(n, token)
    out["DSTACK_ENGINE"] = kind
    return out


def _dtype(engine: EngineSpec, allowed: set[str] | None, engine_name: str) -> str | None:
    if not engine.dtype:
        return None
    key = engine.dtype.lower()
    if key not in _DTYPES:
        raise EngineError(
            f"engine.dtype {engine.dtype!r} is not known; use float16, bfloat16, float32 or auto", "engine.dtype"
        )
    value = _DTYPES[key]
    if value is not None and allowed is not None and value not in allowed:
        raise EngineError(
            f"engine.dtype {engine.dtype} is not supported by {engine_name} (use one of {', '.join(sorted(allowed))})",
            "engine.dtype",
        )
    return value


def _quantize(engine: EngineSpec, table: Mapping[str, str], engine_name: str) -> str | None:
    if not engine.quantize:
        return None
    value = table.get(engine.quantize.lower())
    if value is None:
        raise EngineError(
            f"engine.quantize {engine.quantize} is not supported by {engine_name} "
            f"(it loads {', '.join(sorted(table))})",
            "engine.quantize",
        )
    return value


def _tuning_flags(
    engine: EngineSpec,
    engine_name: str,
    quantize: tuple[Mapping[str, str], str],
    dtype: tuple[set[str] | None, str],
    concurrency_flag: str,
) -> list[str]:
    """The engine's optional flags from `engine:` (weight format, dtype, concurrency), each checked
    against what this engine loads and written under this engine's flag names."""
    flags: list[str] = []
    value = _quantize(engine, quantize[0], engine_name)
    if value:
        flags += [quantize[1], value]
    value = _dtype(engine, dtype[0], engine_name)
    if value:
        flags += [dtype[1], value]
    if engine.max_concurrent_requests:
        flags += [concurrency_flag, str(engine.max_concurrent_requests)]
    return flags


def tgi_submission(engine: EngineSpec, env: Mapping[str, str]) -> dict[str, Any]:
    """TGI's image with its launcher's arguments; the image's entrypoint is the launcher."""
    args = ["--model-id", hf_model_id(engine), "--hostname", "0.0.0.0", "--port", str(engine.port)]
    args += _tuning_flags(
        engine, "TGI", (TGI_QUANTIZE, "--quantize"), (_TGI_DTYPES, "--dtype"), "--max-concurrent-requests"
    )
    return {
        "image": TGI_IMAGE,
        "args": args,
        "commands": [],
        "setup": [],
        "python": None,
        "venv_key": None,
        "env": _env_with_token(env, "tgi"),
    }


def vllm_command(engine: EngineSpec) -> str:
    """The shell line: dstack's TGI bridge (agent's Python) starting vLLM (job venv) behind it."""
    model = hf_model_id(engine)
    vllm = ["vllm", "serve", model, "--served-model-name", model]
    vllm += _tuning_flags(engine, "vLLM", (VLLM_QUANTIZE, "--quantization"), (None, "--dtype"), "--max-num-seqs")
    bridge = [
        'exec "${DSTACK_ENGINE_PYTHON:-python3}"',
        "-m",
        "dstack.serving.tgi_bridge",
        "--host",
        "0.0.0.0",
        "--port",
        str(engine.port),
        "--model-id",
        shlex.quote(model),
    ]
    if engine.max_concurrent_requests:
        bridge += ["--max-concurrent-requests", str(engine.max_concurrent_requests)]
    return " ".join(bridge + ["--"] + [shlex.quote(a) for a in vllm])


def vllm_submission(engine: EngineSpec, env: Mapping[str, str]) -> dict[str, Any]:
    """vLLM on the host: installed once into a venv shared by every vLLM engine job of the agent."""
    return {
        "image": None,
        "args": [],
        "setup": [f"pip install vllm=={VLLM_VERSION}"],
        "commands": [vllm_command(engine)],
        "venv_key": f"engine-vllm-{VLLM_VERSION}",
        "env": _env_with_token(env, "vllm"),
    }
