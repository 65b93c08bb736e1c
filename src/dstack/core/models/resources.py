"""Resource requirements and their grammar: ranges (`2..`, `24GB..80GB`) and GPU shorthands.

Offers (the local host, fleet hosts, cloud instances) are matched against `ResourcesSpec`,
so every loose form users write is normalised here into explicit min/max values.
"""

from __future__ import annotations

import re
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, field_validator, model_validator
from pydantic_core import core_schema

from dstack.core.limits import MAX_RESOURCE_COUNT, short_repr
from dstack.core.models.common import format_memory, parse_memory

T = TypeVar("T")


class Memory(float):
    """A memory size in GB. Parses `"24GB"`, `"512MB"`, `"1TB"`, or a number (GB)."""

    @classmethod
    def parse(cls, value: Any) -> Memory:
        if isinstance(value, Memory):
            return value
        return cls(parse_memory(value))

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        as_float = core_schema.no_info_before_validator_function(parse_memory, core_schema.float_schema(ge=0))
        return core_schema.no_info_after_validator_function(
            cls,
            as_float,
            serialization=core_schema.plain_serializer_function_ser_schema(float, when_used="json"),
        )

    def __str__(self) -> str:
        return format_memory(float(self))

    def __repr__(self) -> str:
        return f"Memory({format_memory(float(self))!r})"


def _is_memory_token(text: str) -> bool:
    return bool(re.search(r"\d\s*[kmgt]i?b?\s*$", text.strip(), re.IGNORECASE))


