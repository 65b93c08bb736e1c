"""Services' `rate_limits`: token buckets per client key and path prefix; 429 with Retry-After."""

from __future__ import annotations

import time

import httpx
import pytest

from dstack.core.models.configurations import parse_run_configuration
from dstack.proxy import Replica, ServiceInfo
from dstack.proxy.gateway import parse_service
from dstack.proxy.ratelimit import RateLimiter, RateLimitRule, pick_rule, retry_after_header

AUTH = {"Authorization": "Bearer good"}
SVC = ("main", "svc")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_burst_then_refills_at_rps():
    clock = Clock()
    limiter = RateLimiter(clock)
    rules = (RateLimitRule(prefix="/", rps=2, burst=3),)
    passed = [limiter.check(SVC, rules, "/x", "10.0.0.1", {}) for _ in range(6)]
    assert passed[:4] == [None] * 4  # 1 + burst
    assert passed[4] == pytest.approx(0.5) and passed[5] == pytest.approx(0.5)
    clock.now += 0.5  # one token back
    assert limiter.check(SVC, rules, "/x", "10.0.0.1", {}) is None
    assert limiter.check(SVC, rules, "/x", "10.0.0.1", {}) is not None
    assert limiter.check(SVC, rules, "/x", "10.0.0.2", {}) is None  # another client, its own bucket
    assert limiter.check(("main", "other"), rules, "/x", "10.0.0.1", {}) is None  # another service


def test_longest_prefix_wins_and_header_keys():
    rules = (
        RateLimitRule(prefix="/", rps=100, burst=100),
        RateLimitRule(prefix="/v1/chat", rps=1, key="header", header="X-API-Key"),
        RateLimitRule(prefix="/v1", rps=1),
    )
    assert pick_rule(rules, "/v1/chat/completions") == (1, rules[1])
    assert pick_rule(rules, "/v1/models") == (2, rules[2])
    assert pick_rule(rules, "/health") == (0, rules[0])
    assert pick_rule(rules[1:], "/health") is None
    limiter = RateLimiter(Clock())
    for key in ("a", "b"):
        assert limiter.check(SVC, rules, "/v1/chat/completions", "ip", {"x-api-key": key}) is None
    assert limiter.check(SVC, rules, "/v1/chat/completions", "other-ip", {"x-api-key": "a"}) is not None
    assert retry_after_header(0.2) == b"1" and retry_after_header(1.01) == b"2"


def test_buckets_are_bounded():
    limiter = RateLimiter(Clock(), max_buckets=10)
    rules = (RateLimitRule(prefix="/", rps=1),)
    for i in range(100):
        limiter.check(SVC, rules, "/", f"10.0.0.{i}", {})
    assert len(limiter._buckets) == 10


def test_configuration_rules_reach_the_gateway_form():
    conf = parse_run_configuration(
        {
            "type": "service",
            "commands": ["serve"],
            "port": 8000,
            "rate_limits": [{"prefix": "/v1", "rps": 5, "burst": 2, "key": {"type": "header", "header": "X-K"}}],
        }
    )
    (r,) = conf.rate_limits
    rule = RateLimitRule(prefix=r.prefix, rps=r.rps, burst=r.burst, key=r.key.type, header=r.key.header)
    info = parse_service({"project": "p", "run_name": "r", "rate_limits": [rule.__dict__]})
    assert info.rate_limits == (rule,)


@pytest.mark.slow
def test_burst_gets_429_with_retry_after(harness, upstreams):
    rules = (RateLimitRule(prefix="/limited", rps=2, burst=4),)
    harness.call(harness.registry.upsert_service, ServiceInfo(project="main", run_name="rl", rate_limits=rules))
    harness.call(harness.registry.set_replicas, "main", "rl", [Replica("a", upstreams["a"].url)])
    base = f"{harness.url}/proxy/services/main/rl"
    with httpx.Client() as c:
        codes = [c.get(f"{base}/limited/x", headers=AUTH) for _ in range(12)]
        ok = [r for r in codes if r.status_code == 200]
        limited = [r for r in codes if r.status_code == 429]
        # 1 + burst pass at once; a few more may pass as tokens refill during the burst
        assert 5 <= len(ok) <= 7 and len(ok) + len(limited) == 12, [r.status_code for r in codes]
        assert all(r.headers["retry-after"] == "1" and "rate limit" in r.json()["detail"] for r in limited)
        assert c.get(f"{base}/free", headers=AUTH).status_code == 200  # outside the prefix
        time.sleep(float(limited[-1].headers["retry-after"]))  # honoured: the next request passes
        assert c.get(f"{base}/limited/x", headers=AUTH).status_code == 200
