"""VM templates: a base's guest snapshotted just before ``/init`` mounts its root file system,
restored instead of cold-booted for every build VM and snapshot VM of that base (the
"VM templating" of Kata Containers: boot once, then clone the booted kernel).

A template is made once per base, shape (vCPUs, MiB) and accelerator, in
``<data>/bases/<base>/templates/<cpus>x<mib>-<accel>/``:

* a cold boot of the base's kernel and initramfs, with an identity cpio that has
  ``localsbx/hold`` (:func:`localsbx.vm.kernel.make_identity_cpio`), on an empty 1 MiB
  placeholder disk, RAM in ``ram`` (``share=on``);
* ``/init`` loads its modules, sees the hold file, prints ``LOCALSBX-HOLD`` and polls
  ``/sys/block/vda/size``; the host then saves the device state (``state.mig``, QMP
  ``migrate`` with ``x-ignore-shared``, as an image snapshot) and kills QEMU;
* ``initrd.cpio`` (the initramfs and that identity), ``template.json`` (shape, the
  snapshot key, the base digest, the guest's public host key).

:meth:`localsbx.vm.machine.Machine.from_template` restores it on the real disk (a qcow2
overlay; the guest has read nothing of the placeholder but its partition table), sends QMP
``block_resize`` to the disk's own size, which makes virtio-blk announce that size, and
``/init`` takes the new size as the signal to drop the placeholder's cached blocks and go
on: mount, boot kit, network, identity, ``switch_root`` to the agent. So a restored
template ends where a cold boot ends (``LOCALSBX-READY``, SSH), minus the kernel's boot.
The clock, CRNG, machine-id and hostname are then fixed as after any restore.

All VMs restored from one template share its SSH host key (as all clones of an image share
the image's); the host pins it from ``template.json``.

A template is remade when the key no longer matches (another QEMU, kernel or machine
arguments), when the base is rebuilt (the base folder is replaced with it), or when it is
damaged; any failure to make or restore one falls back to a cold boot in the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from localsbx import _proc
from localsbx.errors import LocalsbxError, SnapshotError
from localsbx.vm import snapshot
from localsbx.vm.machine import _qmp_path, write_vm_initrd
from localsbx.vm.net import NetSpec
from localsbx.vm.qemu import Accel, QemuProcess, VMSpec

log = logging.getLogger("localsbx.vm")

#: Serial-console line ``/init`` prints when it holds (identity has ``localsbx/hold``).
HOLD_MARKER = b"LOCALSBX-HOLD"
#: Virtual size of the placeholder disk (bytes): any root disk differs from it, so its
#: announced size is the go signal.
PLACEHOLDER_SIZE = 1 << 20
#: Bumped when what a template holds or how it is restored changes.
TEMPLATE_FORMAT = 2
#: Seconds the template's boot may take to reach the hold.
HOLD_TIMEOUT = 180.0
META = "template.json"
#: The files a template restores from (their sampled digests are in ``template.json``).
_FILES = ("ram", "state.mig", "initrd.cpio")


@dataclass(frozen=True)
class Template:
    """A made template (see the module docstring for its files).

    :param folder: its folder.
    :param cpus: vCPUs of every VM restored from it.
    :param memory_mib: RAM (MiB) of every VM restored from it.
    :param host_key: the guest's SSH host key, public, OpenSSH one-line format.
    :param key: its :func:`localsbx.vm.snapshot.snapshot_key`.
    :param made_at: when it was made (Unix time; tells it from a template made anew in
        the same folder).
    """

    folder: Path
    cpus: int
    memory_mib: int
    host_key: str
    key: dict
    made_at: float = 0.0

    @property
    def initrd(self) -> Path:
        return self.folder / "initrd.cpio"

    @property
    def ram(self) -> Path:
        return self.folder / "ram"

    @property
    def state(self) -> Path:
        return self.folder / "state.mig"


def template_dir(base_path: Path, cpus: int, memory_mib: int, accel: Accel) -> Path:
    """``<base>/templates/<cpus>x<mib>-<accel kind>``."""
    return base_path / "templates" / f"{cpus}x{memory_mib}-{accel.kind}"


def _spec(folder: Path, *, kernel: Path, accel: Accel, cpus: int, memory_mib: int,
          incoming: bool = False) -> VMSpec:
    return VMSpec(kernel=kernel, initrd=folder / "initrd.cpio",
                  disk=folder / "placeholder.qcow2", serial_log=folder / "serial.log",
                  qmp_socket=_qmp_path(folder), accel=accel, memory_mib=memory_mib,
                  cpus=cpus, ram_file=folder / "ram", ram_share=not incoming,
                  incoming=incoming, name="localsbx-template", net=NetSpec())


def load(base, *, cpus: int, memory_mib: int, accel: Accel) -> Template | None:
    """The base's template for this shape when it is there, complete and still valid for
    this QEMU, kernel and machine arguments; ``None`` otherwise."""
    folder = template_dir(base.path, cpus, memory_mib, accel)
    try:
        meta = json.loads((folder / META).read_text())
        if not isinstance(meta, dict) or meta.get("format") != TEMPLATE_FORMAT \
                or meta.get("base_digest") != base.digest:
            return None
        want = snapshot.snapshot_key(
            _spec(folder, kernel=base.kernel, accel=accel, cpus=cpus, memory_mib=memory_mib),
            kernel_digest=base.kernel_digest)
        if not isinstance(meta.get("key"), dict) or snapshot.key_mismatch(meta["key"], want):
            return None
        host_key = meta["host_key"]
        asyncssh.import_public_key(host_key)
        digests = meta["digests"]
        for f in _FILES:  # sampled content digests, as an image snapshot's
            if snapshot.file_digest(folder / f) != digests[f]:
                return None
        return Template(folder, cpus, memory_mib, host_key, want, float(meta["made_at"]))
    except (OSError, ValueError, TypeError, KeyError, AttributeError, asyncssh.Error):
        return None


async def ensure(base, *, cpus: int, memory_mib: int, accel: Accel,
                 client_key: asyncssh.SSHKey, say=None) -> Template:
    """The base's template for this shape, made first when missing or stale (one cold
    boot up to the hold, 2-4 s under TCG here). Concurrent callers wait on one lock file
    in ``<base>/templates``; the folder is written under a temporary name and renamed.

    :param say: called with one progress line when a template is made.
    :raises VMLaunchError: the template's boot failed or did not reach the hold in time.
    :raises SnapshotError: saving it failed.
    """

    if (t := load(base, cpus=cpus, memory_mib=memory_mib, accel=accel)) is not None:
        return t
    root = base.path / "templates"
    root.mkdir(mode=0o700, exist_ok=True)  # its initrd holds the guest's SSH host key
    lock = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        waited = False
        while True:  # polled, so that a cancelled build stops waiting at once
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if say and not waited:
                    say(f"waiting for another process making the VM template of base "
                        f"{base.name}")
                waited = True
                await asyncio.sleep(0.1)
        if (t := load(base, cpus=cpus, memory_mib=memory_mib, accel=accel)) is not None:
            return t
        for stale in root.glob(".*-*"):  # left by a maker or a discard that was killed
            if stale.is_dir():
                _remove_net_dir(stale)
                shutil.rmtree(stale, ignore_errors=True)
        if say:
            say(f"making the VM template of base {base.name} ({cpus} vCPU, {memory_mib} MiB): "
                "one cold boot, then every build and snapshot VM of this shape restores it")
        t0 = time.monotonic()
        final = template_dir(base.path, cpus, memory_mib, accel)
        tmp = root / f".tmp-{final.name}-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o700)
        try:
            host_key = write_vm_initrd(base.initrd, tmp / "initrd.cpio", client_key, hold=True)
            await _proc.run(["qemu-img", "create", "-q", "-f", "qcow2",
                             str(tmp / "placeholder.qcow2"), str(PLACEHOLDER_SIZE)], timeout=60)
            spec = _spec(tmp, kernel=base.kernel, accel=accel, cpus=cpus,
                         memory_mib=memory_mib)
            qemu = QemuProcess(spec)
            await qemu.start()
            try:
                await _wait_for_hold(qemu)
                await snapshot.save(qemu, tmp / "state.mig")
            finally:
                await qemu.shutdown(graceful=False)
            for f in tmp.iterdir():  # the placeholder disk, logs, pid files
                if f.name not in _FILES:
                    f.unlink()
            key = snapshot.snapshot_key(spec, kernel_digest=base.kernel_digest)
            meta = {"format": TEMPLATE_FORMAT, "base": base.name, "base_digest": base.digest,
                    "cpus": cpus, "memory_mib": memory_mib, "key": key,
                    "host_key": host_key.export_public_key("openssh").decode().strip(),
                    "digests": {f: snapshot.file_digest(tmp / f) for f in _FILES},
                    "made_at": time.time(), "boot_seconds": round(time.monotonic() - t0, 2)}
            for f in _FILES:
                os.chmod(tmp / f, 0o400)
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
            if final.exists():
                old = root / f".old-{final.name}-{secrets.token_hex(4)}"
                final.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        t = load(base, cpus=cpus, memory_mib=memory_mib, accel=accel)
        if t is None:
            raise SnapshotError(f"the VM template just made in {final} does not load")
        log.info("template %s made in %.1f s", final, time.monotonic() - t0)
        return t
    finally:
        os.close(lock)


async def _wait_for_hold(qemu: QemuProcess) -> None:
    """Wait for ``LOCALSBX-HOLD``; a guest that gets ready instead (an ``/init`` that does
    not know the hold file) is an error at once, not after the timeout."""
    from localsbx.errors import VMLaunchError
    from localsbx.vm.qemu import READY_MARKER

    loop = asyncio.get_running_loop()
    deadline = loop.time() + HOLD_TIMEOUT
    while True:
        try:
            await qemu.wait_for_serial(HOLD_MARKER, timeout=0.5)
            return
        except VMLaunchError:
            with contextlib.suppress(OSError):
                if READY_MARKER in qemu.spec.serial_log.read_bytes():
                    raise VMLaunchError("the template's guest got ready instead of holding: "
                                        "its /init does not know the hold file",
                                        argv=qemu.argv) from None
            if (qemu.proc is not None and qemu.proc.returncode is not None) \
                    or loop.time() > deadline:
                raise


_SUPPORTS: dict[tuple, bool] = {}


def supports_templates(base) -> bool:
    """Whether the base's ``/init`` holds for a template (bases made before templates do
    not: their builds cold-boot until the base is rebuilt). Remembered per initramfs file
    (path, size, mtime)."""
    try:
        st = base.initrd.stat()
        k = (str(base.initrd), st.st_size, st.st_mtime_ns)
        if k not in _SUPPORTS:
            _SUPPORTS[k] = HOLD_MARKER in base.initrd.read_bytes()
        return _SUPPORTS[k]
    except OSError:
        return False


def discard(template: Template) -> None:
    """Remove a template that failed to restore, so the next build makes it anew; not
    when its folder already holds a template made since (by another process)."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        if float(json.loads((template.folder / META).read_text())["made_at"]) \
                != template.made_at:
            return
    old = template.folder.with_name(f".bad-{template.folder.name}-{secrets.token_hex(4)}")
    with contextlib.suppress(OSError):
        template.folder.rename(old)
    shutil.rmtree(old, ignore_errors=True)


