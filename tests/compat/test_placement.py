"""`backends`, `regions`, `spot_policy` and `max_price` filter offers: in plans and in placement."""

import httpx

from dstack.core.models.configurations import parse_run_configuration
from dstack.server.services.offers import placement_mismatch


def _task(**fields):
    return parse_run_configuration({"type": "task", "commands": ["true"], **fields})


def test_placement_filters_offers():
    local = ("local", "local", 0.0)
    assert placement_mismatch(_task(), *local) is None
    assert placement_mismatch(_task(backends=["local"]), *local) is None
    assert placement_mismatch(_task(backends=["remote"]), *local) is None  # dstack's name for hosts it did not create
    assert "backend 'local'" in placement_mismatch(_task(backends=["aws"]), *local)
    assert placement_mismatch(_task(regions=["LOCAL"]), *local) is None
    assert "region 'local'" in placement_mismatch(_task(regions=["eu-west-1"]), *local)
    assert placement_mismatch(_task(spot_policy="auto"), *local) is None
    assert placement_mismatch(_task(spot_policy="on-demand"), *local) is None
    assert "on-demand" in placement_mismatch(_task(spot_policy="spot"), *local)
    assert placement_mismatch(_task(spot_policy="spot"), "local", "local", 0.0, spot=True) is None
    assert placement_mismatch(_task(max_price=0.5), "ssh", "eu", 0.5) is None
    assert "above max_price" in placement_mismatch(_task(max_price=0.5), "ssh", "eu", 0.51)


def test_plan_shows_why_placement_rules_out_every_host(server):
    def plan(**fields):
        conf = {"type": "task", "commands": ["true"], "resources": {"cpu": "1..", "memory": "0..", "disk": "0.."}}
        r = httpx.post(
            f"{server.url}/api/project/main/runs/get_plan",
            headers=server.headers,
            json={"run_spec": {"configuration": {**conf, **fields}}},
        )
        r.raise_for_status()
        return r.json()["job_plans"][0]

    assert plan()["offers"]
    for fields, why in (
        ({"backends": ["aws"]}, "is not in backends"),
        ({"regions": ["mars"]}, "is not in regions"),
        ({"spot_policy": "spot"}, "spot_policy is spot"),
    ):
        p = plan(**fields)
        assert p["offers"] == [] and why in p["no_offers_reason"], (fields, p)
    assert plan(backends=["remote"], regions=["local"], spot_policy="on-demand", max_price=1)["offers"]
