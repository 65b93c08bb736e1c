"""Workers the server does not count get no jobs: neither an id it never launched nor one it
already logged as gone (issue 10: such workers used to be adopted and kept taking jobs)."""

from .helpers import wait_until
from .test_no_duplicates import _hand_server, _next_worker


def test_unknown_and_forgotten_workers_get_no_jobs(tmp_path):
    srv = _hand_server(tmp_path)
    seen: set[str] = set()
    try:
        a = _next_worker(srv, seen)
        job = srv.run("ep-hand", {"n": 1})
        # An id the server never launched, holding the endpoint's valid worker token.
        ghost = "ep-hand-ghost"
        ghost_take = a.take_url.replace(a.id, ghost)
        assert a.client.get(ghost_take).status_code == 204
        assert a.client.get(f"{srv.url}/v2/ep-hand/ping/{ghost}?src=dstack").status_code == 200
        assert a.client.get(ghost_take).status_code == 204  # a heartbeat did not make it a worker either
        assert srv.status("ep-hand", job)["status"] == "IN_QUEUE"
        assert srv.health("ep-hand")["workers"]["ready"] <= 1

        # The launched worker takes it; then it falls silent, is logged as lost, and forgotten.
        assert a.take()["id"] == job
        srv.wait("ep-hand", job, ("IN_QUEUE",), timeout=30)
        wait_until(lambda: srv.health("ep-hand")["workers"]["unhealthy"] == 1, timeout=30, what="a counted as lost")
        wait_until(
            lambda: srv.health("ep-hand")["workers"]["unhealthy"] == 0, timeout=90, interval=0.5, what="a forgotten"
        )
        # It comes back and asks for work: none for it, though the job is queued.
        assert a.client.get(a.take_url).status_code == 204
        assert srv.status("ep-hand", job)["status"] == "IN_QUEUE"
        b = _next_worker(srv, seen)  # its counted replacement gets the job
        assert b.take()["id"] == job
    finally:
        srv.close()
