"""Queue-driven scaling with real worker processes: 0 → 1 → 3 (the max) → 0."""

import time

from .helpers import wait_until


def _live(h):
    w = h["workers"]
    return w["initializing"] + w["idle"] + w["running"]


def test_scale_zero_one_three_zero(server):
    ep = "ep-scale"
    assert _live(server.health(ep)) == 0
    first = server.run(ep, {"mode": "sleep", "seconds": 1})
    wait_until(lambda: _live(server.health(ep)) == 1, timeout=5, what="first worker")
    assert server.wait(ep, first, timeout=30)["status"] == "COMPLETED"
    jobs = [server.run(ep, {"mode": "sleep", "seconds": 1.5}) for _ in range(8)]
    peak = 0
    deadline = time.time() + 60
    while time.time() < deadline:
        h = server.health(ep)
        peak = max(peak, _live(h))
        assert _live(h) <= 3  # request_count 2 wants 4, the max is 3
        if h["jobs"]["inQueue"] == 0 and h["jobs"]["inProgress"] == 0:
            break
        time.sleep(0.1)
    assert peak == 3
    results = [server.status(ep, j) for j in jobs]
    assert all(r["status"] == "COMPLETED" for r in results)
    assert len({r["workerId"] for r in results}) >= 2
    # idle_timeout 1 s: back to zero
    wait_until(
        lambda: _live(server.health(ep)) == 0 and sum(server.health(ep)["workers"].values()) == 0,
        timeout=20,
        what="scale to zero",
    )
