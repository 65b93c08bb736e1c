"""The Slurm backend's pure parts: sinfo lines to offers, resources to sbatch options, Slurm's
states to dstack's reasons, and the server refusing a bad config.yml at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dstack.core.models.resources import ResourcesSpec
from dstack.core.models.runs import JobTerminationReason
from dstack.server.backends.slurm.config import SlurmBackendConfig
from dstack.server.backends.slurm.jobs import batch_script, format_time, parse_scontrol_job, sbatch_options
from dstack.server.backends.slurm.offers import parse_gres, parse_sinfo, shapes

SINFO = """\
gpu1|gpu|64|512000|gpu:a100:8(S:0-1)|mix
gpu2|gpu|64|512000|gpu:a100:8(S:0-1)|idle
gpu3|gpu|64|512000|gpu:a100:8(S:0-1)|drain
cpu1|cpu*|32|128000|(null)|alloc
cpu2|cpu*|32|128000|(null)|down*
garbage line
cpu3|cpu*|x|128000|(null)|idle
"""


def test_gres_forms() -> None:
    assert parse_gres("gpu:a100:8(S:0-1)") == ("a100", 8)
    assert parse_gres("gpu:2") == (None, 2)
    assert parse_gres("craynetwork:4,gpu:h100:4") == ("h100", 4)
    assert parse_gres("(null)") == (None, 0)


def test_sinfo_to_shapes() -> None:
    nodes = parse_sinfo(SINFO)
    assert [n.name for n in nodes] == ["gpu1", "gpu2", "gpu3", "cpu1", "cpu2"]  # malformed lines skipped
    found = {s.partition: s for s in shapes(nodes)}
    assert set(found) == {"gpu", "cpu"}  # `*` (default partition) stripped
    gpu = found["gpu"]
    assert gpu.nodes == ["gpu1", "gpu2"] and gpu.available == 2  # the drained node is left out
    assert len(gpu.resources.gpus) == 8 and gpu.resources.gpus[0]["name"] == "a100"
    cpu = found["cpu"]
    assert cpu.nodes == ["cpu1"] and cpu.available == 0  # down left out; alloc counts but is busy
    assert cpu.offer().availability == "busy" and cpu.offer().backend == "slurm" and cpu.offer().region == "cpu"
    assert [s.partition for s in shapes(nodes, ["cpu"])] == ["cpu"]


def test_sbatch_options_from_resources() -> None:
    spec = ResourcesSpec.model_validate({"cpu": "4..8", "memory": "16GB..", "gpu": "A100:2"})
    conf = SlurmBackendConfig(account="ml", qos="high")
    opts = sbatch_options(
        spec, conf, partition="gpu", job_name="dstack-x", output="/s/out", max_duration=3 * 86400 + 61, gpu_type="a100"
    )
    assert "--cpus-per-task=4" in opts and "--mem=16384M" in opts and "--gres=gpu:a100:2" in opts
    assert "--time=3-00:02:00" in opts  # rounded up to whole minutes
    assert "--account=ml" in opts and "--qos=high" in opts and "--partition=gpu" in opts
    plain = sbatch_options(
        ResourcesSpec.model_validate({"cpu": 1, "memory": "1GB"}),
        SlurmBackendConfig(),
        partition="p",
        job_name="j",
        output="/o",
    )
    assert not any(o.startswith(("--gres", "--time", "--account", "--qos")) for o in plain)
    assert format_time(1) == "0-00:01:00" and format_time(3600) == "0-01:00:00"


def test_batch_script_quotes_paths() -> None:
    script = batch_script("/usr/bin/python3", "/a b", "/shared/jobs/x y/home", "/shared/jobs/x y/token")
    assert "--home '/shared/jobs/x y/home' --token-file '/shared/jobs/x y/token'" in script
    assert "export PYTHONPATH='/a b'" in script
    assert "trap" in script  # SIGTERM is passed to the agent


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ("COMPLETED", JobTerminationReason.DONE_BY_RUNNER),
        ("NODE_FAIL", JobTerminationReason.INSTANCE_UNREACHABLE),
        ("PREEMPTED", JobTerminationReason.INTERRUPTED_BY_NO_CAPACITY),
        ("TIMEOUT", JobTerminationReason.MAX_DURATION_EXCEEDED),
        ("OUT_OF_MEMORY", JobTerminationReason.CONTAINER_EXITED_WITH_ERROR),
        ("BOOT_FAIL", JobTerminationReason.FAILED_TO_START_DUE_TO_NO_CAPACITY),
        ("CANCELLED", JobTerminationReason.TERMINATED_BY_SERVER),
    ],
)
def test_end_states(state: str, reason: JobTerminationReason) -> None:
    st = parse_scontrol_job(f"JobId=7 JobName=x JobState={state} Reason=None NodeList=sn1 ExitCode=0:0")
    assert st is not None and st.final and st.termination_reason() == reason
    assert st.nodes == ["sn1"]


def test_node_failure_and_preemption_are_retried_on_their_events() -> None:
    assert JobTerminationReason.INSTANCE_UNREACHABLE.retry_event() == "interruption"
    assert JobTerminationReason.FAILED_TO_START_DUE_TO_NO_CAPACITY.retry_event() == "no-capacity"


def test_pending_message_and_unknown_job() -> None:
    st = parse_scontrol_job("JobId=12 JobState=PENDING Reason=Priority NodeList=(null)")
    assert st is not None and st.pending and not st.final and st.nodes == []
    assert st.message() == "Slurm job 12 PENDING (Priority)"
    assert parse_scontrol_job("") is None


@pytest.mark.slow
def test_server_refuses_to_start_on_a_bad_config(tmp_path: Path) -> None:
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "config.yml").write_text(
        "projects:\n  - name: main\n    backends:\n      - type: slurm\n        qos: 'a b'\n"
    )
    env = {**os.environ, "DSTACK_HOME": str(tmp_path)}
    r = subprocess.run(
        [sys.executable, "-m", "dstack.cli.main", "server", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert f"{tmp_path / 'server' / 'config.yml'}:5: projects[0].backends[0].qos" in r.stdout + r.stderr


def test_multi_node_batch_script_runs_an_agent_per_node() -> None:
    script = batch_script("/usr/bin/python3", "/src", "/shared/jobs/x/home", "/shared/jobs/x/token", nodes=3)
    assert "srun --nodes=3 --ntasks=3 --ntasks-per-node=1" in script
    assert '/shared/jobs/x/home/"$SLURM_PROCID"' in script  # one agent home per rank
    single = batch_script("/usr/bin/python3", "/src", "/shared/jobs/x/home", "/shared/jobs/x/token")
    assert "srun" not in single  # one node: the agent runs in the batch step itself
