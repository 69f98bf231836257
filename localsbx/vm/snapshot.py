"""Snapshots of a running guest and restores of them (recipe §3, method C).

Save: guest RAM lives in a ``memory-backend-file`` mapped ``share=on``; with the migration
capability ``x-ignore-shared`` the RAM itself is not streamed, so ``migrate`` writes only the
device state (tens of KiB) to ``state.mig``. The VM is stopped first and killed right after,
so the RAM file is exactly the snapshot.

Restore: the same argv shape with ``share=off`` (a MAP_PRIVATE, copy-on-write mapping of the
RAM file: clones share clean pages) and ``-incoming defer``; set ``x-ignore-shared`` on the
destination too, ``migrate-incoming exec:cat state.mig``, wait for ``completed``, then ``cont``
(a stream taken after ``stop`` carries runstate paused: pitfall 4).

A snapshot is only valid for the same QEMU build, accelerator, machine arguments, RAM size,
vCPUs and kernel (:func:`snapshot_key`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import shlex
from pathlib import Path

from localsbx.errors import SnapshotError, VMError
from localsbx.vm.qemu import QemuProcess, VMSpec, machine_shape, qemu_version

#: Seconds allowed for saving or loading device state.
MIGRATE_TIMEOUT = 60.0


def snapshot_key(spec: VMSpec, *, kernel_digest: str) -> dict:
    """What a snapshot depends on: compare the dict of the image with the one of a restore.

    :returns: ``{"qemu": ..., "accel": ..., "memory_mib": ..., "cpus": ..., "kernel": ...,
        "machine": <sha256 of the machine-shaping argv>}``.
    """
    # The snapshot VM (share=on, no -incoming) and its clones (share=off, -incoming) differ
    # in those and in every path; compare the canonical shape.
    p = Path("/p")
    canon = dataclasses.replace(spec, kernel=p, initrd=p, disk=p, serial_log=p, qmp_socket=p,
                                ram_file=p if spec.ram_file else None, ram_share=False,
                                incoming=False, name="snapshot")
    norm = machine_shape(canon)
    return {
        "qemu": qemu_version(),
        "accel": spec.accel.kind,
        "memory_mib": spec.memory_mib,
        "cpus": spec.cpus,
        "kernel": kernel_digest,
        "machine": hashlib.sha256(json.dumps(norm).encode()).hexdigest()[:16],
    }


def key_mismatch(saved: dict, wanted: dict) -> list[str]:
    """Human descriptions of how ``wanted`` differs from ``saved`` (empty = compatible)."""
    labels = {"qemu": "QEMU", "accel": "accelerator", "memory_mib": "RAM (MiB)",
              "cpus": "vCPUs", "kernel": "kernel", "machine": "machine arguments"}
    out = []
    for k, label in labels.items():
        if saved.get(k) == wanted.get(k):
            continue
        if k in ("kernel", "machine"):  # digests mean nothing to a reader
            out.append(f"{label}: not the snapshot's")
        else:
            out.append(f"{label}: snapshot {saved.get(k)!r}, now {wanted.get(k)!r}")
    return out


async def _wait_migration(vm: QemuProcess, what: str) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MIGRATE_TIMEOUT
    while True:
        info = await vm.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise SnapshotError(f"{what} failed: {info.get('error-desc', status)}")
        if vm.proc is not None and vm.proc.returncode is not None:
            raise SnapshotError(f"{what} failed: QEMU exited ({vm.proc.returncode})\n"
                                + vm.log_tail(10))
        if loop.time() > deadline:
            raise SnapshotError(f"{what} did not finish within {MIGRATE_TIMEOUT:.0f} s")
        await asyncio.sleep(0.01)


async def save(vm: QemuProcess, state_file: Path) -> None:
    """Stop the VM and write its device state to ``state_file``; QEMU is then killed.

    The VM must run with a ``share=on`` RAM file; after this returns the RAM file holds the
    snapshot's memory and must never be mapped shared again.

    :raises SnapshotError: migration failed.
    """
    if vm.spec.ram_file is None or not vm.spec.ram_share:
        raise SnapshotError("a snapshot needs guest RAM in a shared memory-backend-file")
    await vm.execute("migrate-set-capabilities",
                     {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
    await vm.execute("stop")
    await vm.execute("migrate", {"uri": "exec:" + shlex.join(["dd", "status=none", f"of={state_file}"])})
    try:
        await _wait_migration(vm, "saving the snapshot")
    finally:
        await vm.shutdown(graceful=False, timeout=5.0)


async def restore(vm: QemuProcess, state_file: Path) -> None:
    """Load ``state_file`` into a QEMU started with ``incoming=True`` and resume it.

    :raises SnapshotError: the state does not load (corrupt, or another machine shape).
    """
    try:
        await vm.execute("migrate-set-capabilities",
                         {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
        await vm.execute("migrate-incoming",
                         {"uri": "exec:" + shlex.join(["cat", str(state_file)])})
        await _wait_migration(vm, f"loading the snapshot {state_file}")
        await vm.execute("cont")
    except VMError as exc:  # QEMU refused the stream and exited: QMP "disconnecting"
        await asyncio.sleep(0.2)
        raise SnapshotError(
            f"loading the snapshot {state_file} failed: QEMU could not restore it "
            f"({exc.message}); the file is damaged or from another machine shape\n"
            + vm.log_tail(10),
            hint="delete it and take a new one, or rebuild the image (--force)") from exc


# ------------------------------------------------------------------ file integrity

#: Sampled content digest of a snapshot file: the size, then SHA-256 over
#: :data:`DIGEST_SAMPLES` blocks of :data:`DIGEST_BLOCK` bytes at evenly spaced offsets
#: (first and last block included); a file no bigger than that is hashed whole. About
#: 4 MiB read per file, so checking a 1 GiB RAM file before each restore costs milliseconds;
#: it catches a truncated, replaced or garbage-filled file, not a few flipped bytes
#: between samples.
DIGEST_SAMPLES = 256
DIGEST_BLOCK = 16 * 1024


def file_digest(path: Path) -> str:
    """``"s256x16k:<size>:<hex>"``, the sampled digest of ``path`` (see above).

    :raises OSError: it cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size <= DIGEST_SAMPLES * DIGEST_BLOCK:
            f.seek(0)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            last = size - DIGEST_BLOCK
            for i in range(DIGEST_SAMPLES):
                f.seek(last * i // (DIGEST_SAMPLES - 1))
                h.update(f.read(DIGEST_BLOCK))
    return f"s256x16k:{size}:{h.hexdigest()}"


def check_image_snapshot(image_dir: Path, meta, name: str) -> None:
    """Check an image's snapshot files before they are restored or reused: present, the
    sizes recorded at build time, and (images built since digests exist) the sampled
    digests of ``state.mig`` and ``ram``.

    :param meta: the image's :class:`localsbx.store.SnapshotMeta`.
    :raises SnapshotError: a file is missing or damaged (named, with the fix).
    """
    snap = image_dir / "snap"
    hint = f"rebuild the image: localsbx image build <Dockerfile> -n {name} --force"
    expect = {"state.mig": (meta.state_size, getattr(meta, "state_digest", "")),
              "ram": (meta.ram_size, getattr(meta, "ram_digest", "")),
              "disk.qcow2": (None, ""), "initrd.cpio": (None, "")}
    for fname, (size, digest) in expect.items():
        f = snap / fname
        if not f.exists():
            raise SnapshotError(f"image {name!r}: snapshot file {f} is missing", hint=hint)
        if size is not None and f.stat().st_size != size:
            raise SnapshotError(f"image {name!r}: snapshot file {f} is damaged "
                                f"({f.stat().st_size} bytes, expected {size})", hint=hint)
        if digest:
            try:
                got = file_digest(f)
            except OSError as exc:
                raise SnapshotError(f"image {name!r}: snapshot file {f} cannot be read: {exc}",
                                    hint=hint) from None
            if got != digest:
                raise SnapshotError(f"image {name!r}: snapshot file {f} is damaged (its "
                                    "sampled content digest differs from the one recorded at "
                                    "build time)", hint=hint)
    if not (image_dir / "build.qcow2").exists():
        raise SnapshotError(f"image {name!r}: disk {image_dir / 'build.qcow2'} is missing",
                            hint=f"rebuild the image (-n {name} --force)")
