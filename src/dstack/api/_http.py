"""The low-level HTTP client: one place that turns server answers into Python or into errors.

Built on the standard library's `http.client` (one keep-alive connection): the CLI imports it
on every command, and `dstack ps` must answer in well under a third of a second.
"""

import http.client
import json as jsonlib
import threading
from typing import Any
from urllib.parse import urlencode, urlsplit

from dstack.core.errors import ClientError, ServerClientError


class APIClient:
    def __init__(self, base_url: str, token: str, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        parts = urlsplit(self.base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._local = threading.local()  # one connection per thread: http.client is not thread-safe

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = self._local.conn = cls(self._host, self._port, timeout=timeout)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None,
        content_type: str | None,
        params: dict | None,
        timeout: float | None,
    ) -> Any:
        url = self._prefix + path + (("?" + urlencode(params)) if params else "")
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        for attempt in (0, 1):
            conn = self._connection(timeout or self.timeout)
            try:
                conn.request(method, url, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self._drop(conn)
                if attempt == 1:  # a kept-alive connection the server closed: retry once on a new one
                    raise ClientError(f"cannot reach the dstack server at {self.base_url}: {e}") from e
            except (OSError, http.client.HTTPException) as e:
                self._drop(conn)
                raise ClientError(f"cannot reach the dstack server at {self.base_url}: {e}") from e
            except BaseException:
                # Interrupted mid-request (Ctrl-C during a long poll): the connection is in an
                # unknown state, so the next request must not reuse it.
                self._drop(conn)
                raise
        return _result(resp.status, resp.reason, data)

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        self._local.conn = None

    def post(
        self,
        path: str,
        json: Any = None,
        timeout: float | None = None,
        content: bytes | None = None,
        params: dict | None = None,
    ) -> Any:
        if content is not None:
            return self._request("POST", path, content, "application/octet-stream", params, timeout)
        body = jsonlib.dumps(json if json is not None else {}).encode()
        return self._request("POST", path, body, "application/json", params, timeout)

    def get(self, path: str) -> Any:
        return self._request("GET", path, None, None, None, None)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _result(status: int, reason: str, data: bytes) -> Any:
    if status >= 400:
        try:
            detail = jsonlib.loads(data).get("detail")
        except (ValueError, AttributeError):
            detail = None
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):
            msg = "; ".join(d.get("msg", "") for d in detail)
            code = detail[0].get("code", "error")
            fields = [f for d in detail for f in d.get("fields", [])]
        else:
            msg, code, fields = (str(detail) if detail else data.decode(errors="replace") or reason), "error", []
        if status >= 500:
            raise ClientError(f"server error {status}: {msg}")
        raise ServerClientError(msg, code=code, fields=fields, status=status)
    if not data:
        return None
    return jsonlib.loads(data)


__all__ = ["APIClient"]
