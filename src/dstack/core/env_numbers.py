"""Numbers from environment variables, refused with the variable's name and what it must be.

The server's settings, the code archive budget and the agent's sampler all read numeric
`DSTACK_*` variables; each caller turns the `ValueError` into its own way of stopping (the
server's SettingsError, the agent's exit), the parsing and wording are written once here.
"""

from __future__ import annotations

from collections.abc import Mapping


def whole_number(env: Mapping[str, str], name: str, default: int, unit: str = "", low: int = 1) -> int:
    """`env[name]` as an int of at least `low`; `default` when unset or empty."""
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number{_of(unit)}, not {raw[:50]!r}") from None
    if value < low:
        raise ValueError(f"{name} must be at least {low}, not {value}")
    return value


def number(env: Mapping[str, str], name: str, default: float, low: float, high: float, unit: str = "") -> float:
    """`env[name]` as a float within [low, high] (nan refused); `default` when unset or empty."""
    raw = env.get(name)
    if not raw:
        return float(default)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number{_of(unit)}, not {raw[:50]!r}") from None
    if not low <= value <= high:  # also refuses nan
        raise ValueError(f"{name} must be between {low:g} and {high:g}{' ' + unit if unit else ''}, not {raw[:50]}")
    return value


def _of(unit: str) -> str:
    return f" of {unit}" if unit else ""
