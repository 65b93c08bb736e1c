"""Fixtures every agent test module uses: a real agent process per module, and a client for it."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dstack.agent.launcher import AgentInfo, start_agent
from tests.agent.test_agent import TOKEN, _stop_agent


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agent-home")


@pytest.fixture(scope="module")
def agent(home: Path) -> Iterator[AgentInfo]:
    info = start_agent(home, TOKEN)
    yield info
    _stop_agent(info)


@pytest.fixture
def client(agent: AgentInfo) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
        yield c
