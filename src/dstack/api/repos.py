"""`client.repos`: register a working directory and upload its code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from dstack.api.code import archive_code

if TYPE_CHECKING:
    from dstack.api.client import Client


class RepoCollection:
    def __init__(self, client: Client) -> None:
        self._client = client

    def init(self, repo_dir: str | os.PathLike = ".", git_identity_file=None, oauth_token=None) -> str:
        from dstack.api.runs import repo_id_for

        path = Path(repo_dir)
        repo_id = repo_id_for(path)
        self._client.api.post(
            f"/api/project/{self._client.project}/repos/init",
            {"repo_id": repo_id, "repo_info": {"repo_type": "local", "repo_dir": str(path.resolve())}},
        )
        return repo_id

    def upload(self, repo_dir: str | os.PathLike, files: list[tuple[str | Path, str]] | None = None) -> tuple[str, str]:
        """Archive and upload the directory, with the configuration's `files` (local path, path in
        the repo) packed in at their paths; returns (repo_id, code hash)."""
        from dstack.api.runs import repo_id_for

        path = Path(repo_dir)
        repo_id = repo_id_for(path)
        blob, digest = archive_code(path, files=files)
        result = self._client.api.post(
            f"/api/project/{self._client.project}/repos/upload_code",
            content=blob,
            params={"repo_id": repo_id},
            timeout=600,
        )
        return repo_id, result["hash"]


class BackendCollection:
    """`client.backends`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self) -> list[dict]:
        return self._client.api.post(f"/api/project/{self._client.project}/backends/list")
