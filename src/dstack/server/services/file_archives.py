"""`files:` of dstack's official client, put into the job's code archive at provisioning.

Its client tars each entry with the entry's own name as the top component (`data/`, `data/x`, or
`notes.txt`) and uploads it (routers.files); the run spec names each archive with its job path. Here
each archive's members are re-rooted at that path (relative to the repo directory, as
`core.models.files` defines it) and appended to the code archive, so the agent extracts them with
the code's safe extraction and budget, for host and image jobs alike.
"""

import gzip
import io
import tarfile

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.models.files import parse_file_mapping
from dstack.core.models.runs import RunSpec
from dstack.server.errors import InvalidRequest
from dstack.server.models import FileArchiveModel


def job_path(path: str) -> str:
    """The mapping's job path relative to the repo directory; refused by name like the configuration's."""
    if path.startswith("~"):
        raise InvalidRequest(
            f"files: job path {path!r} is under the home directory, which is not supported yet"
            " (give a path relative to the repo directory)",
            fields=["file_archives"],
        )
    try:
        return parse_file_mapping({"local_path": "-", "path": path}).path
    except ValueError as e:
        raise InvalidRequest(str(e), fields=["file_archives"]) from None


async def check_archives(session: AsyncSession, user_id: str, run_spec: RunSpec, max_bytes: int | None) -> None:
    """At submission: every named archive was uploaded by this user, its path is supported, and
    together they fit the code's extraction limit (else the merge at provisioning could not)."""
    ids = {a.id for a in run_spec.file_archives}
    for a in run_spec.file_archives:
        job_path(a.path)
    rows = (
        await session.execute(
            select(FileArchiveModel.id, func.length(FileArchiveModel.blob)).where(
                FileArchiveModel.id.in_(ids), FileArchiveModel.user_id == user_id
            )
        )
    ).all()
    missing = sorted(ids - {r[0] for r in rows})
    if missing:
        raise InvalidRequest(f"file_archives: no uploaded file archive {missing[0]}", fields=["file_archives"])
    total = sum(int(r[1]) for r in rows)
    if max_bytes is not None and total > max_bytes:
        raise InvalidRequest(
            f"files: the archives total {total} bytes, more than the {max_bytes} bytes a job's code may extract to "
            "(DSTACK_SERVER_CODE_EXTRACTED_LIMIT)",
            fields=["file_archives"],
        )


async def archive_blobs(session: AsyncSession, run_spec: RunSpec) -> list[tuple[str, bytes]]:
    """(job path relative to the repo directory, archive) for each of the run's `files:` archives."""
    out = []
    for a in run_spec.file_archives:
        blob = (
            await session.execute(select(FileArchiveModel.blob).where(FileArchiveModel.id == a.id))
        ).scalar_one_or_none()
        if blob is None:
            raise InvalidRequest(f"file archive {a.id} no longer exists", fields=["file_archives"])
        out.append((job_path(a.path), blob))
    return out


def _reroot(name: str, rel: str) -> str:
    parts = name.strip("/").split("/", 1)
    return rel if len(parts) == 1 or not parts[1] else f"{rel}/{parts[1]}"


def merge(code: bytes, archives: list[tuple[str, bytes]]) -> bytes:
    """The code archive (tar, maybe compressed, maybe empty) with each archive's members appended
    under its job path, as one gzip'd tar. Member names are only renamed here: the agent's
    safe extraction still refuses anything that would leave the repo directory."""
    if not archives:
        return code
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as out:
            if code:
                with tarfile.open(fileobj=io.BytesIO(code), mode="r:*") as src:
                    for m in src:
                        out.addfile(m, src.extractfile(m) if m.isreg() else None)
            for rel, blob in archives:
                with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as src:
                    for m in src:
                        data = src.extractfile(m) if m.isreg() else None
                        m.name = _reroot(m.name, rel)
                        if m.islnk():
                            m.linkname = _reroot(m.linkname, rel)
                        out.addfile(m, data)
    return buf.getvalue()
