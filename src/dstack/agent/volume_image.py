"""A volume's size enforced: an ext4 filesystem image of that size, loop-mounted on its directory.

Where this host can (root, `mkfs.ext4` and `mount` present), a sized volume of ours is backed by
`<volumes dir>/<id>.img`, made sparse (disk is used as data is written) with no reserved blocks,
and mounted on `<volumes dir>/<id>` by whoever needs it first: the agent before a job mounts the
volume (the host's mount survives agent and server restarts; after a reboot the next job mounts it
again). Writing past the size fails with "No space left on device". Elsewhere a volume is a plain
directory and its size is not enforced (the volume says so: `size_enforced: false`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

TIMEOUT = 120.0
MIN_BYTES = 8 * 1024 * 1024  # ext4's smallest useful filesystem


def image_path(volume_dir: Path) -> Path:
    return volume_dir.with_name(volume_dir.name + ".img")


def why_not_enforced() -> str | None:
    """Why this host cannot back a volume with an image (None: it can)."""
    if os.geteuid() != 0:
        return "not running as root (no loop mounts)"
    missing = [t for t in ("mkfs.ext4", "mount", "umount") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not found"
    return None


def create(volume_dir: Path, size_bytes: int) -> None:
    """The image of `size_bytes` (at least MIN_BYTES), formatted; `volume_dir` made as its mount point."""
    image = image_path(volume_dir)
    volume_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(max(size_bytes, MIN_BYTES))
    os.chmod(image, 0o600)
    out = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-m", "0", "-L", "dstack-volume", str(image)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if out.returncode != 0:
        image.unlink(missing_ok=True)
        raise OSError(f"mkfs.ext4 failed: {(out.stderr or out.stdout).strip()[-300:]}")


def prepare(volume_dir: Path, size_bytes: int | None) -> bool:
    """A new volume's storage: its directory (0700), and its image when sized and this host can
    enforce sizes; True when it has an image. Made already (an image or a directory): kept as is."""
    if image_path(volume_dir).exists():
        return True
    volume_dir.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    if volume_dir.exists():
        return False
    volume_dir.mkdir(mode=0o700)
    if size_bytes is None or why_not_enforced() is not None:
        return False
    create(volume_dir, size_bytes)
    return True


def ensure_mounted(volume_dir: Path) -> bool:
    """Mount the volume's image on its directory unless it is mounted; False when it has no image."""
    image = image_path(volume_dir)
    if not image.exists():
        return False
    if os.path.ismount(volume_dir):
        return True
    out = subprocess.run(
        ["mount", "-o", "loop,nosuid,nodev", str(image), str(volume_dir)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if out.returncode != 0:
        raise OSError(f"cannot mount the volume's image: {(out.stderr or out.stdout).strip()[-300:]}")
    lost = volume_dir / "lost+found"
    if lost.is_dir() and not any(lost.iterdir()):
        lost.rmdir()  # the job sees an empty volume
    return True


def remove(volume_dir: Path) -> None:
    """Unmount (if mounted) and delete the image and the directory."""
    if os.path.ismount(volume_dir):
        subprocess.run(["umount", "--lazy", str(volume_dir)], capture_output=True, timeout=TIMEOUT)
    image_path(volume_dir).unlink(missing_ok=True)
    shutil.rmtree(volume_dir, ignore_errors=True)
