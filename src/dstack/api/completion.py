"""`CompletionService` and `CompletionTask`: a text-generation model in a few lines.

Both are ordinary configurations (a service or a task with an `engine:`), submitted with
`client.runs.submit(...)` like any other; in YAML the same is `engine: {model_name: ...}`.
"""

from typing import Any

from dstack.core.models.configurations import EngineSpec, ServiceConfiguration, TaskConfiguration


class CompletionService(ServiceConfiguration):
    """A public (authenticated) endpoint serving `model_name` with the TGI API and, on the
    model endpoint, the OpenAI API."""

    def __init__(
        self,
        model_name: str,
        quantize: str | None = None,
        dtype: str | None = None,
        env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        if "engine" in kwargs:  # re-validation of an existing instance
            super().__init__(env=env or {}, **kwargs)
            return
        super().__init__(
            engine=EngineSpec(model_name=model_name, quantize=quantize, dtype=dtype), env=env or {}, **kwargs
        )


class CompletionTask(TaskConfiguration):
    """A private endpoint: the model runs as a task and `run.attach()` forwards
    `localhost:<local_port>` to it."""

    def __init__(
        self,
        model_name: str,
        quantize: str | None = None,
        dtype: str | None = None,
        env: dict[str, str] | None = None,
        local_port: int | str = 80,
        **kwargs: Any,
    ) -> None:
        if "engine" in kwargs:
            super().__init__(env=env or {}, **kwargs)
            return
        engine = EngineSpec(model_name=model_name, quantize=quantize, dtype=dtype)
        local = int(str(local_port).strip().rstrip(","))
        super().__init__(engine=engine, env=env or {}, ports=[f"{local}:{engine.port}"], **kwargs)
