"""Engine selection at provisioning (plain data: no GPU, no server)."""

import shlex

import pytest

from dstack.api import CompletionService, CompletionTask, Resources, Task
from dstack.core.models.configurations import EngineSpec
from dstack.server.services import engines
from dstack.server.services.engines import EngineError, engine_submission

GPU = Resources(gpu=1)
ENV = {"DSTACK_RUN_NAME": "r", "DSTACK_ENGINE_PYTHON": "/usr/bin/python3"}


def service(model: str = "meta-llama/Llama-3.1-8B-Instruct", **engine) -> CompletionService:
    return CompletionService(model_name=model, resources=GPU, **engine)


def test_no_engine_or_no_gpu_keeps_the_submission() -> None:
    assert engine_submission(Task(commands=["echo"]), [0], {"containers": True}, ENV) == {}
    assert engine_submission(service(), [], {"containers": True}, ENV) == {}
    assert engine_submission(service(), [], {}, ENV) == {}


def test_gpu_with_containers_runs_tgi_image() -> None:
    env = {**ENV, "HF_TOKEN": "hf_x"}
    sub = engine_submission(service(dtype="bf16"), [0, 1], {"containers": True, "network_isolation": True}, env)
    assert sub["image"] == engines.TGI_IMAGE and ":" in sub["image"].rsplit("/", 1)[1]  # pinned tag
    assert sub["commands"] == [] and sub["setup"] == [] and sub["python"] is None and sub["venv_key"] is None
    assert sub["args"] == [
        "--model-id",
        "meta-llama/Llama-3.1-8B-Instruct",
        "--hostname",
        "0.0.0.0",
        "--port",
        "8000",
        "--dtype",
        "bfloat16",
    ]
    assert sub["env"]["HF_TOKEN"] == sub["env"]["HUGGING_FACE_HUB_TOKEN"] == "hf_x"
    assert sub["env"]["DSTACK_ENGINE"] == "tgi" and sub["env"]["DSTACK_RUN_NAME"] == "r"
    assert "HF_TOKEN" not in engine_submission(service(), [0], {"containers": True}, ENV)["env"]


def test_tgi_quantize_port_and_concurrency() -> None:
    engine = EngineSpec(model_name="TheOrg/model-AWQ", quantize="awq", port=9000, max_concurrent_requests=32)
    args = engines.tgi_submission(engine, {})["args"]
    assert args[args.index("--quantize") + 1] == "awq"
    assert args[args.index("--port") + 1] == "9000"
    assert args[args.index("--max-concurrent-requests") + 1] == "32"


def test_gpu_without_containers_runs_vllm_behind_the_tgi_bridge() -> None:
    sub = engine_submission(service(dtype="float16"), [0], {"containers": False}, ENV)
    assert sub["image"] is None and sub["args"] == []
    assert sub["setup"] == [f"pip install vllm=={engines.VLLM_VERSION}"]
    assert sub["venv_key"] == f"engine-vllm-{engines.VLLM_VERSION}"
    (command,) = sub["commands"]
    argv = shlex.split(command.replace('"${DSTACK_ENGINE_PYTHON:-python3}"', "PY"))
    split = argv.index("--")
    bridge, vllm = argv[:split], argv[split + 1 :]
    assert bridge[:4] == ["exec", "PY", "-m", "dstack.serving.tgi_bridge"]
    assert bridge[bridge.index("--port") + 1] == "8000"  # the TGI API on the engine's port
    assert vllm[:3] == ["vllm", "serve", "meta-llama/Llama-3.1-8B-Instruct"]
    assert vllm[vllm.index("--dtype") + 1] == "float16"
    assert "--port" not in vllm  # the bridge gives vLLM a free loopback port
    assert sub["env"]["DSTACK_ENGINE"] == "vllm"


def test_builtin_model_name_maps_to_its_hf_original() -> None:
    sub = engine_submission(
        CompletionTask(model_name="SmolLM2-135M-Instruct", resources=GPU), [0], {"containers": True}, ENV
    )
    assert sub["args"][:2] == ["--model-id", "HuggingFaceTB/SmolLM2-135M-Instruct"]


