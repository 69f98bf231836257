"""Disk images: qcow2 overlays, backing-file surgery, freezing. One place for ``qemu-img``.

Every guest disk is a qcow2 overlay over a read-only chain ending at a base's
``rootfs.qcow2``. Backing paths are stored absolute (recipe pitfall 5: a relative backing
path resolves against the overlay's folder, which moves when an image folder is committed),
and the backing format is always given (``-F qcow2``), so QEMU never probes it.

All ``qemu-img`` calls go through :func:`localsbx._proc.run`: they do not block the event
loop, are bounded by a timeout, and fail with :class:`~localsbx.errors.HostCommandError`
(argv, exit status, stderr tail)::

    await disk.create_overlay(tmp / "build.qcow2", base.rootfs)
    ...
    disk.freeze(tmp / "build.qcow2")
    await disk.rebase_unsafe(snap_disk, final / "build.qcow2")
"""

from __future__ import annotations

import os
from pathlib import Path

from localsbx import _proc

#: Seconds a metadata-only ``qemu-img`` call (create, rebase -u) may take; they touch a
#: few KiB, so this only trips on a stuck file system.
QEMU_IMG_TIMEOUT = 60.0
#: Mode of a frozen image file (the backing files of a chain are never written again).
FROZEN_MODE = 0o400


async def create_overlay(overlay: Path, backing: Path, *,
                         timeout: float = QEMU_IMG_TIMEOUT) -> None:
    """Create the qcow2 ``overlay`` over the qcow2 ``backing`` (stored as an absolute path,
    format given). An existing ``overlay`` is overwritten.

    :param overlay: the new file.
    :param backing: an existing qcow2 image (made absolute here).
    :param timeout: seconds.
    :raises HostCommandError: qemu-img failed (no such backing file, not qcow2...) or timed
        out.
    :raises ConfigError: qemu-img is not installed.
    """
    await _proc.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(Path(backing).resolve()),
                     "-F", "qcow2", str(overlay)], timeout=timeout)


async def create_empty(path: Path, size: str, *, timeout: float = QEMU_IMG_TIMEOUT) -> None:
    """Create an empty qcow2 image with no backing file.

    :param size: qemu-img size syntax: bytes, or with a suffix (``"16M"``, ``"2G"``).
    :raises HostCommandError: qemu-img failed or timed out.
    :raises ConfigError: qemu-img is not installed.
    """
    await _proc.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size],
                    timeout=timeout)


async def rebase(image: Path, backing: Path, *, timeout: float = QEMU_IMG_TIMEOUT) -> None:
    """Make ``image`` hold every difference from ``backing`` and point at it
    (``qemu-img rebase``, safe mode): afterwards the old backing chain is not needed.

    :raises HostCommandError: qemu-img failed or timed out.
    """
    await _proc.run(["qemu-img", "rebase", "-F", "qcow2", "-b",
                     str(Path(backing).absolute()), str(image)], timeout=timeout)


async def rebase_unsafe(image: Path, backing: Path, *,
                        timeout: float = QEMU_IMG_TIMEOUT) -> None:
    """Point ``image`` at another backing file without looking at any data
    (``qemu-img rebase -u``): only the header changes. ``backing`` is stored as given
    (made absolute) and need not exist yet, e.g. the path a folder is about to be renamed
    to; the caller guarantees it will hold the same content as the old backing file.

    :raises HostCommandError: qemu-img failed (``image`` missing or not qcow2) or timed out.
    :raises ConfigError: qemu-img is not installed.
    """
    await _proc.run(["qemu-img", "rebase", "-u", "-F", "qcow2", "-b",
                     str(Path(backing).absolute()), str(image)], timeout=timeout)


def freeze(path: Path) -> None:
    """Make ``path`` read-only (mode 0444): it is now a backing file or snapshot part, and
    a write to it would corrupt every overlay above it. A plain ``chmod`` (no subprocess).

    :raises OSError: ``path`` does not exist or cannot be changed.
    """
    os.chmod(path, FROZEN_MODE)


#: Seconds a sparse copy of an overlay may take (a checkpoint's disk: the guest's writes).
COPY_TIMEOUT = 600.0


async def copy_sparse(src: Path, dest: Path, *, timeout: float = COPY_TIMEOUT) -> None:
    """Copy a qcow2 file as it is (same backing reference), keeping holes and sharing
    blocks where the file system can (``cp --sparse=always --reflink=auto``). The image
    must not be written meanwhile (QEMU stopped, or its guest paused: QMP ``stop``
    flushes every block device).

    :raises HostCommandError: cp failed or timed out.
    """
    await _proc.run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dest)],
                    timeout=timeout)
