"""GPU weight formats (`engine.quantize`) and the name each GPU engine knows them by.

One list for the server's engine choice (server.services.engines) and the built-in engine's
refusal of formats llama.cpp cannot load (serving.models): GGUF quantization types (Q4_K_M, ...)
are none of these.
"""

from types import MappingProxyType

#: TGI's `--quantize` values, each under its own name
TGI_QUANTIZE = MappingProxyType(
    {
        q: q
        for q in (
            "awq",
            "gptq",
            "bitsandbytes",
            "bitsandbytes-nf4",
            "bitsandbytes-fp4",
            "eetq",
            "exl2",
            "marlin",
            "fp8",
            "compressed-tensors",
        )
    }
)
#: vLLM's `--quantization` value for each format it loads (hqq is vLLM's only)
VLLM_QUANTIZE = MappingProxyType(
    {
        "awq": "awq",
        "gptq": "gptq",
        "marlin": "marlin",
        "fp8": "fp8",
        "hqq": "hqq",
        "compressed-tensors": "compressed-tensors",
        "bitsandbytes": "bitsandbytes",
        "bitsandbytes-nf4": "bitsandbytes",
        "bitsandbytes-fp4": "bitsandbytes",
    }
)
#: every GPU weight format some GPU engine loads (lower case)
GPU_QUANTIZE = frozenset(TGI_QUANTIZE) | frozenset(VLLM_QUANTIZE)
