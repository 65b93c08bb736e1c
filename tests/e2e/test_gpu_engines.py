"""CompletionService on an NVIDIA GPU host: TGI's image (podman/docker) or vLLM behind the TGI bridge.

Needs a GPU, and internet access for the image / `pip install vllm` and the model's weights; for
podman also a CDI spec of the GPUs (`nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`).
"""

import shutil

import httpx
import pytest
from text_generation import Client as TGIClient

from dstack.agent import containers
from dstack.api import CompletionService, Resources
from tests.e2e.util import wait_ready

pytestmark = [
    pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs an NVIDIA GPU"),
    pytest.mark.parametrize("server", ["sqlite"], indirect=True),
]

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_completion_service_uses_a_gpu_engine(server):
    run = server.client().runs.submit(
        CompletionService(model_name=MODEL, resources=Resources(gpu=1)), run_name="gpu-smol"
    )
    try:
        wait_ready(run.service_url, server.headers, timeout=1800, path="health")
        tgi = TGIClient(run.service_url.rstrip("/"), headers=server.headers, timeout=120)
        out = tgi.generate("What is Deep Learning?", max_new_tokens=8)
        assert out.generated_text and out.details.generated_tokens <= 8
        info = httpx.get(run.service_url.rstrip("/") + "/info", headers=server.headers, timeout=30).json()
        # TGI's own router where the agent runs containers, else vLLM behind dstack's bridge
        expected = "dstack-tgi-bridge" if containers.detect() is None else "text-generation-router"
        assert info["router"] == expected, info
        assert info["model_id"] == MODEL
    finally:
        run.stop(abort=True)
