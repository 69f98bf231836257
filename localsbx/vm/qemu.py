"""QEMU ``-M microvm``: the argv (a pure function) and the owned QEMU process.

The argv follows the measured recipe (``shared/notes/microvm-recipe.md`` §2): PVH
``vmlinux`` + a tiny initramfs, ACPI on (virtio-mmio is found through ACPI), the network
of :mod:`localsbx.vm.net` (passt through ``-netdev stream`` with internet, restricted user
networking without; the helper is started by :meth:`QemuProcess.start` before QEMU and
stopped by :meth:`QemuProcess.shutdown`), ``-accel tcg,tb-size=64`` plus ``tsc_early_khz`` under TCG. Guest RAM may
live in a ``memory-backend-file`` so a snapshot can keep it in a file (method C).

:class:`QemuProcess` owns one QEMU: it is started with :meth:`start` and always stopped by
:meth:`shutdown` (idempotent; QMP ``quit``, then SIGTERM, then SIGKILL, each bounded), and an
``async with`` block guarantees that. Processes that must outlive their creator (a CLI
``localsbx new``) are started ``detached``; the others die with their owner (Linux
``PR_SET_PDEATHSIG``) so a SIGKILLed pytest run leaks no QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import functools
import logging
import os
import re
import shlex
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from qemu.qmp import QMPClient

from localsbx.errors import VMError, VMLaunchError
from localsbx.vm import net as vmnet
from localsbx.vm.net import NetHandle, NetSpec

log = logging.getLogger("localsbx.vm")

#: Guest TCP port of localsbx's own SSH server (see docs/ARCHITECTURE.md).
GUEST_SSH_PORT = 10022
#: Printed on the console by the guest agent once its SSH server listens.
READY_MARKER = b"LOCALSBX-READY"
QEMU_BINARY = "qemu-system-x86_64"

# The "fast" kernel command line of the recipe (§2), minus what depends on the accelerator.
_BASE_CMDLINE = (
    "console=ttyS0 root=/dev/vda rw quiet loglevel=1 nokaslr mitigations=off "
    "cryptomgr.notests audit=0 apparmor=0 security=none ima_appraise=off "
    "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd no_timer_check "
    "random.trust_cpu=on panic=-1"
)


@dataclass(frozen=True)
class Accel:
    """How guests are accelerated.

    :param kind: ``"kvm"`` or ``"tcg"``.
    :param tsc_khz: host TSC frequency in kHz, passed as ``tsc_early_khz`` under TCG
        (recipe pitfall 1: without it most TCG boots hang calibrating the TSC).
    :param reason: one line saying why this accelerator was chosen.
    """

    kind: str
    tsc_khz: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class VMSpec:
    """Everything that shapes one QEMU process. Sizes in MiB, paths absolute.

    :param ram_file: when set, guest RAM is a ``memory-backend-file`` at this path
        (``ram_share=True`` while building a snapshot, ``False`` = copy-on-write for clones).
    :param incoming: start with ``-incoming defer`` (a snapshot restore).
    :param net: the guest's network (host side; not part of the snapshot key).
    :param net_socket: passt's UNIX socket, filled in by :meth:`QemuProcess.start`
        (``build_argv`` stays pure).
    :param ssh_host_port: the host port (127.0.0.1) forwarded to the guest's SSH port, filled
        in by :meth:`QemuProcess.start`; 0 = QEMU picks it (read back with ``info usernet``).
    :param extra_disks: more qcow2 files after the root drive, each a virtio-blk device with
        serial ``lsbx-disk-N`` (N from 0; the guest finds it by ``/sys/block/vd*/serial``).
        Used by the build VM for the roots of other images (``COPY --from=IMAGE``, stages on
        other bases); never in a snapshot VM.
    """

    kernel: Path
    initrd: Path
    disk: Path
    serial_log: Path
    qmp_socket: Path
    accel: Accel
    memory_mib: int = 1024
    cpus: int = 1
    ram_file: Path | None = None
    ram_share: bool = False
    incoming: bool = False
    extra_cmdline: tuple[str, ...] = ()
    name: str = "localsbx"
    net: NetSpec = field(default_factory=NetSpec)
    net_socket: Path | None = None
    ssh_host_port: int = 0
    extra_disks: tuple[Path, ...] = ()


#: Serial prefix of :attr:`VMSpec.extra_disks` (``lsbx-disk-0`` ...).
EXTRA_DISK_SERIAL = "lsbx-disk-"


def opts(*positional: str, **props: object) -> str:
    """Join QEMU ``k=v`` properties, escaping ``,`` as ``,,`` (QEMU's own quoting)."""
    parts = [p.replace(",", ",,") for p in positional]
    for k, v in props.items():
        if isinstance(v, bool):
            v = "on" if v else "off"
        parts.append(f"{k.replace('_', '-')}={str(v).replace(',', ',,')}")
    return ",".join(parts)


def kernel_cmdline(spec: VMSpec) -> str:
    """The guest kernel command line for ``spec`` (recipe §2 fast cmdline)."""
    parts = [_BASE_CMDLINE]
    if spec.accel.kind == "tcg":
        parts.append("tsc=reliable")
        if spec.accel.tsc_khz:
            parts.append(f"tsc_early_khz={spec.accel.tsc_khz}")
    parts.extend(spec.extra_cmdline)
    return " ".join(parts)


def machine_shape(spec: VMSpec) -> list[str]:
    """What the guest sees of the machine, as an explicit list (part of the snapshot key).

    Only guest-visible things: machine type and RAM backing, accelerator and CPU model, RAM
    size, vCPUs, kernel command line and the devices in order. Nothing of the host side of the
    network (backend, options, ports, sockets), of paths or of ``-incoming``/``share``: a
    snapshot taken with internet on restores with internet off.
    """
    kvm = spec.accel.kind == "kvm"
    return [
        "machine=microvm" + (",memory-backend=mem" if spec.ram_file is not None else ""),
        "ram=" + ("memory-backend-file" if spec.ram_file is not None else "anonymous"),
        "accel=" + ("kvm" if kvm else "tcg"),
        "cpu=" + ("host" if kvm else "max"),
        f"memory={spec.memory_mib}M",
        f"smp={spec.cpus}",
        "cmdline=" + kernel_cmdline(spec),
        "serial=ttyS0",
        "device=virtio-blk-device,drive=root",
        *(f"device=virtio-blk-device,drive=x{i},serial={EXTRA_DISK_SERIAL}{i}"
          for i in range(len(spec.extra_disks))),
        "device=" + vmnet.device_arg(),
        "device=virtio-rng-device",
    ]


def build_argv(spec: VMSpec) -> list[str]:
    """Build the full QEMU argv for ``spec``. Pure: no I/O, no probing.

    :returns: argv list starting with ``qemu-system-x86_64``.
    """
    machine = ["microvm"]
    mem: list[str] = ["-m", f"{spec.memory_mib}M"]
    if spec.ram_file is not None:
        machine.append("memory-backend=mem")
        mem += [
            "-object",
            opts("memory-backend-file", id="mem", size=f"{spec.memory_mib}M",
                 mem_path=str(spec.ram_file), share=spec.ram_share),
        ]
    if spec.accel.kind == "kvm":
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel = ["-accel", "tcg,tb-size=64", "-cpu", "max"]
    argv = [
        QEMU_BINARY,
        "-name", opts(spec.name),
        "-M", ",".join(machine),
        *accel,
        *mem,
        "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config",
        "-no-reboot",  # a guest panic (panic=-1) or reboot ends QEMU: never a silent reboot
        "-display", "none",
        "-serial", f"file:{spec.serial_log}",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", kernel_cmdline(spec),
        "-drive", opts(f"file={spec.disk}", "if=none", id="root", format="qcow2", discard="unmap"),
        "-device", "virtio-blk-device,drive=root",
        *[a for i, d in enumerate(spec.extra_disks) for a in (
            "-drive", opts(f"file={d}", "if=none", id=f"x{i}", format="qcow2"),
            "-device", f"virtio-blk-device,drive=x{i},serial={EXTRA_DISK_SERIAL}{i}")],
        "-netdev", _netdev(spec),
        "-device", vmnet.device_arg(),
        "-device", "virtio-rng-device",
        "-qmp", opts(f"unix:{spec.qmp_socket}", server=True, wait=False),
    ]  # fmt: skip
    if spec.incoming:
        argv += ["-incoming", "defer"]
    return argv


def _netdev(spec: VMSpec) -> str:
    arg = vmnet.netdev_arg(spec.net, socket_path=spec.net_socket)
    if spec.net.kind == "slirp" and spec.ssh_host_port:
        arg = arg.replace("hostfwd=tcp:127.0.0.1:0-", f"hostfwd=tcp:127.0.0.1:{spec.ssh_host_port}-")
    return arg


def host_tsc_khz() -> int | None:
    """Host TSC frequency in kHz from /proc/cpuinfo (``cpu MHz`` × 1000), or ``None``.

    Under TCG the guest TSC runs at the host TSC rate, so this is what the guest needs as
    ``tsc_early_khz`` (recipe pitfall 1).
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.M)
    return int(float(m.group(1)) * 1000) if m else None


@functools.lru_cache(maxsize=1)
def qemu_version() -> str:
    """``qemu-system-x86_64 --version`` first line (part of the snapshot key; cached for
    the life of the process).

    :raises VMError: when QEMU is not installed.
    """
    try:
        out = subprocess.run([QEMU_BINARY, "--version"], capture_output=True, text=True,
                             check=True, timeout=30).stdout
    except FileNotFoundError as exc:
        raise VMError(f"{QEMU_BINARY} is not installed",
                      hint="apt-get install qemu-system-x86 qemu-utils (or `make setup`)") from exc
    return out.splitlines()[0].strip()


_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class QemuProcess:
    """One owned QEMU process and its QMP connection.

    Usage::

        async with QemuProcess(spec) as vm:   # started
            port = await vm.host_ssh_port()
        # QEMU is gone here, whatever happened

    :param detached: start QEMU in its own session with no parent-death signal, so it
        outlives this Python process (``localsbx new``). Otherwise it is killed when this
        process dies.
    :param wrapper: argv prefix, e.g. ``["timeout", "-k", "5", "600"]`` for a detached
        sandbox that must stop at its timeout; ``pid`` is then the wrapper's, which passes
        SIGTERM on to QEMU and exits with it.
    """

    spec: VMSpec
    detached: bool = False
    wrapper: list[str] = field(default_factory=list)
    proc: asyncio.subprocess.Process | None = field(default=None, init=False)
    qmp: QMPClient | None = field(default=None, init=False)
    pid: int | None = field(default=None, init=False)
    net: NetHandle | None = field(default=None, init=False)

    @property
    def argv(self) -> list[str]:
        return [*self.wrapper, *build_argv(self.spec)]

    def qemu_pid(self) -> int | None:
        """The QEMU process itself (the wrapper's child when there is a wrapper)."""
        if not self.wrapper or self.pid is None:
            return self.pid
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()[0])
        return None

    async def start(self, *, timeout: float = 30.0) -> None:
        """Start the VM's network helper (:func:`localsbx.vm.net.start_network`), spawn QEMU
        and connect QMP. ``spec`` then carries the helper's socket and host port.

        :param timeout: seconds to wait for the QMP socket; default 30.
        :raises VMLaunchError: the network helper or QEMU failed, or QMP never came up
            (QEMU and the helper are stopped).
        """
        self.spec.serial_log.parent.mkdir(parents=True, exist_ok=True)
        self.net = await vmnet.start_network(self.spec.net, workdir=self.spec.serial_log.parent,
                                             detached=self.detached)
        try:
            self.spec = dataclasses.replace(self.spec, net_socket=self.net.socket_path,
                                            ssh_host_port=self.net.host_port)
            await self._spawn(timeout)
        except BaseException:
            await self.shutdown(graceful=False)
            raise

    async def _spawn(self, timeout: float) -> None:
        argv = self.argv
        log.debug("+ %s", shlex.join(argv))
        with contextlib.suppress(FileNotFoundError):
            self.spec.qmp_socket.unlink()
        self.spec.serial_log.parent.mkdir(parents=True, exist_ok=True)
        stderr_path = self.spec.serial_log.with_suffix(".qemu.log")
        with open(stderr_path, "wb") as err:
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    start_new_session=True,
                    preexec_fn=None if self.detached else _die_with_parent,
                )
            except FileNotFoundError as exc:
                raise VMLaunchError(f"{QEMU_BINARY} is not installed", argv=argv,
                                    hint="apt-get install qemu-system-x86 qemu-utils") from exc
        self.pid = self.proc.pid
        # Recorded at once, so a creator killed half-way can be cleaned up by `reap()`.
        pid_file = self.spec.serial_log.parent / "qemu.pid"
        with contextlib.suppress(OSError):
            pid_file.write_text(f"{self.pid} {proc_start_time(self.pid)}")
        await self._connect_qmp(timeout)

    async def _connect_qmp(self, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        last: Exception | None = None
        while asyncio.get_running_loop().time() < deadline:
            if self.proc is not None and self.proc.returncode is not None:
                raise VMLaunchError("QEMU exited during start-up", argv=self.argv,
                                    returncode=self.proc.returncode, log_tail=self.log_tail())
            if self.spec.qmp_socket.exists():
                client = QMPClient(self.spec.name)
                try:
                    await client.connect(str(self.spec.qmp_socket))
                    self.qmp = client
                    return
                except Exception as exc:  # noqa: BLE001 - retried, reported below
                    last = exc
                    with contextlib.suppress(Exception):
                        await client.disconnect()
            await asyncio.sleep(0.02)
        raise VMLaunchError(f"QMP did not come up within {timeout:.0f} s ({last})",
                            argv=self.argv, log_tail=self.log_tail())

    async def execute(self, cmd: str, args: dict | None = None, *, timeout: float = 30.0):
        """Run one QMP command, bounded by ``timeout`` seconds (QMPClient has none).

        :raises VMError: QMP is not connected, the command failed or timed out.
        """
        if self.qmp is None:
            raise VMError(f"QMP is not connected (command {cmd})")
        try:
            async with asyncio.timeout(timeout):
                return await self.qmp.execute(cmd, args)
        except TimeoutError as exc:
            raise VMError(f"QMP command {cmd} did not answer within {timeout:.0f} s") from exc
        except Exception as exc:
            if isinstance(exc, VMError):
                raise
            raise VMError(f"QMP command {cmd} failed: {exc}") from exc

    async def hmp(self, command_line: str) -> str:
        """Run a human-monitor command through QMP and return its text."""
        return str(await self.execute("human-monitor-command", {"command-line": command_line}))

    async def host_ssh_port(self) -> int:
        """The host port (on 127.0.0.1) forwarded to the guest SSH port: known up front with
        passt; with user networking read from ``info usernet`` (libslirp reports the real
        port behind port 0).

        :raises VMError: no forward found.
        """
        if self.spec.ssh_host_port:
            return self.spec.ssh_host_port
        text = await self.hmp("info usernet")
        m = re.search(rf"HOST_FORWARD\]?\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+\S+\s+{GUEST_SSH_PORT}", text)
        if not m:
            raise VMError(f"no SSH port forward in `info usernet`:\n{text}")
        return int(m.group(1))

    async def wait_for_serial(self, marker: bytes, *, timeout: float) -> None:
        """Wait until ``marker`` appears in the serial log.

        :param timeout: seconds; the guest is taken as dead after that.
        :raises VMLaunchError: QEMU exited or the marker did not appear in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with contextlib.suppress(FileNotFoundError):
                if marker in self.spec.serial_log.read_bytes():
                    return
            if self.proc is not None and self.proc.returncode is not None:
                raise VMLaunchError("the guest stopped before it was ready", argv=self.argv,
                                    returncode=self.proc.returncode, log_tail=self.log_tail())
            if loop.time() > deadline:
                raise VMLaunchError(f"the guest was not ready within {timeout:.0f} s",
                                    argv=self.argv, log_tail=self.log_tail())
            await asyncio.sleep(0.02)

    def log_tail(self, lines: int = 30) -> str:
        """Last lines of the serial log and QEMU's own stderr, for error messages."""
        out = []
        for path in (self.spec.serial_log, self.spec.serial_log.with_suffix(".qemu.log")):
            with contextlib.suppress(OSError):
                text = path.read_bytes().decode(errors="replace").splitlines()
                if text:
                    out.append(f"[{path.name}]")
                    out.extend(text[-lines:])
        return "\n".join(out)

    async def disconnect_qmp(self) -> None:
        """Drop the QMP connection (leaving QEMU running), so another process can connect."""
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            self.qmp = None

    async def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for QEMU to exit; its exit status or ``None``."""
        if self.proc is None:
            return None
        try:
            async with asyncio.timeout(timeout):
                return await self.proc.wait()
        except TimeoutError:
            return None

    async def shutdown(self, *, graceful: bool = True, timeout: float = 5.0) -> None:
        """Stop QEMU for sure. Idempotent.

        QMP ``quit`` (when ``graceful``), then SIGTERM, then SIGKILL, each waiting at most
        ``timeout`` seconds. The QMP socket file is removed.
        """
        try:
            if self.proc is not None and self.proc.returncode is None:
                if graceful and self.qmp is not None:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(timeout):
                            await self.qmp.execute("quit")
                    if await self.wait(timeout) is not None:
                        return
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        self.proc.send_signal(sig)
                    if await self.wait(timeout) is not None:
                        return
                log.warning("QEMU pid %s did not exit after SIGKILL", self.pid)
        finally:
            await self.disconnect_qmp()
            with contextlib.suppress(FileNotFoundError):
                self.spec.qmp_socket.unlink()
            await vmnet.stop_network(self.net)

    async def __aenter__(self) -> QemuProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.shutdown(graceful=False)


def kill_pid(pid: int, *, start_time: int | None = None) -> bool:
    """SIGKILL a QEMU we own by pid, if it is still that process.

    :param start_time: the process start time (``/proc/PID/stat`` field 22) recorded when it
        was started; guards against pid reuse. ``None`` skips the check.
    :returns: whether a signal was sent.
    """
    if not pid_alive(pid, start_time):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        return True
    return False


def proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether ``pid`` runs and (if given) started at ``start_time`` and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return False
    return start_time is None or int(fields[19]) == start_time
