"""Small value types shared by the configuration models: durations, memory sizes, env, ports.

Each type accepts the loose forms users write in `.dstack.yml` (and in Python) and normalises
them to one canonical value, so the rest of dstack never re-parses strings.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo, model_validator

from dstack.core.limits import MAX_DURATION_SECONDS, MAX_MEMORY_GB, short_repr

# --- durations -------------------------------------------------------------------------------

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_PART = re.compile(r"(\d+)\s*([smhdw])")
_OFF_WORDS = {"off", "false", "no", "none"}


def parse_duration(value: Any) -> int | None | Literal["off"]:
    """Parse `"2h"`, `"30m"`, `"90s"`, `"1d"`, `"1w"`, `"1h30m"`, an int (seconds) or `"off"`.

    Returns seconds as an int, `None` for `None`, and the string `"off"` for `off`
    (YAML 1.1 reads a bare `off` as `False`, so `False` means `"off"` too). Durations longer
    than a year (`MAX_DURATION_SECONDS`) are refused: nothing dstack times runs that long, and
    larger values overflow the server's date arithmetic.
    """
    parsed = _parse_duration_unbounded(value)
    if isinstance(parsed, int) and parsed > MAX_DURATION_SECONDS:
        raise ValueError(
            f"duration {short_repr(value)} is too long: at most {MAX_DURATION_SECONDS // 86400}d ({MAX_DURATION_SECONDS} seconds)"
        )
    return parsed


def _parse_duration_unbounded(value: Any) -> int | None | Literal["off"]:
    if value is None:
        return None
    if value is False:
        return "off"
    if value is True:
        raise ValueError("a duration must be a number of seconds or a string like '30m', '2h'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a duration cannot be negative: {value}")
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0 or value != int(value):
            raise ValueError(f"invalid duration {short_repr(value)}: use whole seconds or '30m', '2h'")
        return int(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if len(text) > 100:
            raise ValueError("invalid duration: longer than 100 characters")
        if text in _OFF_WORDS:
            return "off"
        if text.isdigit():
            return int(text)
        compact = text.replace(" ", "")
        parts = _DURATION_PART.findall(compact)
        if parts and "".join(n + u for n, u in parts) == compact:
            return sum(int(n) * _DURATION_UNITS[u] for n, u in parts)
    raise ValueError(
        f"invalid duration {short_repr(value)}: use seconds or a number with a unit s, m, h, d, w (e.g. '30m', '2h')"
    )


def _duration_seconds(value: Any) -> Any:
    """Validator for fields that need seconds and do not accept `off`."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) or value is True:
        parsed = parse_duration(value)
        if parsed == "off":
            raise ValueError("'off' is not allowed here; give a duration such as '30s' or '5m'")
        return parsed
    if value is False:
        raise ValueError("'off' is not allowed here; give a duration such as '30s' or '5m'")
    if value is None:
        return value
    raise ValueError(f"invalid duration {value!r}: use seconds or a string like '30s', '5m'")


