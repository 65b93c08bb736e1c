"""Request bodies of the TGI and OpenAI APIs, as pydantic models.

Field-level checks live here; checks that need the tokenizer (lengths) live in `service.py`.
Messages follow TGI's wording so clients that match on them keep working.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 4
MAX_TOP_N_TOKENS = 5
MAX_BEST_OF = 4


class GenerateParameters(BaseModel):
    """TGI `parameters`."""

    model_config = ConfigDict(extra="ignore")

    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = False
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool = False
    grammar: Any | None = None
    adapter_id: str | None = None

    @field_validator("max_new_tokens")
    @classmethod
    def _max_new_tokens(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("`max_new_tokens` must be strictly positive")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("`temperature` must be strictly positive")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError("`top_p` must be > 0.0 and < 1.0")
        return v

    @field_validator("typical_p")
    @classmethod
    def _typical_p(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError("`typical_p` must be > 0.0 and < 1.0")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("`top_k` must be strictly positive")
        return v

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition_penalty(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("`repetition_penalty` must be strictly positive")
        return v

    @field_validator("frequency_penalty")
    @classmethod
    def _frequency_penalty(cls, v: float | None) -> float | None:
        if v is not None and not -2.0 <= v <= 2.0:
            raise ValueError("`frequency_penalty` must be >= -2.0 and <= 2.0")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v < 2**64:
            raise ValueError("`seed` must be a non-negative 64-bit integer")
        return v

    @field_validator("truncate")
    @classmethod
    def _truncate(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("`truncate` must be strictly positive")
        return v

    @field_validator("top_n_tokens")
    @classmethod
    def _top_n_tokens(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_TOP_N_TOKENS:
            raise ValueError(f"`top_n_tokens` must be >= 0 and <= {MAX_TOP_N_TOKENS}. Given: {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(v)}")
        return v

    @field_validator("watermark")
    @classmethod
    def _watermark(cls, v: bool) -> bool:
        if v:
            raise ValueError("`watermark` is not supported by this server")
        return v

    @field_validator("grammar")
    @classmethod
    def _grammar(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError("`grammar` is not supported by this server")
        return v

    @property
    def sampling(self) -> bool:
        return bool(
            self.do_sample
            or self.temperature is not None
            or self.top_k is not None
            or self.top_p is not None
            or self.typical_p is not None
        )

    @model_validator(mode="after")
    def _best_of(self) -> GenerateParameters:
        if self.best_of is not None:
            if self.best_of <= 0:
                raise ValueError("`best_of` must be strictly positive")
            if self.best_of > MAX_BEST_OF:
                raise ValueError(f"`best_of` must be <= {MAX_BEST_OF}. Given: {self.best_of}")
            if self.best_of > 1 and self.seed is not None:
                raise ValueError("`seed` must not be set when `best_of` is > 1")
            if self.best_of > 1 and not self.sampling:
                raise ValueError("you must use sampling when `best_of` is > 1")
        return self


class GenerateRequest(BaseModel):
    """TGI `POST /generate` and `/generate_stream` body."""

    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_parameters(cls, v: Any) -> Any:
        return {} if v is None else v


class TokenizeRequest(BaseModel):
    inputs: str
    parameters: dict[str, Any] | None = None


# --- OpenAI -----------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAICommon(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    top_k: int | None = None
    user: str | None = None

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("`max_tokens` must be strictly positive")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 2.0:
            raise ValueError("`temperature` must be >= 0.0 and <= 2.0")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError("`top_p` must be > 0.0 and <= 1.0")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_BEST_OF:
            raise ValueError(f"`n` must be >= 1 and <= {MAX_BEST_OF}")
        return v

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _penalty(cls, v: float | None) -> float | None:
        if v is not None and not -2.0 <= v <= 2.0:
            raise ValueError("penalties must be >= -2.0 and <= 2.0")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(v)}")
        return v

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Any | None = None


class ChatCompletionRequest(_OpenAICommon):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("`messages` cannot be empty")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_TOP_N_TOKENS:
            raise ValueError(f"`top_logprobs` must be >= 0 and <= {MAX_TOP_N_TOKENS}")
        return v


class CompletionRequest(_OpenAICommon):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("`prompt` cannot be empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("`suffix` is not supported by this server")
        return v


ErrorType = Literal["validation", "overloaded", "generation", "incomplete_generation"]
