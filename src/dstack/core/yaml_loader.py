"""Load `.dstack.yml` files into configuration models, with errors that point at a line.

PyYAML's plain loading forgets where values came from, so the text is composed into a node
tree first; pydantic's error locations are walked down that tree to find the line to report.
The tree is bounded before anything else looks at it: nesting deeper than `MAX_YAML_DEPTH`
and aliases that expand to more than `MAX_YAML_NODES` values ("billion laughs") are refused,
with the file and line, instead of exhausting the stack or the memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from dstack.core.errors import ConfigurationError
from dstack.core.models.configurations import (
    AnyRunConfiguration,
    Issue,
    configuration_class,
    validation_issues,
)
from dstack.core.models.fleets import FleetConfiguration  # `type: fleet` (not a run)
from dstack.core.models.volumes import VolumeConfiguration  # `type: volume` (not a run)

CONFIGURATION_SUFFIX = ".dstack.yml"
_MERGE_TAG = "tag:yaml.org,2002:merge"
#: mappings and lists nested deeper than this are refused
MAX_YAML_DEPTH = 64
#: values a document may hold once its aliases are expanded
MAX_YAML_NODES = 100_000


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting deeper than `MAX_YAML_DEPTH` while composing
    (the composer recurses once per level, so a deep document would end in `RecursionError`)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
                raise yaml.composer.ComposerError(
                    None, None, f"nesting deeper than {MAX_YAML_DEPTH} levels is not allowed", mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _TooLarge(Exception):
    def __init__(self, node: yaml.Node, problem: str) -> None:
        super().__init__(problem)
        self.node, self.problem = node, problem


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the values `root` holds with every alias expanded, in time linear in the tree
    (sizes of shared nodes are remembered); refuse recursive aliases and documents above
    `MAX_YAML_NODES`, pointing at the top-level entry that is too big."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise _TooLarge(node, "an alias refers to the node that contains it (a recursive structure)")
        busy.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        busy.discard(key)
        sizes[key] = total
        return total

    if size(root) <= MAX_YAML_NODES:
        return
    culprit = root
    if isinstance(root, yaml.MappingNode):
        culprit = next((k for k, v in root.value if size(v) > MAX_YAML_NODES), root)
    raise _TooLarge(culprit, f"the document expands to more than {MAX_YAML_NODES} values (through aliases?)")


def is_configuration_file_name(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is named like a dstack configuration (`.dstack.yml`, `serve.dstack.yml`)."""
    name = os.path.basename(os.fspath(path))
    return name == CONFIGURATION_SUFFIX or name.endswith(CONFIGURATION_SUFFIX)


def load_configuration(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> AnyRunConfiguration:
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
    text: str, path: str | None = None, environ: Mapping[str, str] | None = None
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
        not_runs: dict[Any, type[BaseModel]] = {"fleet": FleetConfiguration, "volume": VolumeConfiguration}
        cls: type[BaseModel] = not_runs.get(data.get("type")) or configuration_class(data)
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


def _parse_yaml(text: str, source: str, path: str | None) -> tuple[yaml.Node | None, Any]:
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            _check_expanded_size(root)
        data = loader.construct_document(root) if root is not None else None
    except _TooLarge as e:
        line, column = e.node.start_mark.line + 1, e.node.start_mark.column + 1
        raise ConfigurationError(
            f"{source}:{line}: invalid YAML: {e.problem} (line {line}, column {column})",
            path=path,
            line=line,
            column=column,
        ) from None
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
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise ConfigurationError(f"{source}: invalid YAML: {e}", path=path) from None
    finally:
        loader.dispose()
    return root, data


def _check_duplicate_keys(node: yaml.Node, source: str, path: str | None) -> None:
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


def _position(root: yaml.Node, loc: Sequence[str | int]) -> tuple[int, int]:
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


def _find_key(node: yaml.MappingNode, name: str) -> tuple[yaml.Node, yaml.Node] | None:
    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value == name:
            return key, value
    return None


def _to_configuration_error(issues: list[Issue], root: yaml.Node, source: str, path: str | None) -> ConfigurationError:
    located = sorted(
        ((_position(root, issue.loc), n, issue) for n, issue in enumerate(issues)), key=lambda t: (t[0], t[1])
    )
    message = "\n".join(f"{source}:{line}: {issue.text()}" for (line, _), _, issue in located)
    (first_line, first_column), _, first = located[0]
    return ConfigurationError(message, path=path, line=first_line, column=first_column, field=first.field)
