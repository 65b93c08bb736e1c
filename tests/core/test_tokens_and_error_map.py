"""One bearer-token parser and one map from domain errors to HTTP, as every part uses them."""

import pytest

from dstack.core.domain_errors import DomainError, ErrorKind
from dstack.core.http_errors import STATUS, error_body, server_error, to_http
from dstack.core.tokens import bearer_token, hash_token


@pytest.mark.parametrize(
    "value,strict,bare",
    [
        ("Bearer abc", "abc", "abc"),
        ("bearer   abc  ", "abc", "abc"),
        ("BEARER\tabc", "abc", "abc"),
        (b"Bearer abc", "abc", "abc"),
        ("abc", None, "abc"),  # RunPod workers send their key bare
        ("  abc ", None, "abc"),
        ("Bearer", None, "Bearer"),  # a lone word is a bare token, never a scheme with nothing after it
        ("Bearer    ", None, "Bearer"),
        ("", None, None),
        ("   ", None, None),
        (None, None, None),
    ],
)
def test_bearer_forms(value, strict, bare):
    assert bearer_token(value) == strict
    assert bearer_token(value, bare=True) == bare


def test_hash_is_sha256_hex_and_not_the_token():
    h = hash_token("secret")
    assert len(h) == 64 and "secret" not in h and h == hash_token("secret") != hash_token("secret2")


def test_every_kind_has_a_status():
    assert set(STATUS) == set(ErrorKind)
    assert all(400 <= s < 600 for s in STATUS.values())


def test_server_errors_map_to_the_statuses_and_bodies_clients_read():
    from dstack.server.errors import Forbidden, InvalidRequest, NotAuthenticated, ResourceExists, ResourceNotFound
    from dstack.server.limits import BodyTooLarge, QuotaExceeded

    cases = [
        (InvalidRequest("bad name", fields=["name"]), 400, "error"),
        (NotAuthenticated("who are you"), 401, "not_authenticated"),
        (Forbidden("no"), 403, "forbidden"),
        (ResourceNotFound("gone"), 404, "not_found"),
        (ResourceExists("taken"), 409, "exists"),
        (BodyTooLarge("big"), 413, "too_large"),
        (QuotaExceeded("too many"), 429, "quota_exceeded"),
    ]
    for exc, status, code in cases:
        got_status, body = to_http(exc)
        assert got_status == status, exc
        assert body["detail"][0]["code"] == code and body["detail"][0]["msg"] == exc.msg
    assert to_http(cases[0][0])[1] == {"detail": [{"msg": "bad name", "code": "error", "fields": ["name"]}]}


def test_a_raise_may_name_its_own_kind_and_code():
    from dstack.serverless.errors import ServerlessError

    e = ServerlessError(ErrorKind.INVALID, "only FAILED jobs", "invalid_state")
    assert to_http(e) == (400, error_body("only FAILED jobs", "invalid_state"))
    assert not hasattr(e, "status")  # the kind, never an HTTP status
    plain = DomainError("x")
    assert (plain.kind, plain.code) == (ErrorKind.INVALID, "error")


def test_bugs_answer_without_details():
    assert server_error() == (500, {"detail": [{"msg": "internal server error", "code": "server_error"}]})
