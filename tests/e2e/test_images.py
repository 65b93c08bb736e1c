"""Tasks with an `image:` end to end: the real server, its local agent, podman, and the Python API."""

import pytest

from dstack.api import Resources, RunStatus, Task
from dstack.core.models.runs import JobStatus
from tests.images import ensure_test_image


@pytest.fixture(scope="session")
def image() -> str:
    return ensure_test_image()


def test_image_task_runs_in_a_container(client, image, tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "data.txt").write_text("from the repo\n")
    task = Task(
        image=image,
        commands=[
            "cat data.txt",
            "pwd",
            'echo "run=$DSTACK_RUN_NAME my=$MY_VAR"',
            "test -x /bin/busybox && echo busybox",
        ],
        env={"MY_VAR": "set"},
        resources=Resources(cpu=1, memory="0.5GB"),
    )
    run = client.runs.submit(task, run_name="image-task", repo_dir=tmp_path / "repo")
    output = b"".join(run.logs()).decode()
    run.refresh()
    assert run.status == RunStatus.DONE, (run.status, run.error, output)
    assert output.splitlines() == ["from the repo", "/workflow", "run=image-task my=set", "busybox"]
    assert run.jobs[0].job_submissions[-1].status == JobStatus.DONE
