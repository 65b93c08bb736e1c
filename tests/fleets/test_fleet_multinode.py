"""`nodes: 2` on a `placement: cluster` fleet: one node per host, the ranks reach each other over
TCP on the hosts' internal addresses through DSTACK_MASTER_NODE_IP, and the run is the master's."""

import pytest

from dstack.api import Resources, RunStatus, Task
from tests.conftest import running_server
from tests.fleets.hosts import apply_fleet
from tests.multinode import ranks_script

pytestmark = pytest.mark.slow
SMALL = Resources(cpu="0..", memory="0.1GB..", disk="1GB..")

SCRIPT = ranks_script(29477)  # tests/multinode.py


def test_two_nodes_on_two_hosts(host_net, tmp_path):
    h0, h1 = host_net.hosts[:2]
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "ranks.py").write_text(SCRIPT)
    with running_server(tmp_path) as srv:
        client = srv.client()
        apply_fleet(client, host_net, "cl", [h0, h1], placement="cluster")
        task = Task(commands=["python3 ranks.py"], nodes=2, fleets=["cl"], resources=SMALL)
        run = client.runs.submit(task, run_name="two-nodes", repo_dir=repo)
        output = b"".join(run.logs()).decode()
        run.refresh()
        assert run.status == RunStatus.DONE, (run.status, run.error, output)
        hosts = {j.job_submissions[-1].job_provisioning_data.hostname for j in run.jobs}
        assert hosts == {h0.address, h1.address}  # one node per host
        first = output.splitlines()[0]
        assert first.startswith("rank=0 ") and "nodes=2" in first, output
        master_host = first.split("host=")[1].split()[0]
        got = [line for line in output.splitlines() if line.startswith("got: hello from ")]
        assert got and got[0].split()[-1] in {"h0", "h1"} and got[0].split()[-1] != master_host, output
        ips = first.split("ips=")[1].split(",")
        assert sorted(ips) == sorted([h0.address, h1.address])
        client.fleets.delete("cl")