def _remove_net_dir(folder: Path) -> None:
    """Remove the passt socket folder a killed template VM left (named in ``passt.dir``)."""
    with contextlib.suppress(OSError):
        net = Path((folder / "passt.dir").read_text().strip())
        if net.name.startswith("lsbx-net-"):
            shutil.rmtree(net, ignore_errors=True)


async def try_ensure(base, *, cpus: int, memory_mib: int, accel: Accel,
                     client_key: asyncssh.SSHKey, say=None) -> Template | None:
    """:func:`ensure`, or ``None`` (with a warning through ``say``) when the template
    cannot be made: the caller then cold-boots, as before templates."""
    if os.environ.get("LOCALSBX_VM_TEMPLATES", "1") == "0" or base.digest is None \
            or not supports_templates(base):
        return None
    try:
        return await ensure(base, cpus=cpus, memory_mib=memory_mib, accel=accel,
                            client_key=client_key, say=say)
    except (LocalsbxError, OSError) as exc:
        log.warning("no VM template for base %s: %s", base.name, exc)
        if say:
            say(f"warning: no VM template for base {base.name} ({exc}); cold-booting")
        return None


async def copy_ram(template: Template, dest: Path) -> None:
    """A private, writable copy of the template's RAM file at ``dest`` (sparse: the file
    holds mostly holes), for a VM whose RAM must become an image snapshot's ``ram``."""
    await _proc.run(["cp", "--sparse=always", "--reflink=auto", str(template.ram), str(dest)],
                    timeout=120)
    os.chmod(dest, 0o600)


__all__ = ["HOLD_MARKER", "PLACEHOLDER_SIZE", "Template", "copy_ram", "discard", "ensure",
           "load", "supports_templates", "template_dir", "try_ensure"]