def _duration_or_off(value: Any) -> Any:
    """Validator for fields such as `max_duration` where `off` disables the limit."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return parse_duration(value)
    raise ValueError(f"invalid duration {value!r}: use seconds, a string like '30m', '2h', or off")


Duration = Annotated[int, BeforeValidator(_duration_seconds)]
"""Seconds; accepts `"30m"`, `"2h"`, `90`, ..."""

DurationOrOff = Annotated[int | Literal["off"], BeforeValidator(_duration_or_off)]
"""Seconds or the literal `"off"` (YAML `off`/`false` included)."""


def format_duration(seconds: int | str | None) -> str:
    """Short human form for tables: `1h30m`, `45s`, `off`, `-`."""
    if seconds is None:
        return "-"
    if isinstance(seconds, str):
        return seconds
    if seconds == 0:
        return "0s"
    out = []
    rest = int(seconds)
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(out)


# --- memory ----------------------------------------------------------------------------------

_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([kmgt]i?b?)?\s*$", re.IGNORECASE)
_MEMORY_FACTORS = {"k": 1 / 1024 / 1024, "m": 1 / 1024, "g": 1.0, "t": 1024.0}


def parse_memory(value: Any) -> float:
    """Parse `"24GB"`, `"512MB"`, `"1TB"` or a plain number (meaning GB) into GB as a float.

    Infinite, NaN and sizes above `MAX_MEMORY_GB` (1 PiB) are refused.
    """
    gb = _parse_memory_unbounded(value)
    if not math.isfinite(gb) or gb > MAX_MEMORY_GB:
        raise ValueError(
            f"invalid memory size {short_repr(value)}: it must be a finite size of at most {int(MAX_MEMORY_GB // 1024)}TB"
        )
    return gb


def _parse_memory_unbounded(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"invalid memory size {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"memory size cannot be negative: {value}")
        return float(value) if not isinstance(value, int) or value <= MAX_MEMORY_GB else math.inf
    if isinstance(value, str) and len(value) <= 100:
        m = _MEMORY_RE.match(value)
        if m:
            number = float(m.group(1))
            unit = (m.group(2) or "g")[0].lower()
            return number * _MEMORY_FACTORS[unit]
    raise ValueError(f"invalid memory size {short_repr(value)}: use a number with a unit MB, GB or TB (e.g. '24GB')")


def format_memory(gb: float) -> str:
    """`24.0` → `24GB`, `0.5` → `512MB`, `2048.0` → `2TB` (only when exact)."""
    if gb >= 1024 and gb % 1024 == 0:
        return f"{int(gb // 1024)}TB"
    if gb == int(gb):
        return f"{int(gb)}GB"
    mb = gb * 1024
    if abs(mb - round(mb)) < 1e-6 and gb < 1:
        return f"{int(round(mb))}MB"
    return f"{round(gb, 3):g}GB"


# --- env -------------------------------------------------------------------------------------


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ValueError(f"an environment variable value must be a string, got {type(value).__name__}")


def parse_env(value: Any, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Normalise `env` to `dict[str, str]`.

    Accepts a list of `KEY=VALUE` / bare `KEY` strings or a mapping. A bare `KEY` (or a mapping
    key with no value) is taken from `environ` (default: `os.environ`) now, at parse time, because
    that is the submitter's environment; if it is not set there, that is an error.
    """
    env_source = os.environ if environ is None else environ
    if value is None:
        return {}
    result: dict[str, str] = {}
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (list, tuple)):
        items = []
        for entry in value:
            if not isinstance(entry, str):
                raise ValueError(f"env entries must be 'KEY=VALUE' or 'KEY' strings, got {entry!r}")
            key, sep, val = entry.partition("=")
            items.append((key, val if sep else None))
    else:
        raise ValueError("env must be a list of 'KEY=VALUE' strings or a mapping")
    for key, val in items:
        if not isinstance(key, str):
            key = str(key)
        key = key.strip()
        if not key or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise ValueError(f"invalid environment variable name {key!r}")
        if val is None:
            if key not in env_source:
                raise ValueError(f"environment variable {key!r} has no value and is not set in the current environment")
            result[key] = env_source[key]
        else:
            result[key] = _env_value(val)
    return result


def _env_validator(value: Any, info: ValidationInfo) -> Any:
    environ = None
    if info.context and isinstance(info.context, dict):
        environ = info.context.get("environ")
    return parse_env(value, environ)


Env = Annotated[dict[str, str], BeforeValidator(_env_validator)]
"""`env` field type: always a `dict[str, str]` after validation."""


def env_to_list(env: Mapping[str, str]) -> list[str]:
    """`{"A": "1"}` → `["A=1"]`, e.g. for showing or passing to a process."""
    return [f"{k}={v}" for k, v in env.items()]


# --- ports -----------------------------------------------------------------------------------


def _port_number(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"invalid port {value!r}")
    if isinstance(value, str):
        value = value.strip()
        if not value.isdigit():
            raise ValueError(f"invalid port {value!r}")
        value = int(value)
    if not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"invalid port {value!r}: must be 1..65535")
    return value


class PortMapping(BaseModel):
    """A port exposed by a job: `8080`, `"80:8080"` (local:container) or `"*:8080"`.

    `local_port` is the port on the submitter's side (or the gateway's for services);
    `None` means "any free port" (`*`). A single number maps the same port on both sides.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    local_port: int | None = None
    container_port: int

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, PortMapping):
            return value
        if isinstance(value, bool):
            raise ValueError(f"invalid port {value!r}")
        if isinstance(value, int):
            port = _port_number(value)
            return {"local_port": port, "container_port": port}
        if isinstance(value, str):
            return cls._parse_str(value)
        if isinstance(value, dict):
            out = dict(value)
            for k in ("local_port", "container_port"):
                if out.get(k) is not None and out.get(k) != "*":
                    out[k] = _port_number(out[k])
            if out.get("local_port") == "*":
                out["local_port"] = None
            return out
        raise ValueError(f"invalid port mapping {value!r}")

    @staticmethod
    def _parse_str(text: str) -> dict[str, Any]:
        local, sep, container = text.strip().partition(":")
        if not sep:
            port = _port_number(local)
            return {"local_port": port, "container_port": port}
        if not container:
            raise ValueError(f"invalid port mapping {text!r}: expected 'LOCAL:CONTAINER'")
        local = local.strip()
        return {
            "local_port": None if local == "*" else _port_number(local),
            "container_port": _port_number(container),
        }

    @classmethod
    def parse(cls, value: Any) -> PortMapping:
        return cls.model_validate(value)

    def __str__(self) -> str:
        if self.local_port == self.container_port:
            return str(self.container_port)
        local = "*" if self.local_port is None else str(self.local_port)
        return f"{local}:{self.container_port}"
