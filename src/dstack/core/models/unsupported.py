"""dstack 0.22 configuration fields this implementation parses but does not (yet) act on.

dstack's official client sends every field of a configuration with its default (`"user": null`,
`"privileged": false`, `"volumes": []`, ...), and users' `.dstack.yml` files may name any of them.
Such a field is accepted when it holds one of the values that mean "not set", and refused with an
error naming it otherwise: no setting is silently ignored. A field leaves this table when it is
implemented (and becomes a real field of the configuration models).
"""

from __future__ import annotations

from typing import Any

#: field -> the values that mean "not set" (what dstack's client sends by default)
RUN_FIELDS: dict[str, tuple[Any, ...]] = {
    # container/job details
    "nvcc": (None, False),
    "single_branch": (None,),
    "docker": (None, False),
    "dstack": (None, False),
    "repos": (None, []),
    "priority": (None,),
    # profile (placement and lifecycle)
    "availability_zones": (None, []),
    "instance_types": (None, []),
    "reservation": (None,),
    "creation_policy": (None, "reuse-or-create"),
    "idle_duration": (None,),
    "utilization_policy": (None,),
    "startup_order": (None,),
    "stop_criteria": (None,),
    "schedule": (None,),
    "instances": (None, []),
    "tags": (None, {}),
    "backend_options": (None, []),
}

#: fields of one run type only (`groups`: heterogeneous nodes or replica groups)
TYPE_FIELDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "task": {"groups": (None,)},
    "service": {"groups": (None,), "https": (None, "auto")},
    # the IDE server version dstack installs in the job: the IDE here brings its own over SSH
    "dev-environment": {"version": (None,)},
    "serverless": {},
}

#: nested fields: (path inside the configuration, field) -> values meaning "not set"
NESTED_FIELDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "scaling": {"window": (None,)},
}


def unsupported_message(field: str) -> str:
    return f"{field!r} is not supported yet by this dstack server; remove it or leave it at its default"


def unset(value: Any, defaults: tuple[Any, ...]) -> bool:
    """`value` is one of `defaults` (compared by type too, so `0` is not `False`)."""
    return any(value == d and type(value) is type(d) for d in defaults)


def fields_for(kind: str) -> dict[str, tuple[Any, ...]]:
    """The unsupported top-level fields of run type `kind`."""
    return {**RUN_FIELDS, **TYPE_FIELDS.get(kind, {})}


def strip_unset(data: dict[str, Any], kind: str) -> tuple[dict[str, Any], str | None]:
    """`data` without the unsupported fields that are unset, and the first one that is set (or None)."""
    table = fields_for(kind)
    out = dict(data)
    for field, defaults in table.items():
        if field not in out:
            continue
        if not unset(out[field], defaults):
            return out, field
        del out[field]
    for parent, nested in NESTED_FIELDS.items():
        value = out.get(parent)
        if not isinstance(value, dict):
            continue
        value = dict(value)
        for field, defaults in nested.items():
            if field in value:
                if not unset(value[field], defaults):
                    return out, f"{parent}.{field}"
                del value[field]
        out[parent] = value
    return out, None
