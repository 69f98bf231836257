"""A running guest: one owned QEMU plus one SSH connection to its agent.

Two ways to get one:

* :meth:`Machine.cold_boot` — boot a kernel + initramfs on a qcow2 overlay; a fresh per-VM
  identity (SSH host key, machine-id) is appended to the initramfs as a second cpio
  (recipe pitfall 8), so there is no key generation in the guest.
* :meth:`Machine.restore` — start QEMU ``-incoming defer`` on a new overlay over a snapshot's
  frozen disk, map the snapshot RAM copy-on-write, load the device state, ``cont``, then
  step the guest clock to host time and force a CRNG reseed (pitfalls 7 and 9).

Either way, a failure at any step stops QEMU before the error propagates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from localsbx.errors import GuestError, LocalsbxError, SnapshotError, VMLaunchError
from localsbx.guest.ssh import GuestConnection
from localsbx.vm import snapshot
from localsbx.vm.net import NetSpec
from localsbx.vm.qemu import READY_MARKER, Accel, QemuProcess, VMSpec

log = logging.getLogger("localsbx.vm")

#: Seconds a cold boot may take to print the ready marker (TCG boots take 5-7 s here).
BOOT_TIMEOUT = 180.0
#: Seconds for the first SSH connection after the guest is ready / restored.
CONNECT_TIMEOUT = 60.0
#: The guest's dropbear host key (written by /init from the identity cpio; dropbear reads it
#: for every connection).
GUEST_HOST_KEY = "/run/localsbx/dropbear_ed25519_host_key"
#: Seconds the first SSH try after a cold boot or a restore may take before it is retried
#: (see ``GuestConnection.connect``: a SYN passt sent before it knew the guest's MAC is lost;
#: a restored guest announces itself only when it has handled QEMU's announce request).
FIRST_CONNECT_TRY = 2.0


#: Serial-log words of a boot that failed because of the rootfs or its init (not retried).
_ROOTFS_FAULTS = (b"Attempted to kill init", b"No working init", b"VFS: Unable to mount root",
                  b"Requested init")


def boot_crash_is_transient(serial_log: Path) -> bool:
    """Whether a cold boot that stopped before it was ready died of a guest kernel crash
    of its own (an oops, "Kernel panic - not syncing" without a rootfs or init cause), which
    a second boot of the same files does not repeat."""
    try:
        text = serial_log.read_bytes()
    except OSError:
        return False
    return b"Kernel panic" in text and not any(w in text for w in _ROOTFS_FAULTS)


@dataclass
class Machine:
    """A running guest. Use ``async with`` or call :meth:`stop` (idempotent).

    :param qemu: the owned QEMU process.
    :param guest: the SSH connection to the guest agent.
    :param host_key: the guest's SSH host key (public part is what clients pin).
    """

    qemu: QemuProcess
    guest: GuestConnection
    host_key: asyncssh.SSHKey
    ssh_port: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    async def cold_boot(
        cls,
        *,
        kernel: Path,
        initrd: Path,
        disk: Path,
        workdir: Path,
        accel: Accel,
        client_key: asyncssh.SSHKey,
        cpus: int,
        memory_mib: int,
        ram_file: Path | None = None,
        ram_share: bool = False,
        detached: bool = False,
        wrapper: list[str] | None = None,
        name: str = "localsbx",
        net: NetSpec = NetSpec(),
        extra_disks: tuple[Path, ...] = (),
    ) -> Machine:
        """Boot a guest and connect to it.

        A guest kernel that crashes during boot for a reason of its own (an oops under TCG
        emulation, seen about once in a few hundred SMP boots here) is booted once more, with
        a warning; a crash that says the rootfs or its init is unusable is not retried.

        :param disk: the qcow2 overlay the guest boots from (created by the caller).
        :param workdir: folder for the serial log, QMP socket and per-VM initramfs.
        :param extra_disks: more qcow2 files attached after the root (see
            :attr:`~localsbx.vm.qemu.VMSpec.extra_disks`).
        :raises VMLaunchError: QEMU failed or the guest was not ready in time (QEMU stopped).
        """
        for attempt in (1, 2):
            try:
                return await cls._boot_once(
                    kernel=kernel, initrd=initrd, disk=disk, workdir=workdir, accel=accel,
                    client_key=client_key, cpus=cpus, memory_mib=memory_mib,
                    ram_file=ram_file, ram_share=ram_share, detached=detached,
                    wrapper=wrapper, name=name, net=net, extra_disks=extra_disks)
            except VMLaunchError:
                serial = workdir / "serial.log"
                if attempt == 2 or not boot_crash_is_transient(serial):
                    raise
                kept = serial.with_name("serial.crashed-boot.log")
                with contextlib.suppress(OSError):
                    os.replace(serial, kept)
                log.warning("the guest kernel crashed during boot (%s); booting once more",
                            kept)
        raise AssertionError("unreachable")

    @classmethod
    async def _boot_once(cls, *, kernel: Path, initrd: Path, disk: Path, workdir: Path,
                         accel: Accel, client_key: asyncssh.SSHKey, cpus: int,
                         memory_mib: int, ram_file: Path | None, ram_share: bool,
                         detached: bool, wrapper: list[str] | None, name: str,
                         net: NetSpec, extra_disks: tuple[Path, ...] = ()) -> Machine:

        t0 = time.monotonic()
        vm_initrd = workdir / "initrd.cpio"
        host_key = write_vm_initrd(initrd, vm_initrd, client_key)
        spec = VMSpec(kernel=kernel, initrd=vm_initrd, disk=disk,
                      serial_log=workdir / "serial.log", qmp_socket=_qmp_path(workdir),
                      accel=accel, memory_mib=memory_mib, cpus=cpus, ram_file=ram_file,
                      ram_share=ram_share, name=name, net=net, extra_disks=tuple(extra_disks))
        qemu = QemuProcess(spec, detached=detached, wrapper=wrapper or [])
        await qemu.start()
        m = cls(qemu, GuestConnection("127.0.0.1", 0, client_key, host_key), host_key)
        try:
            await qemu.wait_for_serial(READY_MARKER, timeout=BOOT_TIMEOUT)
            m.timings["ready"] = time.monotonic() - t0
            await m._connect()
            m.timings["connected"] = time.monotonic() - t0
        except BaseException:
            await m.stop()
            raise
        return m

    @classmethod
    async def restore(
        cls,
        *,
        kernel: Path,
        initrd: Path,
        ram_file: Path | None,
        state_file: Path,
        disk: Path,
        workdir: Path,
        accel: Accel,
        client_key: asyncssh.SSHKey,
        host_key_public: str,
        cpus: int,
        memory_mib: int,
        detached: bool = False,
        wrapper: list[str] | None = None,
        name: str = "localsbx",
        lazy_fixup: bool = False,
        net: NetSpec = NetSpec(),
    ) -> Machine:
        """Restore a guest from a migration stream: ``state_file`` holds the device state (an
        image snapshot, RAM in ``ram_file``) or the whole guest (a suspend or a memory
        checkpoint; RAM in the stream). ``ram_file`` is mapped copy-on-write (``share=off``);
        ``None`` = anonymous RAM (a guest that was cold-booted). ``initrd`` and the shape must
        be the ones the guest was started with. ``disk`` is the new overlay (created by the
        caller over the frozen disk of that moment). Then the clock and CRNG are fixed.

        :param lazy_fixup: leave the clock/CRNG fixup to the first guest command (it runs
            before that command, in the same round trip); otherwise it runs here.

        :raises SnapshotError: a snapshot file is missing or does not load (QEMU stopped).
        """
        t0 = time.monotonic()
        for f in (ram_file, state_file, initrd):
            if f is not None and not f.exists():
                raise SnapshotError(f"snapshot file {f} is missing")
        spec = VMSpec(kernel=kernel, initrd=initrd, disk=disk,
                      serial_log=workdir / "serial.log", qmp_socket=_qmp_path(workdir),
                      accel=accel, memory_mib=memory_mib, cpus=cpus,
                      ram_file=ram_file, ram_share=False, incoming=True, name=name, net=net)
        qemu = QemuProcess(spec, detached=detached, wrapper=wrapper or [])
        pub = asyncssh.import_public_key(host_key_public)
        await qemu.start()
        m = cls(qemu, GuestConnection("127.0.0.1", 0, client_key, pub), pub)
        try:
            await snapshot.restore(qemu, state_file)
            m.timings["loaded"] = time.monotonic() - t0
            await m._connect()
            m.timings["connected"] = time.monotonic() - t0
            if lazy_fixup:
                m.guest.fixup_pending = True
            else:
                await m.guest.fixup()
                m.timings["fixed"] = time.monotonic() - t0
        except BaseException:
            await m.stop()
            raise
        return m

    @classmethod
    async def from_template(
        cls,
        template,
        *,
        kernel: Path,
        disk: Path,
        workdir: Path,
        accel: Accel,
        client_key: asyncssh.SSHKey,
        ram_file: Path | None = None,
        name: str = "localsbx",
        net: NetSpec = NetSpec(),
    ) -> Machine:
        """Start a guest from a :class:`localsbx.vm.template.Template` instead of a cold
        boot: restore it (``-incoming defer``) on ``disk``, QMP ``block_resize`` the disk to
        its own size (virtio-blk announces the size: ``/init``'s go signal), wait for
        ``LOCALSBX-READY``, connect, fix the clock and the CRNG, and give the guest a new
        machine-id and its own SSH host key (:attr:`host_key`; the template's answers
        only the first connection). The VM has the template's shape; its console goes to
        ``workdir/serial.log`` and its initramfs is copied to ``workdir/initrd.cpio`` (an
        image snapshot taken of this VM keeps it there).

        :param disk: the qcow2 overlay the guest mounts as its root (created by the caller).
        :param ram_file: ``None``: the template's RAM is mapped copy-on-write
            (``share=off``); a path: the template's RAM is copied there and mapped
            ``share=on``, so the VM can be snapshotted (:func:`snapshot.save`).
        :raises SnapshotError: the template does not load (QEMU stopped).
        :raises VMLaunchError: the guest did not get ready (QEMU stopped).
        """
        import shutil

        from localsbx.vm import disk as vmdisk
        from localsbx.vm import template as vmtemplate
        from localsbx.vm.kernel import dropbear_ed25519_key

        t0 = time.monotonic()
        for f in (template.ram, template.state, template.initrd):
            if not f.exists():
                raise SnapshotError(f"VM template file {f} is missing")
        size = vmdisk.virtual_size(disk)
        if size == vmtemplate.PLACEHOLDER_SIZE:
            raise SnapshotError(f"{disk} has the size of the template's placeholder disk")
        initrd = workdir / "initrd.cpio"
        shutil.copyfile(template.initrd, initrd)
        if ram_file is not None:
            try:
                await vmtemplate.copy_ram(template, ram_file)
            except LocalsbxError as exc:
                raise SnapshotError(f"cannot copy the VM template's RAM: {exc}") from exc
        spec = VMSpec(kernel=kernel, initrd=initrd, disk=disk,
                      serial_log=workdir / "serial.log", qmp_socket=_qmp_path(workdir),
                      accel=accel, memory_mib=template.memory_mib, cpus=template.cpus,
                      ram_file=ram_file or template.ram, ram_share=ram_file is not None,
                      incoming=True, name=name, net=net)
        qemu = QemuProcess(spec)
        pub = asyncssh.import_public_key(template.host_key)
        await qemu.start()
        m = cls(qemu, GuestConnection("127.0.0.1", 0, client_key, pub), pub)
        try:
            await snapshot.restore(qemu, template.state)
            m.timings["loaded"] = time.monotonic() - t0
            await qemu.execute("block_resize", {"device": "root", "size": size})
            await qemu.wait_for_serial(READY_MARKER, timeout=BOOT_TIMEOUT)
            m.timings["ready"] = time.monotonic() - t0
            await m._connect()
            m.timings["connected"] = time.monotonic() - t0
            m.guest.set_identity(secrets.token_hex(16), "localsbx")
            await m.guest.fixup()
            # its own SSH host key: dropbear reads the key file for every new connection,
            # so the template's key ends with this one (and an image snapshot of this VM
            # records the new key, as a cold-booted snapshot VM recorded its own)
            new_key = asyncssh.generate_private_key("ssh-ed25519")
            await m.guest.put_file(GUEST_HOST_KEY, dropbear_ed25519_key(
                new_key.export_private_key("openssh")), mode=0o600)
            m.host_key = m.guest.host_key = new_key
            m.timings["fixed"] = time.monotonic() - t0
        except BaseException:
            await m.stop()
            raise
        return m

    async def _connect(self) -> None:
        self.ssh_port = await self.qemu.host_ssh_port()
        self.guest.port = self.ssh_port
        proc = self.qemu.proc
        try:
            await self.guest.connect(timeout=CONNECT_TIMEOUT, first_try=FIRST_CONNECT_TRY,
                                     alive=lambda: proc is None or proc.returncode is None)
        except GuestError as exc:
            if proc is not None and proc.returncode is not None:
                # the guest died (a panic, a reboot into -no-reboot): say so, with its console
                raise VMLaunchError(f"the guest stopped before its SSH server answered ({exc})",
                                    argv=self.qemu.argv, returncode=proc.returncode,
                                    log_tail=self.qemu.log_tail()) from exc
            raise

    async def new_disk_layer(self, overlay: Path, *, timeout: float = 60.0) -> None:
        """Make the disk written so far immutable and go on writing to ``overlay``: the
        guest syncs its file systems, then QMP ``blockdev-snapshot-sync`` (which drains and
        flushes the device) creates ``overlay`` (qcow2, backed by the current file by its
        absolute path) and switches the guest's disk to it. The previous file is then only
        read by this QEMU; the caller may freeze it.

        :param overlay: the new file (absolute; must not exist).
        :raises GuestError: the guest's sync failed.
        :raises VMError: QEMU refused the snapshot.
        """
        res = await self.guest.agent("sync", timeout=timeout)
        if res.exit_status != 0:
            raise GuestError(f"sync before a disk layer failed: {res.describe()}")
        await self.qemu.execute("blockdev-snapshot-sync", {
            "device": "root", "snapshot-file": str(overlay), "format": "qcow2",
            "mode": "absolute-paths"}, timeout=timeout)

    async def poweroff(self, *, timeout: float = 30.0) -> bool:
        """Sync and power the guest off cleanly; ``True`` when QEMU exited by itself."""
        with contextlib.suppress(GuestError):
            await self.guest.agent("sync", timeout=timeout)
        with contextlib.suppress(GuestError, asyncssh.Error, OSError):
            await self.guest.agent("poweroff", timeout=5)
        await self.guest.close()
        return await self.qemu.wait(timeout) is not None

    async def stop(self) -> None:
        """Close SSH and stop QEMU for sure. Idempotent."""
        with contextlib.suppress(Exception):
            await self.guest.close()
        await self.qemu.shutdown(graceful=False)

    async def __aenter__(self) -> Machine:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


def write_vm_initrd(initrd: Path, out: Path, client_key: asyncssh.SSHKey, *,
                    hold: bool = False) -> asyncssh.SSHKey:
    """Write ``out``: the base's ``initrd`` followed by a fresh per-VM identity cpio
    (:func:`localsbx.vm.kernel.make_identity_cpio`: a new ed25519 host key, the
    management key as authorized, a random machine-id, hostname ``localsbx``; ``hold``
    for a VM template). Returns the host key (private), which the host pins.

    :raises OSError: a file cannot be read or written.
    """
    from localsbx.vm.kernel import make_identity_cpio

    host_key = asyncssh.generate_private_key("ssh-ed25519")
    ident = make_identity_cpio(
        host_key_openssh=host_key.export_private_key("openssh"),
        authorized_keys=client_key.export_public_key("openssh"),
        machine_id=secrets.token_hex(16), hostname="localsbx", hold=hold)
    with open(out, "wb") as f:
        f.write(initrd.read_bytes())
        f.write(ident)
    return host_key


def _qmp_path(workdir: Path) -> Path:
    """The QMP socket path; a short one under /tmp when ``workdir`` is too long for AF_UNIX."""
    p = workdir / "qmp.sock"
    if len(str(p)) < 100:
        return p
    return Path("/tmp") / f"lsbx-{os.getpid()}-{secrets.token_hex(4)}.qmp"
