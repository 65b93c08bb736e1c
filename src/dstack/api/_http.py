"""The low-level HTTP client: one place that turns server answers into Python or into errors."""

from typing import Any

import httpx

from dstack.core.errors import ClientError, ServerClientError


class APIClient:
    def __init__(self, base_url: str, token: str, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=10.0),
        )

    def post(self, path: str, json: Any = None, timeout: float | None = None, content: bytes | None = None,
             params: dict | None = None) -> Any:
        kwargs: dict = {"params": params}
        if content is not None:
            kwargs["content"] = content
            kwargs["headers"] = {"Content-Type": "application/octet-stream"}
        else:
            kwargs["json"] = json if json is not None else {}
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            r = self._http.post(path, **kwargs)
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach the dstack server at {self.base_url}: {e}") from e
        return _result(r)

    def get(self, path: str) -> Any:
        try:
            r = self._http.get(path)
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach the dstack server at {self.base_url}: {e}") from e
        return _result(r)

    def close(self) -> None:
        self._http.close()


def _result(r: httpx.Response) -> Any:
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail")
        except ValueError:
            detail = None
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            msg = "; ".join(d.get("msg", "") for d in detail)
            code = detail[0].get("code", "error")
            fields = [f for d in detail for f in d.get("fields", [])]
        else:
            msg, code, fields = (str(detail) if detail else r.text or r.reason_phrase), "error", []
        if r.status_code >= 500:
            raise ClientError(f"server error {r.status_code}: {msg}")
        raise ServerClientError(msg, code=code, fields=fields, status=r.status_code)
    if not r.content:
        return None
    return r.json()
