"""`files:` from dstack's official client (0.22.5): it uploads each entry as an archive
(`/api/files/upload_archive`) and names them in `RunSpec.file_archives`; the job must see them.

The module's server has a 1 MiB upload limit (DSTACK_SERVER_CODE_UPLOAD_LIMIT), so a larger entry
is refused with the limit's name.
"""

import os
import textwrap
import time

import httpx
import pytest

from tests.compat.official import OfficialClient
from tests.conftest import running_server

LIMIT = 1024 * 1024


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request, tmp_path_factory):
    with running_server(
        tmp_path_factory.mktemp("server"), request.param, DSTACK_SERVER_CODE_UPLOAD_LIMIT=str(LIMIT)
    ) as srv:
        yield srv


def _wait_finished(server, name: str, timeout: float = 90) -> dict:
    deadline = time.time() + timeout
    while True:
        r = httpx.post(f"{server.url}/api/project/main/runs/get", headers=server.headers, json={"run_name": name})
        r.raise_for_status()
        run = r.json()
        if run["status"] in ("done", "failed", "terminated"):
            return run
        assert time.time() < deadline, f"run {name} still {run['status']}"
        time.sleep(0.5)


def _conf(tmp_path, name: str, files: list[str], commands: list[str]):
    body = f"type: task\nname: {name}\nfiles:\n"
    body += "".join(f"  - {f}\n" for f in files)
    body += "commands:\n" + "".join(f"  - {c}\n" for c in commands)
    path = tmp_path / f"{name}.dstack.yml"
    path.write_text(body)
    return path


def test_files_reach_the_job(official: OfficialClient, server, tmp_path):
    (tmp_path / "local_dir" / "nested").mkdir(parents=True)
    (tmp_path / "local_dir" / "nested" / "a.txt").write_text("from a directory\n")
    (tmp_path / "file.txt").write_text("a single file\n")
    conf = _conf(
        tmp_path,
        "official-files",
        ["local_dir:/workflow/some/path", "file.txt"],
        ["cat some/path/nested/a.txt", "cat file.txt"],
    )
    official.cli("apply", "-f", str(conf), "-y", "-d", cwd=tmp_path)
    run = _wait_finished(server, "official-files")
    assert run["status"] == "done", run
    logs = official.cli("logs", "official-files").stdout
    assert logs.splitlines()[-2:] == ["from a directory", "a single file"]
    # the same content again: stored once per user and hash, the same id
    first = httpx.post(
        f"{server.url}/api/files/upload_archive", headers=server.headers, files={"file": ("h", b"\0" * 1024)}
    )
    again = httpx.post(
        f"{server.url}/api/files/upload_archive", headers=server.headers, files={"file": ("h", b"\0" * 1024)}
    )
    assert first.status_code == 200, first.text
    assert again.json() == first.json()
    by_hash = httpx.post(
        f"{server.url}/api/files/get_archive_by_hash", headers=server.headers, json={"hash": first.json()["hash"]}
    )
    assert by_hash.json() == first.json()


def test_files_reach_an_image_job(official: OfficialClient, server, tmp_path):
    from tests.images import ensure_test_image

    image = ensure_test_image()  # skips, saying why, without podman
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "b.txt").write_text("in the container\n")
    conf = _conf(tmp_path, "official-files-image", ["cfg:/workflow/etc/cfg"], ["cat /workflow/etc/cfg/b.txt"])
    conf.write_text(f"image: {image}\n" + conf.read_text())
    official.cli("apply", "-f", str(conf), "-y", "-d", cwd=tmp_path)
    run = _wait_finished(server, "official-files-image")
    assert run["status"] == "done", run
    assert official.cli("logs", "official-files-image").stdout.splitlines()[-1] == "in the container"


def test_too_large_archive_is_refused(official: OfficialClient, server, tmp_path):
    (tmp_path / "big.bin").write_bytes(os.urandom(LIMIT + 4096))
    conf = _conf(tmp_path, "official-big", ["big.bin"], ["echo never"])
    r = official.cli("apply", "-f", str(conf), "-y", "-d", cwd=tmp_path, check=False)
    assert r.returncode != 0
    assert "DSTACK_SERVER_CODE_UPLOAD_LIMIT" in r.stdout + r.stderr
    direct = httpx.post(
        f"{server.url}/api/files/upload_archive",
        headers=server.headers,
        files={"file": ("h", os.urandom(LIMIT + 1))},
    )
    assert 400 <= direct.status_code < 500 and "DSTACK_SERVER_CODE_UPLOAD_LIMIT" in direct.text, direct.text


def test_unsupported_job_paths_are_refused_by_name(official: OfficialClient, server, tmp_path):
    (tmp_path / "x.txt").write_text("x\n")
    for path in ("/etc/x.txt", "~/x.txt"):
        conf = _conf(tmp_path, "official-abs", [f"x.txt:{path}"], ["echo never"])
        r = official.cli("apply", "-f", str(conf), "-y", "-d", cwd=tmp_path, check=False)
        assert r.returncode != 0
        assert path in textwrap.dedent(r.stdout + r.stderr), r.stdout + r.stderr
    unauth = httpx.post(f"{server.url}/api/files/upload_archive", files={"file": ("h", b"x")})
    assert unauth.status_code in (401, 403)
    # an archive nobody uploaded (or another user's) is refused by id
    spec = {
        "configuration": {"type": "task", "commands": ["echo x"], "files": ["x.txt"]},
        "file_archives": [{"id": "00000000-0000-0000-0000-000000000000", "path": "x.txt"}],
    }
    r = httpx.post(f"{server.url}/api/project/main/runs/submit", json={"run_spec": spec}, headers=server.headers)
    assert r.status_code == 400 and "00000000-0000-0000-0000-000000000000" in r.text, r.text


def _tar(members: dict[str, bytes | None]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_merge_reroots_each_archive_at_its_path():
    import io
    import tarfile

    from dstack.server.errors import InvalidRequest
    from dstack.server.services.file_archives import job_path, merge

    code = _tar({"main.py": b"code"})
    dir_archive = _tar({"local_dir": None, "local_dir/nested/a.txt": b"a"})
    file_archive = _tar({"file.txt": b"f"})
    merged = merge(code, [(job_path("/workflow/some/path"), dir_archive), (job_path("file.txt"), file_archive)])
    with tarfile.open(fileobj=io.BytesIO(merged), mode="r:*") as t:
        got = {m.name: (t.extractfile(m).read() if m.isreg() else None) for m in t}
    assert got == {"main.py": b"code", "some/path": None, "some/path/nested/a.txt": b"a", "file.txt": b"f"}
    assert merge(code, []) == code
    for bad in ("/etc/x", "~/x", "../x"):
        with pytest.raises(InvalidRequest, match="x"):
            job_path(bad)
