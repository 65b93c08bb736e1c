"""A tiny local container image for the container tests: busybox-static, built with ``podman import``.

There is no registry to pull from, so the image is built from a root filesystem tarball: the
static busybox binary plus its applet links in ``/bin`` (so ``/bin/sh`` exists, bash does not).
Building is idempotent: an image carrying this module's label version is reused.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import tarfile

import pytest

TEST_IMAGE = "localhost/dstack-test-busybox"
IMAGE_VERSION = "1"  # bump when the image's content changes
DEFAULT_CMD_OUTPUT = "dstack-test-image default command"
_RUN_FLAGS = ["--rm", "--network", "host"]

_state: dict[str, str] = {}


def _podman() -> list[str]:
    """podman with the same runtime and limits the agent uses on this host."""
    from dstack.agent import containers

    if shutil.which("podman") is None:
        pytest.skip("podman is not installed on this machine")
    rt = containers.detect()
    if rt is None or rt.kind != "podman":
        pytest.skip(f"the agent would not use podman here: {containers.why_unavailable()}")
    return rt.global_args + ["run", *[a for limit in rt.ulimits for a in ("--ulimit", limit)]]


def _rootfs_tar(busybox: str) -> bytes:
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d, mode in (
            ("bin", 0o755),
            ("tmp", 0o1777),
            ("etc", 0o755),
            ("root", 0o700),
            ("proc", 0o555),
            ("sys", 0o555),
            ("dev", 0o755),
        ):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        with open(busybox, "rb") as f:
            data = f.read()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
        for name in applets:
            if name in ("busybox", "bash"):
                continue
            link = tarfile.TarInfo(f"bin/{name}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    return buf.getvalue()


def _is_static(path: str) -> bool:
    """An ELF64 little-endian binary with no program interpreter (PT_INTERP) segment."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:6] != b"\x7fELF\x02\x01":
            return False
        phoff, phentsize, phnum = struct.unpack_from("<Q", head, 32)[0], *struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def _label(podman: str) -> str:
    out = subprocess.run(
        [podman, "image", "inspect", "--format", '{{index .Labels "dstack.test-image"}}', TEST_IMAGE],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() if out.returncode == 0 else ""


def ensure_test_image() -> str:
    """Build (or reuse) the test image and check a container runs; skips the test where it cannot."""
    if "error" in _state:
        pytest.skip(_state["error"])
    if "image" in _state:
        return _state["image"]
    run = _podman()
    podman = run[0]
    if _label(podman) != IMAGE_VERSION:
        busybox = shutil.which("busybox")
        if busybox is None or not _is_static(busybox):
            _state["error"] = "building the test image needs a static busybox (apt-get install busybox-static)"
            pytest.skip(_state["error"])
        imported = subprocess.run(
            [
                podman,
                "import",
                "--change",
                f"LABEL dstack.test-image={IMAGE_VERSION}",
                "--change",
                f'CMD ["/bin/echo", "{DEFAULT_CMD_OUTPUT}"]',
                "-",
                TEST_IMAGE,
            ],
            input=_rootfs_tar(busybox),
            capture_output=True,
            timeout=120,
        )
        if imported.returncode != 0:
            _state["error"] = f"podman cannot import the test image on this machine: {imported.stderr.decode()[-500:]}"
            pytest.skip(_state["error"])
    trial = subprocess.run(
        [*run, *_RUN_FLAGS, TEST_IMAGE, "/bin/sh", "-c", "echo ok"], capture_output=True, text=True, timeout=120
    )
    if trial.returncode != 0 or trial.stdout.strip() != "ok":
        _state["error"] = f"podman cannot run a container on this machine: {(trial.stderr or trial.stdout)[-500:]}"
        pytest.skip(_state["error"])
    _state["image"] = TEST_IMAGE
    return TEST_IMAGE