class Range(BaseModel, Generic[T]):
    """An inclusive range; either end may be `None` (unbounded).

    Parses `"2"` (exactly 2), `"2.."`, `"..8"`, `"2..8"`, `"24GB..80GB"`, a number, or
    `{min, max}`. Validation of the ends is left to `T` (int, `Memory`, ...).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: T | None = None
    max: T | None = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, Range):
            return {"min": value.min, "max": value.max}
        if isinstance(value, bool):
            raise ValueError(f"invalid range {value!r}")
        if isinstance(value, (int, float)):
            return {"min": value, "max": value}
        if isinstance(value, str):
            text = value.strip()
            if not text:
                raise ValueError("invalid range '': expected e.g. '2', '2..', '..8', '2..8'")
            if ".." in text:
                low, _, high = text.partition("..")
                if ".." in high:
                    raise ValueError(f"invalid range {value!r}")
                return {"min": low.strip() or None, "max": high.strip() or None}
            return {"min": text, "max": text}
        return value

    @model_validator(mode="after")
    def _check_order(self) -> Range[T]:
        for end in (self.min, self.max):
            if isinstance(end, int) and not isinstance(end, bool) and abs(end) > MAX_RESOURCE_COUNT:
                raise ValueError(f"invalid range: {short_repr(end)} is out of bounds (at most {MAX_RESOURCE_COUNT})")
        if self.min is not None and self.max is not None and self.min > self.max:  # type: ignore[operator]
            raise ValueError(f"invalid range: min {self.min} is greater than max {self.max}")
        return self

    def contains(self, value: Any) -> bool:
        """Whether `value` lies within the range (both ends inclusive)."""
        if self.min is not None and value < self.min:
            return False
        if self.max is not None and value > self.max:
            return False
        return True

    def intersect(self, other: Range[T]) -> Range[T] | None:
        """The overlap of two ranges, or `None` when they do not overlap."""
        lows = [v for v in (self.min, other.min) if v is not None]
        highs = [v for v in (self.max, other.max) if v is not None]
        low = max(lows) if lows else None  # type: ignore[type-var]
        high = min(highs) if highs else None  # type: ignore[type-var]
        if low is not None and high is not None and low > high:  # type: ignore[operator]  # T: int or a size
            return None
        return type(self)(min=low, max=high)

    def __str__(self) -> str:
        if self.min is not None and self.min == self.max:
            return _fmt(self.min)
        low = "" if self.min is None else _fmt(self.min)
        high = "" if self.max is None else _fmt(self.max)
        return f"{low}..{high}"


def _fmt(value: Any) -> str:
    if isinstance(value, Memory):
        return str(value)
    if isinstance(value, float) and value == int(value):
        return str(int(value))
    return str(value)


_GPU_VENDORS = {"nvidia", "amd", "google", "tpu", "intel", "tenstorrent"}


def _parse_gpu_shorthand(spec: str) -> dict[str, Any]:
    """Split `A100,H100:80GB:2` into names / memory / count; tokens may come in any order."""
    original = spec
    tokens = [t.strip() for t in spec.split(":")]
    out: dict[str, Any] = {}

    def put(key: str, value: Any, token: str) -> None:
        if key in out:
            if key == "name":
                raise ValueError(
                    f"invalid GPU spec {original!r}: {token!r} is not a count (e.g. 2, 1..4) or a memory size"
                    f" (e.g. 24GB), and the GPU name is already given"
                )
            raise ValueError(f"invalid GPU spec {original!r}: more than one {key} ({token!r})")
        out[key] = value

    for token in tokens:
        if not token:
            raise ValueError(f"invalid GPU spec {original!r}: empty part")
        if re.fullmatch(r"\d*\s*\.\.\s*\d*|\d+", token):
            put("count", token, token)
        elif ".." in token or _is_memory_token(token):
            low, _, high = token.partition("..")
            for part in (low, high):
                if part.strip() and not _is_memory_token(part):
                    raise ValueError(f"invalid GPU spec {original!r}: {token!r} is neither a count nor a memory size")
            put("memory", token, token)
        elif token.lower() in _GPU_VENDORS and "vendor" not in out and len(tokens) > 1:
            put("vendor", token.lower(), token)
        elif re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-.]*(\s*,\s*[A-Za-z0-9][A-Za-z0-9_\-.]*)*", token):
            put("name", [n.strip() for n in token.split(",")], token)
        else:
            raise ValueError(f"invalid GPU spec {original!r}: cannot understand {token!r}")
    return out


class GPUSpec(BaseModel):
    """What GPUs a job needs.

    Shorthand: tokens split by `:` in any order — a name list (`A100`, `A100,H100`), a memory
    per GPU (`24GB`, `24GB..80GB`) and a count (`2`, `1..4`); e.g. `A100:80GB:2`, `24GB`, `H100:8`.
    An int is a count. Python: `GPUSpec(name="A100", count=2)`, `GPUSpec(memory="24GB")`.
    """

    model_config = ConfigDict(extra="forbid")

    vendor: str | None = None
    name: list[str] | None = None
    count: Range[int] = Field(default_factory=lambda: Range[int](min=1, max=1))
    memory: Range[Memory] | None = None
    total_memory: Range[Memory] | None = None
    compute_capability: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"invalid GPU spec {value!r}")
        if isinstance(value, int):
            return {"count": value}
        if isinstance(value, str):
            return _parse_gpu_shorthand(value)
        return value

    @field_validator("name", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (list, tuple)):
            names = [str(v).strip() for v in value]
            if any(not n for n in names):
                raise ValueError("GPU names cannot be empty")
            return names or None
        return value

    @field_validator("vendor", mode="before")
    @classmethod
    def _vendor(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            if value not in _GPU_VENDORS:
                raise ValueError(f"unknown GPU vendor {value!r}; known: {', '.join(sorted(_GPU_VENDORS))}")
        return value

    @field_validator("compute_capability", mode="before")
    @classmethod
    def _cc(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not 0 <= value < 100:  # also refuses NaN, infinities and ints too big for a float
                raise ValueError(f"invalid compute capability {short_repr(value)}: expected e.g. 8.0")
            return f"{float(value):.1f}"
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return f"{value[0]}.{value[1]}"[:20]
        if isinstance(value, str) and len(value) > 20:
            raise ValueError("invalid compute capability: longer than 20 characters")
        return value

    @field_validator("count")
    @classmethod
    def _count(cls, value: Range[int]) -> Range[int]:
        if value.min is not None and value.min < 0:
            raise ValueError("GPU count cannot be negative")
        return value

    def pretty_format(self) -> str:
        """`A100:80GB:2`, `24GB:1`, `A100,H100:1..4`."""
        parts = []
        if self.name:
            parts.append(",".join(self.name))
        if self.memory is not None:
            parts.append(str(self.memory))
        parts.append(str(self.count))
        text = ":".join(parts)
        if self.total_memory is not None:
            text += f" (total {self.total_memory})"
        return text

    def __str__(self) -> str:
        return self.pretty_format()


def _default_cpu() -> Range[int]:
    return Range[int](min=2)


def _default_memory() -> Range[Memory]:
    return Range[Memory](min=Memory(8))


def _default_disk() -> Range[Memory]:
    return Range[Memory](min=Memory(100))


class ResourcesSpec(BaseModel):
    """The resources a job asks for; defaults: `cpu: 2..`, `memory: 8GB..`, `disk: 100GB..`, no GPU."""

    model_config = ConfigDict(extra="forbid")

    cpu: Range[int] = Field(default_factory=_default_cpu)
    memory: Range[Memory] = Field(default_factory=_default_memory)
    gpu: GPUSpec | None = None
    disk: Range[Memory] = Field(default_factory=_default_disk)
    shm_size: Memory | None = None

    @model_validator(mode="before")
    @classmethod
    def _unwrap(cls, value: Any) -> Any:
        if isinstance(value, dict):
            value = dict(value)
            disk = value.get("disk")
            if isinstance(disk, dict) and set(disk) == {"size"}:
                value["disk"] = disk["size"]  # dstack's `disk: {size: 100GB..}` form
            cpu = value.get("cpu")
            if isinstance(cpu, dict) and "count" in cpu and set(cpu) <= {"count", "arch"}:
                value["cpu"] = cpu["count"]
            for key in ("cpu", "memory", "disk", "gpu"):
                if key in value and value[key] is None and key != "gpu":
                    del value[key]  # an explicit null means "the default"
        return value

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, value: Range[int]) -> Range[int]:
        if value.min is not None and value.min < 0:
            raise ValueError("cpu count cannot be negative")
        return value

    def pretty_format(self) -> str:
        """One line for tables: `2..xCPU, 8GB.., A100:80GB:2, 100GB.. (disk)`."""
        parts = [f"{self.cpu}xCPU", str(self.memory)]
        if self.gpu is not None:
            parts.append(self.gpu.pretty_format())
        parts.append(f"{self.disk} (disk)")
        if self.shm_size is not None:
            parts.append(f"{self.shm_size} (shm)")
        return ", ".join(parts)

    def __str__(self) -> str:
        return self.pretty_format()


Resources = ResourcesSpec
GPU = GPUSpec
