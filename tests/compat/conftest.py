"""Fixtures for the official dstack client: its venv (cached) and a home per test module."""

import pytest

from tests.compat.official import OFFICIAL_VERSION, OfficialClient, official_venv


@pytest.fixture(scope="session")
def official_venv_dir():
    try:
        return official_venv()
    except RuntimeError as e:  # PyPI unreachable and nothing cached: say so, do not pass
        pytest.skip(f"dstack=={OFFICIAL_VERSION} could not be installed from PyPI: {e}")


@pytest.fixture(scope="module")
def official(official_venv_dir, server, tmp_path_factory):
    """The official client, with project `main` of the module's server added (`dstack project add`)."""
    home = tmp_path_factory.mktemp("official-home")
    client = OfficialClient(official_venv_dir, home)
    client.cli("project", "add", "--name", "main", "--url", server.url, "--token", server.token, "-y")
    return client
