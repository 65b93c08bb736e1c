"""Load `.dstack.yml` files into configuration models, with errors that point at a line.

PyYAML's plain loading forgets where values came from, so the text is also composed into a
node tree; pydantic's error locations are walked down that tree to find the line to report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml
from pydantic import ValidationError

from dstack.core.errors import ConfigurationError
from dstack.core.models.configurations import (
    AnyRunConfiguration,
    Issue,
    configuration_class,
    validation_issues,
)

CONFIGURATION_SUFFIX = ".dstack.yml"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def is_configuration_file_name(path: Union[str, os.PathLike[str]]) -> bool:
    """Whether `path` is named like a dstack configuration (`.dstack.yml`, `serve.dstack.yml`)."""
    name = os.path.basename(os.fspath(path))
    return name == CONFIGURATION_SUFFIX or name.endswith(CONFIGURATION_SUFFIX)


def load_configuration(
    path: Union[str, os.PathLike[str]], environ: Optional[Mapping[str, str]] = None
) -> AnyRunConfiguration:
    """Read and validate a configuration file; any problem is a `ConfigurationError`.

    `environ` replaces `os.environ` as the source of bare `env` keys (`env: [HF_TOKEN]`).
    """
    shown = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(f"{shown}: no such file", path=shown) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"{shown}: cannot read: {e}", path=shown) from e
    return load_configuration_text(text, path=shown, environ=environ)


def load_configuration_text(
    text: str, path: Optional[str] = None, environ: Optional[Mapping[str, str]] = None
) -> AnyRunConfiguration:
    """Validate configuration YAML `text`; `path` is only used to name the source in errors."""
    source = path or "<configuration>"
    root, data = _parse_yaml(text, source, path)
    if root is None or data is None:
        raise ConfigurationError(f"{source}: the configuration is empty", path=path)
    if not isinstance(root, yaml.MappingNode) or not isinstance(data, dict):
        line = root.start_mark.line + 1
        raise ConfigurationError(
            f"{source}:{line}: a configuration must be a mapping of fields (e.g. 'type: task')",
            path=path,
            line=line,
        )
    _check_duplicate_keys(root, source, path)
    try:
        cls = configuration_class(data)
    except ConfigurationError as e:
        line, column = _position(root, ("type",))
        raise ConfigurationError(
            f"{source}:{line}: {e.message}", path=path, line=line, column=column, field=e.field
        ) from None
    context = {"environ": environ} if environ is not None else None
    try:
        return cls.model_validate(data, context=context)  # type: ignore[return-value]
    except ValidationError as e:
        raise _to_configuration_error(validation_issues(e, cls), root, source, path) from e


def _parse_yaml(text: str, source: str, path: Optional[str]) -> tuple[Optional[yaml.Node], Any]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        column = mark.column + 1 if mark else None
        problem = e.problem or e.context or "syntax error"
        if e.context and e.problem and e.context != e.problem:
            problem = f"{e.context}, {e.problem}"
        where = f"{source}:{line}" if line else source
        raise ConfigurationError(
            f"{where}: invalid YAML: {problem} (line {line}, column {column})",
            path=path,
            line=line,
            column=column,
        ) from None
    except yaml.YAMLError as e:
        raise ConfigurationError(f"{source}: invalid YAML: {e}", path=path) from None
    return root, data


def _check_duplicate_keys(node: yaml.Node, source: str, path: Optional[str]) -> None:
    """YAML silently keeps the last of two equal keys; in a configuration that is a mistake."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key, value in node.value:
            if key.tag != _MERGE_TAG and isinstance(key, yaml.ScalarNode):
                line = key.start_mark.line + 1
                if key.value in seen:
                    raise ConfigurationError(
                        f"{source}:{line}: duplicate key {key.value!r} (first at line {seen[key.value]})",
                        path=path,
                        line=line,
                        column=key.start_mark.column + 1,
                        field=key.value,
                    )
                seen[key.value] = line
            _check_duplicate_keys(value, source, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_duplicate_keys(item, source, path)


def _position(root: yaml.Node, loc: Sequence[Union[str, int]]) -> tuple[int, int]:
    """1-based (line, column) of the deepest node on `loc` (a key's own line for mapping entries)."""
    mark = root.start_mark
    node: yaml.Node = root
    for seg in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(seg, str):
            found = _find_key(node, seg)
            if found is None and seg == "retry":
                found = _find_key(node, "retry_policy")  # `retry` may have come from `retry_policy`
            if found is None:
                break
            key, node = found
            mark = key.start_mark
        elif isinstance(node, yaml.SequenceNode) and isinstance(seg, int) and 0 <= seg < len(node.value):
            node = node.value[seg]
            mark = node.start_mark
        else:
            break
    return mark.line + 1, mark.column + 1


def _find_key(node: yaml.MappingNode, name: str) -> Optional[tuple[yaml.Node, yaml.Node]]:
    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value == name:
            return key, value
    return None


def _to_configuration_error(
    issues: list[Issue], root: yaml.Node, source: str, path: Optional[str]
) -> ConfigurationError:
    located = sorted(
        ((_position(root, issue.loc), n, issue) for n, issue in enumerate(issues)), key=lambda t: (t[0], t[1])
    )
    message = "\n".join(f"{source}:{line}: {issue.text()}" for (line, _), _, issue in located)
    (first_line, first_column), _, first = located[0]
    return ConfigurationError(message, path=path, line=first_line, column=first_column, field=first.field)
