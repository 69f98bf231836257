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
import struct
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


#: Suffix of the empty overlay kept beside a frozen backing file (:func:`clone_overlay`).
TEMPLATE_SUFFIX = ".overlay-template"


async def clone_overlay(overlay: Path, backing: Path, *,
                        timeout: float = QEMU_IMG_TIMEOUT) -> None:
    """:func:`create_overlay` for the many clones of one frozen file (a sandbox from an
    image snapshot or a checkpoint): the first call keeps qemu-img's empty overlay beside
    ``backing`` as ``<backing>.overlay-template``; later ones copy it (about 200 KiB, no
    qemu-img start: some 15 ms less on each create here). The copy is byte for byte what
    ``qemu-img create`` writes for the same backing file: its header holds only the backing
    path, its format and the virtual size, and a template whose header no longer names
    ``backing`` and its current virtual size is made anew. The template goes with its
    folder; a folder that cannot be written falls back to qemu-img every time.

    :raises HostCommandError: qemu-img failed or timed out.
    :raises ConfigError: qemu-img is not installed.
    """
    backing = Path(backing).resolve()
    template = backing.with_name(f"{backing.name}{TEMPLATE_SUFFIX}")
    try:
        data = template.read_bytes()
        fresh = _qcow2_header(data) == (str(backing).encode(),
                                        _qcow2_header(_read_head(backing))[1])
    except (OSError, ValueError):
        fresh = False
    if not fresh:
        tmp = template.with_name(f".{template.name}.{os.getpid()}")
        try:
            await create_overlay(tmp, backing, timeout=timeout)
            data = tmp.read_bytes()
            os.replace(tmp, template)
        except OSError:  # a folder we may not write: no template
            tmp.unlink(missing_ok=True)
            await create_overlay(overlay, backing, timeout=timeout)
            return
    fd = os.open(overlay, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4096)


def virtual_size(path: Path) -> int:
    """The virtual size (bytes) of the qcow2 image at ``path``, read from its header.

    :raises ValueError: not a qcow2 image.
    :raises OSError: it cannot be read.
    """
    with open(path, "rb") as f:
        return _qcow2_header(f.read(4096))[1]


def _qcow2_header(data: bytes) -> tuple[bytes, int]:
    """``(backing file name, virtual size in bytes)`` from a qcow2 header (QEMU's
    docs/interop/qcow2.txt: magic, version, backing_file_offset, backing_file_size, ...,
    size at byte 24).

    :raises ValueError: not a qcow2 header.
    """
    if len(data) < 32 or data[:4] != b"QFI\xfb":
        raise ValueError("not a qcow2 image")
    off, n, _bits, size = struct.unpack_from(">QIIQ", data, 8)
    return (data[off:off + n] if off else b""), size


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