@pytest.mark.parametrize(
    "model,quantize",
    [
        ("/models/llama.Q4_K_M.gguf", None),  # a local GGUF file
        ("./weights", None),  # a local directory (GGUF, for the built-in engine)
        ("bartowski/Llama-3.2-1B-Instruct-GGUF", None),  # a GGUF repository
        ("SmolLM2-135M-Instruct", "Q8_0"),  # a GGUF variant asked for
    ],
)
def test_gguf_weights_stay_on_the_builtin_engine(model: str, quantize: str | None) -> None:
    engine = EngineSpec(model_name=model, quantize=quantize)
    assert engines.choose_engine(engine, [0], containers=True) == "builtin"
    assert engines.choose_engine(engine, [0], containers=False) == "builtin"


def test_choose_engine_table() -> None:
    engine = EngineSpec(model_name="Qwen/Qwen2.5-7B-Instruct")
    assert engines.choose_engine(engine, [], containers=True) == "builtin"
    assert engines.choose_engine(engine, [0], containers=True) == "tgi"
    assert engines.choose_engine(engine, [0], containers=False) == "vllm"


def test_settings_an_engine_cannot_serve_are_refused_clearly() -> None:
    with pytest.raises(EngineError, match="float32 is not supported by TGI"):
        engines.tgi_submission(EngineSpec(model_name="m", dtype="float32"), {})
    assert "--dtype float32" in engines.vllm_command(EngineSpec(model_name="m", dtype="fp32"))
    with pytest.raises(EngineError, match="not supported by vLLM"):
        engines.vllm_command(EngineSpec(model_name="m", quantize="exl2"))
    with pytest.raises(EngineError, match="not known"):
        engines.tgi_submission(EngineSpec(model_name="m", dtype="int3"), {})
    assert "--quantization bitsandbytes" in engines.vllm_command(
        EngineSpec(model_name="m", quantize="bitsandbytes-nf4")
    )


def test_weights_only_vllm_loads_go_to_vllm_even_with_containers() -> None:
    engine = EngineSpec(model_name="TheOrg/model-HQQ", quantize="hqq")
    assert engines.choose_engine(engine, [0], containers=True) == "vllm"
    assert engines.choose_engine(EngineSpec(model_name="m", quantize="awq"), [0], containers=True) == "tgi"


@pytest.mark.parametrize(
    "model,quantize,dtype,gpu,refused",
    [
        ("TheOrg/model-AWQ", "awq", None, True, None),
        ("TheOrg/model-AWQ", "awq", None, False, "ask for a GPU"),
        ("TheOrg/model-GGUF", "gptq", None, True, "is GGUF"),
        ("./weights/model.gguf", "awq", None, True, "is GGUF"),
        ("TheOrg/model-GGUF", "Q4_K_M", None, False, None),
        ("TheOrg/model", None, "bfloat16", False, "needs a GPU engine"),
        ("TheOrg/model", None, "bfloat16", True, None),
        ("TheOrg/model", None, "int3", True, "not known"),
    ],
)
def test_engine_settings_checked_before_anything_starts(model, quantize, dtype, gpu, refused) -> None:
    engine = EngineSpec(model_name=model, quantize=quantize, dtype=dtype)
    if refused is None:
        engines.check_engine_settings(engine, gpu_requested=gpu)
    else:
        with pytest.raises(EngineError, match=refused):
            engines.check_engine_settings(engine, gpu_requested=gpu)


def test_refusals_name_the_setting() -> None:
    with pytest.raises(EngineError) as e:
        engines.check_engine_settings(EngineSpec(model_name="m", quantize="awq"), gpu_requested=False)
    assert e.value.field == "engine.quantize"
    with pytest.raises(EngineError) as e:
        engines.check_engine_settings(EngineSpec(model_name="m", dtype="bfloat16"), gpu_requested=False)
    assert e.value.field == "engine.dtype"
