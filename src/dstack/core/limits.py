"""Hard bounds on the numbers a configuration may hold, checked when it is parsed.

They keep absurd values (`duration: 99999999999w`, `memory: 1e400`, `nodes: 10**30`) out of
the server, where they would overflow a timedelta or a database integer, or loop for ever. The
server's own, lower and configurable limits (`dstack.server.settings.ServerSettings`) apply on
top of these.
"""

from __future__ import annotations

import math
from typing import Any

#: durations (`max_duration`, `retry.duration`, timeouts, delays): at most a year
MAX_DURATION_SECONDS = 365 * 86400
#: memory, disk and shared-memory sizes: at most 1 PiB (in GB, dstack's memory unit)
MAX_MEMORY_GB = 1024.0 * 1024.0
#: counts in resource ranges (CPUs, GPUs)
MAX_RESOURCE_COUNT = 100_000
#: nodes of a task, replicas of a service, workers of a serverless endpoint
MAX_JOBS_PER_RUN = 1000
#: prices, rates, targets and other plain numbers
MAX_PLAIN_NUMBER = 1_000_000.0
#: string fields: references (an image, a model id, a URL path), paths, free text (a password, an entrypoint)
MAX_REF = 2048
MAX_PATH = 4096
MAX_TEXT = 65536


def check_finite(value: Any, what: str) -> None:
    """Refuse NaN and infinities, which JSON and YAML can both spell (`1e400`, `.inf`)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")


def short_repr(value: Any, limit: int = 40) -> str:
    """`repr(value)` cut to `limit` characters, for error messages about huge inputs."""
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than Python will print
        return "<a number too large to show>"
    return text if len(text) <= limit else text[:limit] + "..."
