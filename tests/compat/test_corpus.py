"""Configurations written the way dstack's public examples are (tests/compat/corpus/): each one
parses, or fails only on the field its first line documents as not supported yet.

The first line of each file says what is expected: `# expect: ok` or `# expect: unsupported FIELD`.
"""

from pathlib import Path

import pytest

from dstack.core.errors import ConfigurationError
from dstack.core.models import unsupported
from dstack.core.yaml_loader import load_configuration

CORPUS = Path(__file__).parent / "corpus"
FILES = sorted(CORPUS.glob("*.dstack.yml"))


def _expectation(path: Path) -> tuple[str, str | None]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name}: the first line must say what is expected"
    words = first.removeprefix("# expect: ").split()
    return (words[0], words[1] if len(words) > 1 else None)


def test_corpus_is_there():
    kinds = {p.name.split("-")[0] for p in FILES}
    assert {"task", "service", "dev", "fleet"} <= kinds and len(FILES) >= 15


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_configuration_parses_or_names_its_unsupported_field(path):
    expected, field = _expectation(path)
    environ = {"HF_TOKEN": "hf_test"}
    if expected == "ok":
        conf = load_configuration(path, environ=environ)
        assert conf.type == path.read_text().split("type: ", 1)[1].split()[0]
        return
    assert expected == "unsupported" and field, path.name
    kind = path.read_text().split("\ntype: ", 1)[1].split()[0]
    assert field in unsupported.fields_for(kind), f"{field} is not documented as unsupported"
    with pytest.raises(ConfigurationError) as e:
        load_configuration(path, environ=environ)
    assert e.value.field == field
    assert f"'{field}' is not supported yet" in str(e.value)
    assert e.value.line is not None  # the error points at the field's line in the file
