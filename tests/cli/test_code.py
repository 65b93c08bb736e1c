"""Code archives: ignore files at every level, determinism, symlinks, the size limit."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from dstack.api.code import CodeTooLargeError, archive_code


def _names(blob: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        return tar.getnames()


def _write(root: Path, rel: str, data: str | bytes = "x") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    _write(root, "main.py", "print('hi')\n")
    _write(root, ".gitignore", "*.log\nbuild/\n/top-only.txt\n")
    _write(root, "top-only.txt")
    _write(root, "app.log")
    _write(root, "build/out.bin")
    _write(root, "src/pkg/__init__.py")
    _write(root, "src/pkg/top-only.txt")  # anchored pattern at the root does not reach here
    _write(root, "src/.gitignore", "secret.txt\n")
    _write(root, "src/secret.txt")
    _write(root, "src/pkg/secret.txt")
    _write(root, "src/pkg/.gitignore", "!keep.log\n")
    _write(root, "src/pkg/keep.log")
    _write(root, "src/pkg/drop.log")
    _write(root, "other/secret.txt")  # src/.gitignore does not apply outside src/
    _write(root, ".git/HEAD")
    _write(root, ".venv/bin/python")
    _write(root, "src/pkg/__pycache__/m.cpython-311.pyc")
    _write(root, "data/big.csv")
    _write(root, ".dstackignore", "data/\n")
    return root


def test_gitignore_at_every_level_and_dstackignore(tree: Path) -> None:
    blob, digest = archive_code(tree)
    names = _names(blob)
    assert set(names) == {
        ".dstackignore",
        ".gitignore",
        "main.py",
        "other/secret.txt",
        "src/.gitignore",
        "src/pkg/.gitignore",
        "src/pkg/__init__.py",
        "src/pkg/keep.log",
        "src/pkg/top-only.txt",
    }
    assert len(digest) == 64


def test_deterministic(tree: Path) -> None:
    blob1, h1 = archive_code(tree)
    # Touch every file: new mtimes must not change the archive.
    for dirpath, _, files in os.walk(tree):
        for f in files:
            os.utime(os.path.join(dirpath, f), (1_000_000, 1_000_000))
    blob2, h2 = archive_code(tree)
    assert h1 == h2 and blob1 == blob2
    with tarfile.open(fileobj=io.BytesIO(blob1), mode="r:gz") as tar:
        for m in tar.getmembers():
            assert m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == ""


def test_content_change_changes_hash(tree: Path) -> None:
    _, h1 = archive_code(tree)
    (tree / "main.py").write_text("print('bye')\n")
    _, h2 = archive_code(tree)
    assert h1 != h2
    (tree / "app.log").write_text("ignored files do not count")
    _, h3 = archive_code(tree)
    assert h3 == h2


def test_symlinks_kept_as_links_and_exec_bit(tmp_path: Path) -> None:
    _write(tmp_path, "real/file.txt", "content")
    os.symlink("real/file.txt", tmp_path / "link.txt")
    os.symlink("real", tmp_path / "dirlink")
    script = _write(tmp_path, "run.sh", "#!/bin/sh\n")
    script.chmod(0o755)
    blob, _ = archive_code(tmp_path)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["link.txt"].issym() and members["link.txt"].linkname == "real/file.txt"
    assert members["dirlink"].issym() and "dirlink/file.txt" not in members
    assert members["run.sh"].mode == 0o755
    assert members["real/file.txt"].mode == 0o644


def test_too_large_names_largest_files(tmp_path: Path) -> None:
    for i in range(7):
        _write(tmp_path, f"blob{i}.bin", os.urandom(20_000 * (i + 1)))
    _write(tmp_path, "small.txt", "tiny")
    with pytest.raises(CodeTooLargeError) as info:
        archive_code(tmp_path, max_size=100_000)
    msg = str(info.value)
    for i in range(2, 7):  # top 5 by size
        assert f"blob{i}.bin" in msg
    assert "blob0.bin" not in msg and "small.txt" not in msg
    assert ".gitignore" in msg and ".dstackignore" in msg
    assert info.value.largest[0] == ("blob6.bin", 140_000)


def test_parent_gitignore_inside_git_repo(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    _write(tmp_path, ".gitignore", "*.tmp\nsub/ignored_dir/\n")
    _write(tmp_path, "sub/a.py")
    _write(tmp_path, "sub/b.tmp")
    _write(tmp_path, "sub/ignored_dir/c.py")
    blob, _ = archive_code(tmp_path / "sub")
    assert _names(blob) == ["a.py"]


def test_empty_dir_and_many_files_fast(tmp_path: Path) -> None:
    import time

    blob, _ = archive_code(tmp_path)
    assert _names(blob) == []
    for d in range(30):
        for f in range(100):
            _write(tmp_path, f"d{d:02}/f{f:03}.py", f"x = {f}\n")
    _write(tmp_path, ".gitignore", "d0*/\n")
    start = time.perf_counter()
    blob, _ = archive_code(tmp_path)
    elapsed = time.perf_counter() - start
    assert len(_names(blob)) == 2000 + 1
    assert elapsed < 10  # generous: guards against pathological slowness only
