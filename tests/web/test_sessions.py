"""Session cookies and CSRF tokens of the dashboard (no server needed)."""

import stat
from pathlib import Path

from dstack.web.sessions import MAX_AGE, SessionKeys

STATIC = Path(__file__).resolve().parents[2] / "src" / "dstack" / "web" / "static"


def test_cookie_names_the_user_and_is_bound_to_the_token_hash(tmp_path):
    keys = SessionKeys.load(tmp_path / "web-session.key")
    cookie = keys.issue("user-1", "hash-a", now=1000)
    assert "hash-a" not in cookie
    assert keys.user_id(cookie, now=1001) == "user-1"
    assert keys.verify(cookie, "hash-a")
    assert not keys.verify(cookie, "hash-b")  # a new token ends the session
    forged = "user-2" + cookie[len("user-1") :]
    assert keys.user_id(forged, now=1001) == "user-2" and not keys.verify(forged, "hash-a")
    assert keys.user_id(cookie, now=1000 + MAX_AGE + 1) is None  # expired
    for bad in (None, "", "a.b", "a.notdigits.c", "x" * 500):
        assert keys.user_id(bad, now=1001) is None


def test_key_file_is_private_and_shared_by_restarts(tmp_path):
    path = tmp_path / "dir" / "web-session.key"
    first = SessionKeys.load(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cookie = first.issue("u", "h")
    assert SessionKeys.load(path).verify(cookie, "h")
    other = SessionKeys.load(tmp_path / "other.key")
    assert not other.verify(cookie, "h")


def test_csrf_token_belongs_to_one_session(tmp_path):
    keys = SessionKeys.load(tmp_path / "k")
    a, b = keys.issue("u1", "h1"), keys.issue("u2", "h2")
    assert keys.check_csrf(a, keys.csrf(a))
    assert not keys.check_csrf(a, keys.csrf(b))
    assert not keys.check_csrf(a, None) and not keys.check_csrf(a, "")


def test_vendored_libraries_ship_with_their_licences():
    vendor = STATIC / "vendor"
    for lib, licence in (("htmx.min.js", "htmx.LICENSE"), ("uPlot.iife.min.js", "uPlot.LICENSE")):
        assert (vendor / lib).stat().st_size > 10_000
        assert "Permission" in (vendor / licence).read_text()
