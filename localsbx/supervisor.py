"""The per-sandbox supervisor: one small process per sandbox that owns its QEMU, QMP, the
guest SSH session, the timeout and the exposed ports, and serves every other process
(CLI, library, pytest, the HTTP server) on a unix control socket (:mod:`localsbx.control`).

Why this shape (containerd-shim, conmon): a sandbox must outlive the process that made it
and be driven by any other, yet a QMP connection, an SSH session, a timer that pauses while
suspended and port listeners all need a process that is there for the sandbox's whole life.
One supervisor per sandbox keeps failures apart (a crash loses one control process, never the
others' sandboxes) and needs no daemon to start or upgrade. QEMU is *not* tied to it: QEMU
runs in its own session, so a SIGKILL of the supervisor leaves the guest running, and the
next client that finds the control socket dead starts a new supervisor that re-attaches
(QMP socket, SSH port and host key are in the record). A sandbox with an owner (pytest, a
library caller) is terminated by its supervisor within half a second of the owner's death;
if both die, ``store.reap()`` kills the QEMU recorded for it.

Run as ``python -m localsbx.supervisor MODE SANDBOX_ID [--ready-fd N]``, MODE one of
``create`` (boot the sandbox described by its pending record), ``resume`` (load a suspended
sandbox), ``attach`` (take over a running QEMU). On ``--ready-fd`` it writes one JSON line,
``{"ok": true}`` or an error frame, once it serves or has failed.

Operations (request ``op``): ``info``, ``exec`` (streams ``stdout``/``stderr`` frames),
``put``/``get`` (files), ``terminate``, ``suspend``, ``checkpoint``, ``expose``,
``unexpose``, ``refresh`` (re-read the record: owner, timeout, name), and background
processes: ``start_process``, ``list_processes``, ``get_process``, ``signal_process``,
``kill_process``, ``write_stdin``, ``close_stdin``, ``process_output`` (``follow`` streams).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from localsbx import control, store
from localsbx.errors import (
    ConfigError,
    GuestError,
    LocalsbxError,
    SandboxNotFound,
    SandboxStateError,
    SnapshotError,
    VMError,
)
from localsbx.store import SandboxRecord, SandboxState

log = logging.getLogger("localsbx.supervisor")
_STARTED = time.monotonic()

#: Seconds between checks of the owner, the QEMU and the record.
WATCH_INTERVAL = 0.5
#: Seconds a client waits for a new supervisor to be ready (a TCG cold boot takes 5-10 s).
READY_TIMEOUT = 240.0


def control_socket_path(sandbox_dir: Path) -> Path:
    """``<sandbox>/ctl.sock``, or a short path under ``/tmp`` when that is too long for
    ``AF_UNIX`` (108 bytes)."""
    p = sandbox_dir / "ctl.sock"
    if len(str(p)) < 100:
        return p
    return Path("/tmp") / f"localsbx-{os.getuid()}-{sandbox_dir.name}.ctl"


def spawn(sandbox_id: str | None, mode: str, *, ready_fd: int | None = None,
          go_fd: int | None = None) -> subprocess.Popen:
    """Start a supervisor for ``sandbox_id`` in its own session (it outlives the caller).

    :param mode: ``create``, ``resume`` or ``attach``.
    :param ready_fd: a pipe's write end; the supervisor reports readiness on it.
    :param go_fd: a pipe's read end: the supervisor imports what it needs, then waits for a
        byte on it before it reads the record (so its start-up overlaps the caller's work);
        end of file = not needed after all, it exits.
    :param sandbox_id: ``None`` for a spare (mode ``spare``): it learns its mode and
        sandbox from the go pipe (see :class:`Launch`) and logs nowhere until then.
    :returns: the process (the caller need not wait for it; it is reaped by init).
    """
    argv = [sys.executable, "-m", "localsbx.supervisor", mode, sandbox_id or "-"]
    fds = []
    if ready_fd is not None:
        argv += ["--ready-fd", str(ready_fd)]
        fds.append(ready_fd)
    if go_fd is not None:
        argv += ["--go-fd", str(go_fd)]
        fds.append(go_fd)
    log_path = store.sandbox_dir(sandbox_id) / "supervisor.log" if sandbox_id else os.devnull
    with open(log_path, "ab") as logf:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True, close_fds=True, pass_fds=tuple(fds))


#: Set to ``0`` to start every supervisor afresh (no spare kept; see :class:`Launch`).
SPARE_ENV = "LOCALSBX_SPARE_SUPERVISOR"


def _spare_key() -> tuple:
    """What a spare inherited that must still hold when it is used: this process, and the
    environment that picks the store and configures localsbx."""
    return (os.getpid(), tuple(sorted((k, v) for k, v in os.environ.items()
                                      if k.startswith(("LOCALSBX_", "XDG_")))))


class Launch:
    """A supervisor being started: :meth:`go` lets it proceed, :meth:`wait` waits until it
    serves, :meth:`abort` stops it. ``Launch(id, mode)`` spawns it at once, so its imports
    (0.3-0.5 s under load: asyncssh, qemu.qmp, localsbx) run while the caller prepares the
    record.

    A ``create`` takes this process's *spare* instead when there is one: a supervisor
    started after the previous create, imported and waiting on its go pipe, told its
    sandbox by the line ``create ID`` (the pre-forked worker of a server, or a zygote).
    The spare costs one idle Python process (about 45 MiB RSS) per process that created a
    sandbox; it exits when that process exits (end of file on its go pipe).  It is not
    used when this process's environment (``LOCALSBX_*``, ``XDG_*``) changed since it
    started, nor in a forked child; ``LOCALSBX_SPARE_SUPERVISOR=0`` turns it off.
    """

    _spare: Launch | None = None
    _spare_key: tuple | None = None
    _spare_lock = threading.Lock()

    def __init__(self, sandbox_id: str | None, mode: str, *, _spare: bool = False) -> None:
        self.sandbox_id, self.mode = sandbox_id, mode
        self._ready_r, ready_w = os.pipe()
        go_r, self._go_w = os.pipe()
        try:
            self.proc = spawn(sandbox_id, "spare" if _spare else mode,
                              ready_fd=ready_w, go_fd=go_r)
        except BaseException:
            for fd in (self._ready_r, self._go_w):
                os.close(fd)
            raise
        finally:
            os.close(ready_w)
            os.close(go_r)
        self._word = b"g"

    @classmethod
    def start(cls, sandbox_id: str, mode: str) -> Launch:
        """``Launch(sandbox_id, mode)``, or for ``create`` the spare, given its sandbox."""
        if mode == "create" and os.environ.get(SPARE_ENV, "1") != "0":
            with cls._spare_lock:
                spare, key = cls._spare, cls._spare_key
                cls._spare = cls._spare_key = None
            if spare is not None:
                if key == _spare_key() and spare.proc.poll() is None:
                    spare.sandbox_id, spare._word = sandbox_id, f"create {sandbox_id}\n".encode()
                    return spare
                spare.abort()
        return cls(sandbox_id, mode)

    @classmethod
    def keep_spare(cls) -> None:
        """Start the spare for this process's next create, unless one is ready (after a
        create has come up, so its imports do not compete with that boot)."""
        if os.environ.get(SPARE_ENV, "1") == "0":
            return
        with cls._spare_lock:
            if cls._spare is not None and cls._spare.proc.poll() is None:
                return
            try:
                cls._spare, cls._spare_key = cls(None, "create", _spare=True), _spare_key()
            except OSError as exc:  # no spare: the next create spawns its own
                log.debug("no spare supervisor: %s", exc)

    def go(self) -> None:
        try:
            os.write(self._go_w, self._word)
        finally:
            os.close(self._go_w)
            self._go_w = None

    def abort(self) -> None:
        """Not needed after all: it exits without touching anything."""
        if self._go_w is not None:
            os.close(self._go_w)
            self._go_w = None
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(OSError):
            os.close(self._ready_r)

    async def wait(self, timeout: float = READY_TIMEOUT) -> None:
        """:raises LocalsbxError: the error it reported (its own class:
        ``VMLaunchError``, ``SnapshotError``...), or ``VMLaunchError`` with its log tail
        when it died."""
        from localsbx.errors import VMLaunchError

        sid, proc = self.sandbox_id, self.proc
        if self._go_w is not None:
            try:
                self.go()
            except BrokenPipeError:  # a spare that died idle
                with contextlib.suppress(OSError):
                    os.close(self._ready_r)
                fresh = Launch(sid, self.mode)
                self.proc, self._ready_r = fresh.proc, fresh._ready_r
                fresh.go()
        try:
            line = await asyncio.wait_for(asyncio.to_thread(_read_line, self._ready_r), timeout)
        except TimeoutError:
            proc.kill()
            raise VMLaunchError(f"sandbox {sid}: its supervisor was not ready within "
                                f"{timeout:.0f} s", log_tail=_log_tail(sid)) from None
        except BaseException:
            # interrupted: the supervisor must not boot a sandbox nobody will use
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.close(self._ready_r)
        if not line:
            await asyncio.to_thread(proc.wait, 10)
            raise VMLaunchError(f"sandbox {sid}: its supervisor exited during {self.mode} "
                                f"(status {proc.returncode})", returncode=proc.returncode,
                                log_tail=_log_tail(sid))
        frame = json.loads(line)
        if not frame.get("ok"):
            control.raise_error(frame.get("error") or {})


async def start_and_wait(sandbox_id: str, mode: str, *, timeout: float = READY_TIMEOUT) -> None:
    """Spawn a supervisor and wait until it serves (see :meth:`Launch.wait`)."""
    await Launch.start(sandbox_id, mode).wait(timeout)


def _read_line(fd: int) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
    return buf


def _log_tail(sandbox_id: str, lines: int = 30) -> str:
    d = store.sandbox_dir(sandbox_id)
    out = []
    for name in ("supervisor.log", "serial.log", "serial.qemu.log"):
        with contextlib.suppress(OSError):
            text = (d / name).read_bytes().decode(errors="replace").splitlines()
            if text:
                out.append(f"[{name}]")
                out.extend(text[-lines:])
    return "\n".join(out)


async def _client_frames(reader: asyncio.StreamReader, *, gone: asyncio.Event,
                         done: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    """The data of a client's streamed ``{"stream": "stdin"}`` frames, read one at a time
    (so the client is held back as fast as the guest takes them), until the EOF frame.
    ``gone`` is set when the connection ends or breaks first; ``done`` when reading stops."""
    try:
        while True:
            frame = await control.read_frame(reader)
            if frame is None:
                gone.set()
                return
            hdr, data = frame
            if hdr.get("eof"):
                return
            if data:
                yield data
    except (control.ProtocolError, ConnectionError):
        gone.set()
    finally:
        if done is not None:
            done.set()


#: Lines of output kept per background process (oldest dropped first).
PROCESS_OUTPUT_LINES = 10000


#: Where a background process's output, stdin FIFO and exit status live in the guest
#: (``agent spawn``): ``/run`` is a tmpfs, so they use guest RAM (see docs/ARCHITECTURE.md).
GUEST_PROC_DIR = "/run/localsbx/proc"


class GuestProcess:
    """A background process of the sandbox. Started by ``agent spawn`` (``dir`` set), its
    output, stdin and exit status are files in the guest that this supervisor follows
    (``agent follow`` from byte offsets), so a later supervisor finds all of them again;
    started by an older agent, ``proc`` is its SSH channel and they die with it."""

    def __init__(self, *, argv, name, cgroup, proc, stdin_open, dir=None) -> None:
        self.argv, self.name, self.cgroup, self.proc = argv, name, cgroup, proc
        self.stdin_open = stdin_open
        self.dir: str | None = dir
        #: bytes of each guest file received so far (where a follow continues)
        self.offsets = {"stdout": 0, "stderr": 0}
        self._partial = {"stdout": b"", "stderr": b""}
        self.exit_code: int | None = None
        self.exit_signal: int | None = None
        self.pid = 0
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.lines: collections.deque = collections.deque(maxlen=PROCESS_OUTPUT_LINES)
        self.dropped = 0
        self.ended = asyncio.Event()
        self.changed = asyncio.Condition()
        self._tasks: list[asyncio.Task] = []

    @property
    def running(self) -> bool:
        return not self.ended.is_set()

    def start_readers(self) -> None:
        self._tasks = [asyncio.create_task(self._read(self.proc.stdout, "stdout")),
                       asyncio.create_task(self._read(self.proc.stderr, "stderr"))]
        self._tasks.append(asyncio.create_task(self._wait()))

    async def _read(self, stream, name: str) -> None:
        buf = b""
        with contextlib.suppress(Exception):
            while chunk := await stream.read(65536):
                buf += chunk
                *whole, buf = buf.split(b"\n")
                for line in whole:
                    self._add(name, line)
                await self._notify()
        if buf:
            self._add(name, buf)
            await self._notify()

    def _add(self, stream: str, line: bytes) -> None:
        if len(self.lines) == self.lines.maxlen:
            self.dropped += 1
        self.lines.append((stream, line.decode(errors="replace"), time.time()))

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    def _feed(self, name: str, chunk: bytes) -> None:
        """Bytes of the guest file ``name`` (in order, from :attr:`offsets`)."""
        self.offsets[name] += len(chunk)
        *whole, self._partial[name] = (self._partial[name] + chunk).split(b"\n")
        for line in whole:
            self._add(name, line)
        task = asyncio.get_running_loop().create_task(self._notify())
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    def start_follow(self, guest, ready=None) -> None:
        self._tasks.append(asyncio.create_task(self._follow(guest, ready)))

    async def _follow(self, guest, ready) -> None:
        """``agent follow`` the guest files until the process ended (its exit file), then
        read its status. A broken connection leaves it running, status unknown."""
        from localsbx.guest.ssh import agent_command

        async def open_stdin():  # the follower ends when its channel's input does
            await asyncio.Event().wait()
            yield b""

        try:
            if ready is not None:
                await ready()
            res = await guest.raw(
                agent_command("follow", self.dir, str(self.offsets["stdout"]),
                              str(self.offsets["stderr"])),
                stdout_cb=lambda b: self._feed("stdout", b),
                stderr_cb=lambda b: self._feed("stderr", b),
                timeout=None, stdin_stream=open_stdin())
            if res.exit_status != 0:
                raise GuestError(res.stderr.decode(errors="replace").strip())
            for name, rest in self._partial.items():
                if rest:
                    self._add(name, rest)
                self._partial[name] = b""
            status = (await guest.get_file(f"{self.dir}/exit")).decode().split()
            if status[0] == "signal":
                self.exit_signal = int(status[1])
            else:
                self.exit_code = int(status[1])
            self.stdin_open = False
            self.ended_at = time.time()
            self.ended.set()
        except (LocalsbxError, OSError, ValueError, IndexError) as exc:
            log.warning("following process %s: %s", self.pid, exc)
        await self._notify()

    async def _wait(self) -> None:
        # ended = its exit status (or signal) arrived; children it left may still hold its
        # output open, which keeps the channel (and the readers) going
        closed = asyncio.create_task(self.proc.wait_closed())
        while not closed.done() and self.proc.returncode is None:
            await asyncio.wait({closed}, timeout=0.1)
        if closed.done():
            await asyncio.gather(*self._tasks[:2], return_exceptions=True)
        else:
            await asyncio.wait(set(self._tasks[:2]), timeout=0.5)
        self.ended_at = time.time()
        self.ended.set()
        await self._notify()

    def info(self) -> dict:
        """Tensorlake's ``ProcessInfo``: pid, status, exit_code/signal, command, times."""
        from localsbx.guest.ssh import _signal_number

        status, code, sig = "running", None, None
        if self.ended.is_set() and self.dir is not None:  # from its exit file
            code, sig = self.exit_code, self.exit_signal
            status = "signaled" if sig is not None else "exited"
        elif self.ended.is_set() and self.proc is None:  # adopted: its status was not seen
            status = "exited"
        elif self.ended.is_set():
            code = self.proc.exit_status
            if self.proc.exit_signal:
                sig = _signal_number(self.proc.exit_signal[0])
                status = "signaled"
            else:
                status = "exited"
        return {"pid": self.pid, "name": self.name, "status": status, "exit_code": code,
                "signal": sig, "command": self.argv[0], "args": self.argv[1:],
                "started_at": self.started_at, "ended_at": self.ended_at,
                "stdin_open": self.stdin_open}


class Supervisor:
    """The state of one sandbox's supervisor (see the module docstring)."""

    def __init__(self, rec: SandboxRecord) -> None:
        self.rec = rec
        self.machine = None  # localsbx.vm.machine.Machine
        self.server: asyncio.AbstractServer | None = None
        self.done = asyncio.Event()
        self.forwards: dict[int, object] = {}
        self.processes: dict[int, GuestProcess] = {}
        self._fixup: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # lifecycle operations, one at a time
        self._stopping = False

    # ------------------------------------------------------------------ start

    async def boot(self, mode: str) -> None:
        """Bring the guest up (``create``/``resume``) or take it over (``attach``), then
        record it as running."""
        from localsbx.vm.machine import Machine

        rec = self.rec
        if mode == "attach":
            await self._attach()
        else:
            from localsbx.vm.accel import choose_accel
            from localsbx.vm.disk import clone_overlay
            from localsbx.vm.net import NetSpec

            accel = await choose_accel(Path(rec.kernel), Path(rec.base_initrd or rec.initrd))
            key = store.management_key()
            d = rec.dir
            overlay = d / "overlay.qcow2"
            if mode == "create":
                await clone_overlay(overlay, Path(rec.disk_backing))
            common = {"kernel": Path(rec.kernel), "disk": overlay, "workdir": d, "accel": accel,
                          "client_key": key, "cpus": rec.cpus, "memory_mib": rec.memory_mb,
                          "detached": True, "name": f"localsbx-{rec.id}",
                          "net": NetSpec(internet=rec.internet, allow_out=tuple(rec.allow_nets),
                                         deny_out=tuple(rec.deny_nets))}
            if mode == "create" and rec.cold_boot:
                self.machine = await Machine.cold_boot(initrd=Path(rec.initrd), **common)
                rec.initrd = str(d / "initrd.cpio")  # with this VM's identity appended
                rec.host_key = self.machine.host_key.export_public_key("openssh").decode().strip()
            else:
                state_file = Path(rec.state_file or "")
                self.machine = await Machine.restore(
                    initrd=Path(rec.initrd), ram_file=Path(rec.ram_file) if rec.ram_file else None,
                    state_file=state_file, host_key_public=rec.host_key, lazy_fixup=True,
                    **common)
            self._fixup = asyncio.create_task(self._post_boot(fresh=mode == "create"))
        m = self.machine
        ports = {}
        for guest_port, host_port in rec.ports.items():
            try:
                ports[guest_port] = await self._forward(int(guest_port), int(host_port or 0))
            except Exception as exc:  # noqa: BLE001 - the sandbox is usable without it
                log.warning("cannot forward guest port %s: %s", guest_port, exc)
        rec.ports = ports
        if mode == "create" and rec.state_file and not rec.cold_boot:
            # a clone of a memory checkpoint: the processes running at checkpoint time
            with contextlib.suppress(OSError):
                shutil.copyfile(Path(rec.state_file).parent / "processes.json",
                                rec.dir / "processes.json")
        if mode != "create" or (rec.dir / "processes.json").exists():
            self._adopt_processes()
        now = time.time()
        with store.sandbox_locked(rec.id):
            disk = store.load_sandbox(rec.id)
            # fields other processes may have changed since we read the record
            rec.owner_pid, rec.owner_start, rec.name = disk.owner_pid, disk.owner_start, disk.name
            rec.timeout_secs = disk.timeout_secs
            rec.state = SandboxState.RUNNING
            rec.ssh_port = m.ssh_port
            rec.qemu_pid = m.qemu.pid
            rec.qemu_start = _start_time(m.qemu.pid)
            rec.qmp_socket = str(m.qemu.spec.qmp_socket)
            rec.supervisor_pid, rec.supervisor_start = os.getpid(), _start_time(os.getpid())
            if rec.running_since is None:
                rec.running_since = now
            if mode == "resume":
                rec.state_file = None
            rec.error = None
            store.write_json_atomic(rec.dir / "sandbox.json", rec.to_json())
        if mode == "resume":
            with contextlib.suppress(OSError):
                (rec.dir / "suspend.mig").unlink()

    async def _attach(self) -> None:
        """Take over a running QEMU: QMP on its socket, SSH on its port."""
        import asyncssh

        from localsbx.guest.ssh import GuestConnection
        from localsbx.vm.machine import Machine
        from localsbx.vm.qemu import Accel, QemuProcess, VMSpec

        rec = self.rec
        if not rec.qemu_alive():
            raise VMError(f"sandbox {rec.id}: its QEMU (pid {rec.qemu_pid}) is gone")
        p = Path("/nonexistent")
        spec = VMSpec(kernel=Path(rec.kernel or p), initrd=Path(rec.initrd or p), disk=p,
                      serial_log=rec.dir / "serial.log",
                      qmp_socket=Path(rec.qmp_socket or rec.dir / "qmp.sock"),
                      accel=Accel("unknown"), memory_mib=rec.memory_mb, cpus=rec.cpus,
                      ram_file=Path(rec.ram_file) if rec.ram_file else None,
                      name=f"localsbx-{rec.id}")
        qemu = QemuProcess(spec, detached=True)
        qemu.pid = rec.qemu_pid
        if rec.qmp_socket and Path(rec.qmp_socket).exists():
            with contextlib.suppress(VMError, LocalsbxError):
                await qemu._connect_qmp(10)
        host_key = asyncssh.import_public_key(rec.host_key)
        guest = GuestConnection("127.0.0.1", rec.ssh_port, store.management_key(), host_key)
        await guest.connect(timeout=30, alive=rec.qemu_alive)
        self.machine = Machine(qemu, guest, host_key, rec.ssh_port)

    async def _post_boot(self, *, fresh: bool) -> None:
        """After a restore: the clock and CRNG (every time), and for a new sandbox its own
        machine-id and hostname (the snapshot's are shared by every clone otherwise)."""
        from localsbx.guest.ssh import agent_sets_identity

        guest = self.machine.guest
        if not fresh:
            await guest.fixup()
            return
        if agent_sets_identity(Path(self.rec.initrd)):
            # nothing to wait for: the first guest operation carries the clock, the CRNG
            # and the identity (one agent process, no shell)
            guest.set_identity(secrets.token_hex(16), self.rec.id)
            if self.rec.disk_mb:
                await self._grow_disk(self.rec.disk_mb)
            return
        # an agent from before that (a base or snapshot built earlier): a shell does the
        # identity; the clock/CRNG fixup rides on this command (GuestConnection.fixup_pending)
        # shell builtins only (every new binary costs a TCG translation): the files behind
        # the bind mounts of /etc/machine-id, /etc/hostname and /etc/hosts (guest init.sh)
        script = ('printf "%s\\n" "$1" > /run/localsbx/machine-id && '
                  'printf "%s\\n" "$2" > /run/localsbx/hostname && '
                  'printf "%s" "$2" > /proc/sys/kernel/hostname && '
                  'printf "127.0.0.1\\tlocalhost\\n127.0.1.1\\t%s\\n::1\\tlocalhost '
                  'ip6-localhost ip6-loopback\\nff02::1\\tip6-allnodes\\nff02::2\\t'
                  'ip6-allrouters\\n" "$2" > /run/localsbx/hosts')
        args = ["-c", script, "sh", secrets.token_hex(16), self.rec.id]
        res = await guest.exec(["/bin/sh", *args], env={}, timeout=30)
        if res.exit_status == 127:  # a rootfs without a shell: the boot kit's busybox
            from localsbx.guest.ssh import KIT_BUSYBOX

            res = await guest.exec([KIT_BUSYBOX, "sh", *args], env={}, timeout=30)
        if res.exit_status != 0:
            log.warning("identity fixup failed: %s", res.stderr.decode(errors="replace"))
        if self.rec.disk_mb:
            await self._grow_disk(self.rec.disk_mb)

    async def _grow_disk(self, disk_mb: int) -> None:
        """Grow the root disk to ``disk_mb`` MiB: QMP ``block_resize`` (virtio-blk tells the
        guest kernel), then the agent grows the ext4 online. A failure is recorded as the
        sandbox's error and logged; the sandbox stays usable at its old size."""
        want = int(disk_mb) << 20
        try:
            await self.machine.qemu.execute("block_resize", {"device": "root", "size": want})
            res = await self.machine.guest.agent("resizefs", str(want), "/", timeout=60)
            if res.exit_status != 0:
                raise GuestError(res.stderr.decode(errors="replace").strip())
        except (LocalsbxError, OSError) as exc:
            log.warning("growing the disk to %s MiB failed: %s", disk_mb, exc)
            store.update_sandbox(self.rec.id, error=f"disk_mb={disk_mb}: {exc}")

    async def ready(self) -> None:
        """Wait for the post-restore fixup (every operation that touches the guest does)."""
        if self._fixup is not None:
            try:
                await self._fixup
            except Exception as exc:  # noqa: BLE001 - reported, the guest still runs
                log.warning("post-restore fixup failed: %s", exc)
            self._fixup = None

    # ------------------------------------------------------------------ serve

    async def serve(self) -> None:
        path = control_socket_path(self.rec.dir)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old = os.umask(0o077)
        try:
            self.server = await asyncio.start_unix_server(self._client, str(path),
                                                          limit=control.MAX_LINE)
        finally:
            os.umask(old)
        store.update_sandbox(self.rec.id, control_socket=str(path),
                             supervisor_pid=os.getpid(), supervisor_start=_start_time(os.getpid()))
        self.rec.control_socket = str(path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            frame = await control.read_frame(reader)
            if frame is None:
                return
            header, payload = frame
            op = header.get("op")
            handler = getattr(self, f"op_{op}", None)
            if handler is None:
                raise SandboxStateError(f"unknown control operation {op!r}")
            result = await handler(header, payload, reader, writer)
            writer.write(control.encode_frame({"ok": True, "result": result}))
        except (ConnectionError, control.ProtocolError):
            return
        except Exception as exc:
            if not isinstance(exc, LocalsbxError):
                log.exception("control operation failed")
            with contextlib.suppress(Exception):
                writer.write(control.encode_frame(control.error_frame(exc)))
        finally:
            with contextlib.suppress(Exception):
                await writer.drain()
                writer.close()

    def _require_running(self) -> None:
        if self._stopping or self.machine is None:
            raise SandboxStateError(f"sandbox {self.rec.id} is stopping")

    # ------------------------------------------------------------------ operations

    async def op_info(self, h, payload, reader, writer) -> dict:
        return self.rec.to_json()

    async def op_refresh(self, h, payload, reader, writer) -> dict:
        self.rec = _merge_shared(self.rec, store.load_sandbox(self.rec.id))
        return self.rec.to_json()

    async def op_exec(self, h, payload, reader, writer) -> dict:
        """Run argv in the guest; output streams back as frames while it runs. If the client
        goes away (Ctrl-C), the command's process tree is killed.

        ``"stdin": true`` feeds the request's payload, then EOF; ``"stdin": "stream"`` feeds
        the client's stdin frames (``{"stream": "stdin", "size": N}`` + N bytes) as they
        come, until ``{"stream": "stdin", "eof": true}``; they are read only as fast as the
        guest takes them, so host memory stays bounded whatever the producer does."""
        from localsbx.build.builder import runtime_env

        self._require_running()
        await self.ready()
        rec = self.rec
        env = {**runtime_env(rec.env), **(h.get("env") or {})}

        def cb(stream: str):
            def send(chunk: bytes) -> None:
                writer.write(control.encode_frame({"stream": stream}, chunk))
            return send

        streaming = h.get("stdin") == "stream"
        stdin_done, client_gone = asyncio.Event(), asyncio.Event()

        def stdin_frames():
            return _client_frames(reader, gone=client_gone, done=stdin_done)

        async def watch_client():
            if streaming:
                await stdin_done.wait()
                if client_gone.is_set():
                    return
            await reader.read(1)

        task = asyncio.create_task(self.machine.guest.exec(
            list(h["argv"]), env=env, cwd=h.get("cwd") or rec.workdir,
            user=h.get("user") or rec.user,
            stdin=payload if h.get("stdin") and not streaming else None,
            stdin_stream=stdin_frames() if streaming else None,
            timeout=h.get("timeout"), stdout_cb=cb("stdout"), stderr_cb=cb("stderr")))
        gone = asyncio.create_task(watch_client())
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise ConnectionError("client went away")
        gone.cancel()
        try:
            res = task.result()
        except GuestError:
            await asyncio.sleep(0.3)  # a guest that powered off: its QEMU is exiting
            if not rec.qemu_alive():
                raise SandboxNotFound(f"sandbox {rec.id} is gone: its QEMU exited "
                                        f"(serial log: {rec.dir / 'serial.log'})") from None
            raise
        return {"exit_status": res.exit_status, "signal": res.signal, "timed_out": res.timed_out}

    async def op_put(self, h, payload, reader, writer) -> None:
        """Write a file. If the client goes away before the guest has it all (Ctrl-C or a
        SIGKILLed ``cp``), the transfer is abandoned and the guest keeps the previous file
        (the agent commits only after exactly the announced size).

        With ``"stream": true`` and ``"length": N`` the content comes as the client's
        stdin frames (as a streamed ``exec`` stdin), read only as fast as the guest writes
        them, so a file of any size passes through in bounded memory."""
        self._require_running()
        await self.ready()
        if h.get("stream"):
            gone_early = asyncio.Event()
            try:
                await self.machine.guest.put_file_stream(
                    h["path"], _client_frames(reader, gone=gone_early), size=int(h["length"]),
                    mode=int(h.get("mode", 0o644)))
            except GuestError:
                if gone_early.is_set():
                    raise ConnectionError("client went away") from None
                raise
            return
        task = asyncio.create_task(self.machine.guest.put_file(
            h["path"], payload, mode=int(h.get("mode", 0o644))))
        gone = asyncio.create_task(reader.read(1))
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise ConnectionError("client went away")
        gone.cancel()
        task.result()

    async def op_get(self, h, payload, reader, writer) -> dict:
        """Read a file as ``{"stream": "file"}`` data frames. With ``"stream": true`` they
        are sent as the guest reads them, each drained before the next (a file of any size
        in bounded memory; a slow client slows the guest's reading)."""
        self._require_running()
        await self.ready()
        if h.get("stream"):
            async def send(chunk: bytes) -> None:
                writer.write(control.encode_frame({"stream": "file"}, chunk))
                await writer.drain()
            return {"size": await self.machine.guest.stream_file(h["path"], send)}
        data = await self.machine.guest.get_file(h["path"])
        for i in range(0, len(data), control.CHUNK):
            writer.write(control.encode_frame({"stream": "file"}, data[i:i + control.CHUNK]))
            await writer.drain()
        return {"size": len(data)}

    # ------------------------------------------------------------------ processes

    async def op_start_process(self, h, payload, reader, writer) -> dict:
        """Start ``argv`` in the background (Tensorlake's ``start_process``): it runs on
        while clients come and go; its output is kept (:data:`PROCESS_OUTPUT_LINES` lines
        per stream) and can be followed."""
        from localsbx.build.builder import runtime_env
        from localsbx.guest.ssh import agent_command

        self._require_running()
        await self.ready()
        rec = self.rec
        name = h.get("name")
        if name and any(p.name == name and p.running for p in self.processes.values()):
            raise ConfigError(f"a running process is already named {name!r}")
        cgroup = "p" + secrets.token_hex(8)
        opts = ["--cgroup", cgroup, "--cwd", h.get("cwd") or rec.workdir]
        if h.get("user") or rec.user:
            opts += ["--user", h.get("user") or rec.user]
        for k, v in {**runtime_env(rec.env), **(h.get("env") or {})}.items():
            opts += ["--env", f"{k}={v}"]
        piped = h.get("stdin_mode") == "pipe"
        if piped:
            opts.append("--stdin")
        guest = self.machine.guest
        # output, stdin and exit status in guest files, which outlive this supervisor
        gdir = f"{GUEST_PROC_DIR}/{cgroup}"
        res = await guest.agent("spawn", gdir, *(["--stdin"] if piped else []), "--", *opts,
                                "--", *h["argv"], timeout=30)
        if res.exit_status == 0:
            gp = GuestProcess(argv=list(h["argv"]), name=name, cgroup=cgroup, proc=None,
                              stdin_open=piped, dir=gdir)
            gp.pid = int(res.stdout.split()[0])
            self.processes[gp.pid] = gp
            gp.start_follow(guest)
            self._save_processes()
            return gp.info()
        if not (res.exit_status == 2 and b"unknown verb" in res.stderr):
            raise GuestError("cannot start the process: "
                             + res.stderr.decode(errors="replace").strip())
        # an agent older than `spawn` (a base built before it): its SSH channel, whose
        # output and stdin end with this supervisor
        conn = guest._require()
        proc = await conn.create_process(agent_command("exec", *opts, "--", *h["argv"]),
                                         encoding=None)
        if not piped:
            proc.stdin.write_eof()
        gp = GuestProcess(argv=list(h["argv"]), name=name, cgroup=cgroup, proc=proc,
                          stdin_open=piped)
        # the guest pid: the first process of its cgroup, once the agent has joined it
        # (the channel opens before that); a process that already ended keeps a local id
        procs: list[bytes] = []
        for _ in range(40):
            res = await self.machine.guest.raw(
                f"exec /usr/lib/localsbx/agent exec -- /bin/cat "
                f"/sys/fs/cgroup/localsbx/{cgroup}/cgroup.procs", timeout=10)
            procs = res.stdout.split()
            if procs or proc.exit_status is not None:
                break
            await asyncio.sleep(0.05)
        # (ended already: a local id above any guest pid, which is at most 4194304)
        gp.pid = int(procs[0]) if procs else 10_000_000 + len(self.processes)
        self.processes[gp.pid] = gp
        gp.start_readers()
        self._save_processes()
        return gp.info()

    def _save_processes(self, folder: Path | None = None) -> None:
        """``processes.json`` in the sandbox's folder (or ``folder``: a memory checkpoint's):
        what a later supervisor (after a resume, a re-attach, or in a clone) needs to find
        them again; their output and stdin stay with this one."""
        store.write_json_atomic((folder or self.rec.dir) / "processes.json", [
            {"pid": p.pid, "name": p.name, "cgroup": p.cgroup, "argv": p.argv,
             "started_at": p.started_at, "dir": p.dir,
             "stdin_open": p.stdin_open and p.dir is not None}
            for p in self.processes.values()])

    def _adopt_processes(self) -> None:
        """The processes of ``processes.json``; those with guest files are followed again
        from their first byte (their whole output so far), once the guest is ready."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            for e in store.read_json(self.rec.dir / "processes.json"):
                gdir = e.get("dir")
                gp = GuestProcess(argv=e["argv"], name=e["name"], cgroup=e["cgroup"],
                                  proc=None, stdin_open=bool(gdir and e.get("stdin_open")),
                                  dir=gdir)
                gp.pid, gp.started_at = int(e["pid"]), float(e["started_at"])
                self.processes[gp.pid] = gp
                if gdir:
                    gp.start_follow(self.machine.guest, self.ready)

    async def _refresh_adopted(self) -> None:
        """An adopted process (no channel) has ended when its cgroup is empty."""
        from localsbx.guest.ssh import agent_command

        for p in self.processes.values():
            if p.proc is None and p.dir is None and p.running:
                res = await self.machine.guest.raw(agent_command(
                    "exec", "--", "/bin/cat", f"/sys/fs/cgroup/localsbx/{p.cgroup}/cgroup.procs"),
                    timeout=10)
                if not res.stdout.split():
                    p.ended_at = time.time()
                    p.ended.set()

    def _process(self, h) -> GuestProcess:
        key = h.get("pid")
        for p in self.processes.values():
            if str(p.pid) == str(key) or (p.name is not None and p.name == key):
                return p
        raise SandboxNotFound(f"no process {key!r} in sandbox {self.rec.id}",
                              hint="list_processes() / `localsbx ps ID` lists them")

    async def op_list_processes(self, h, payload, reader, writer) -> list:
        await self._refresh_adopted()
        return [p.info() for p in self.processes.values()]

    async def op_get_process(self, h, payload, reader, writer) -> dict:
        p = self._process(h)
        await self._refresh_adopted()
        return p.info()

    async def op_signal_process(self, h, payload, reader, writer) -> dict:
        p = self._process(h)
        sig = int(h.get("signal", 15))
        if not 1 <= sig <= 64:
            raise ConfigError(f"signal {sig}: must be 1-64 (e.g. 15 for SIGTERM)")
        if p.running:
            from localsbx.guest.ssh import agent_command

            res = await self.machine.guest.raw(agent_command(
                "exec", "--", "/bin/kill", f"-{sig}", str(p.pid)), timeout=10)
            if res.exit_status != 0:
                raise SandboxStateError(f"signal {sig} to process {p.pid}: "
                                        + res.stderr.decode(errors="replace").strip())
        return p.info()

    async def op_kill_process(self, h, payload, reader, writer) -> dict:
        p = self._process(h)
        await self.machine.guest.kill_cgroup(p.cgroup)  # also what it left running
        if p.proc is None and p.dir is None:
            await self._refresh_adopted()
        elif p.running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(p.ended.wait(), 10)
        return p.info()

    async def op_write_stdin(self, h, payload, reader, writer) -> None:
        p = self._process(h)
        if not p.stdin_open:
            raise SandboxStateError(f"process {p.pid}: stdin is not a pipe or was closed",
                                    hint="start it with stdin_mode='pipe'")
        if p.dir is not None:  # its FIFO in the guest
            res = await self.machine.guest.agent("stdin", p.dir, stdin=payload, timeout=60)
            if res.exit_status != 0:
                raise SandboxStateError(f"process {p.pid}: writing its stdin: "
                                        + res.stderr.decode(errors="replace").strip())
            return
        p.proc.stdin.write(payload)
        await p.proc.stdin.drain()

    async def op_close_stdin(self, h, payload, reader, writer) -> None:
        p = self._process(h)
        if p.stdin_open:
            p.stdin_open = False
            if p.dir is not None:  # its monitor closes the FIFO's last write end
                res = await self.machine.guest.agent("stdin", p.dir, "--close", timeout=30)
                if res.exit_status != 0 and p.running:
                    log.warning("closing the stdin of process %s: %s", p.pid,
                                res.stderr.decode(errors="replace").strip())
                self._save_processes()
                return
            p.proc.stdin.write_eof()

    async def op_process_output(self, h, payload, reader, writer) -> dict:
        """Output so far (``stream``: stdout, stderr or output = both); with ``follow``,
        every new line is streamed as a frame until the process ends."""
        p = self._process(h)
        stream = h.get("stream") or "output"
        sent = 0
        if not h.get("follow"):
            lines = [e for e in p.lines if stream == "output" or e[0] == stream]
            return {"pid": p.pid, "lines": [e[1] for e in lines], "line_count": len(lines),
                    "streams": [e[0] for e in lines]}
        while True:
            total = p.dropped + len(p.lines)
            if sent < total:
                for st, line, ts in list(p.lines)[max(sent - p.dropped, 0):]:
                    if stream == "output" or st == stream:
                        writer.write(control.encode_frame(
                            {"stream": st, "timestamp": ts}, line.encode() + b"\n"))
                sent = total
                await writer.drain()
                continue
            if p.ended.is_set():
                return p.info()
            with contextlib.suppress(TimeoutError):
                async with p.changed:
                    await asyncio.wait_for(p.changed.wait(), 1.0)
            if p.proc is None and p.dir is None:
                await self._refresh_adopted()

    async def op_terminate(self, h, payload, reader, writer) -> None:
        await self.terminate(reason=h.get("reason") or "terminated")

    async def op_expose(self, h, payload, reader, writer) -> dict:
        self._require_running()
        await self.ready()
        async with self._lock:
            from localsbx.vm.net import check_guest_port

            port, want = check_guest_port(h["port"]), int(h.get("host_port") or 0)
            if not 1 <= (want or 1) <= 65535:
                raise ConfigError(f"host port {want}: must be 1-65535")
            if port in self.forwards:
                have = self.forwards[port].get_port()
                if want and want != have:
                    raise SandboxStateError(f"guest port {port} is already exposed on host port "
                                            f"{have}", hint="unexpose it first")
                return {"port": port, "host_port": have}
            host_port = await self._forward(port, want, strict=bool(want))
            ports = {**self.rec.ports, str(port): host_port}
            self.rec.ports = ports
            store.update_sandbox(self.rec.id, ports=ports)
            return {"port": port, "host_port": host_port}

    async def op_unexpose(self, h, payload, reader, writer) -> None:
        async with self._lock:
            port = int(h["port"])
            listener = self.forwards.pop(port, None)
            if listener is None:
                raise SandboxStateError(f"guest port {port} is not exposed")
            listener.close()
            ports = {k: v for k, v in self.rec.ports.items() if k != str(port)}
            self.rec.ports = ports
            store.update_sandbox(self.rec.id, ports=ports)

    async def _forward(self, guest_port: int, host_port: int = 0, *, strict: bool = False) -> int:
        """Listen on 127.0.0.1 and tunnel each connection to ``guest_port`` in the guest
        through the SSH session (``direct-tcpip``); returns the host port. A taken
        ``host_port`` is an error when ``strict``, else another port is used (a resume)."""
        conn = self.machine.guest._require()
        try:
            listener = await conn.forward_local_port("127.0.0.1", host_port, "127.0.0.1",
                                                     guest_port)
        except OSError as exc:
            if not host_port or strict:
                raise ConfigError(f"cannot listen on 127.0.0.1:{host_port}: {exc.strerror}",
                                  hint="pick another --host-port, or leave it out") from None
            listener = await conn.forward_local_port("127.0.0.1", 0, "127.0.0.1", guest_port)
        self.forwards[guest_port] = listener
        return listener.get_port()

    async def op_suspend(self, h, payload, reader, writer) -> dict:
        """Save the whole guest (RAM + devices) to ``suspend.mig`` and stop QEMU; the
        sandbox then uses no CPU and no RAM, and its timeout stops counting."""
        self._require_running()
        await self.ready()
        async with self._lock:
            rec = self.rec
            target = rec.dir / "suspend.mig"
            t0 = time.monotonic()
            await self._save_state(target)
            await self._stop_machine()
            now = time.time()
            used = rec.used_secs + (now - rec.running_since if rec.running_since else 0.0)
            self.rec = store.update_sandbox(
                rec.id, state=SandboxState.SUSPENDED, state_file=str(target), used_secs=used,
                running_since=None, qemu_pid=None, qemu_start=None, ssh_port=0,
                supervisor_pid=None, supervisor_start=None, control_socket="")
            self._stopping = True
            seconds = time.monotonic() - t0
            self.done.set()
            return {"seconds": seconds, "state_bytes": target.stat().st_size}

    async def op_checkpoint(self, h, payload, reader, writer) -> dict:
        """Checkpoint the running sandbox (Tensorlake ``checkpoint``/snapshot): ``memory``
        saves RAM + devices + disk at one instant, ``filesystem`` the disk only; the
        sandbox goes on running either way."""
        from localsbx.vm import disk

        self._require_running()
        await self.ready()
        kind = h.get("kind") or "memory"
        if kind not in ("memory", "filesystem"):
            raise SandboxStateError(f"checkpoint type {kind!r}: use 'memory' or 'filesystem'")
        async with self._lock:
            rec = self.rec
            tmp = store.new_checkpoint_tmpdir()
            qemu = self.machine.qemu
            t0 = time.monotonic()
            try:
                if kind == "filesystem":
                    with contextlib.suppress(GuestError):
                        await self.machine.guest.agent("sync", timeout=60)
                    await qemu.execute("stop")  # flushes every block device
                else:
                    await self._save_state(tmp / "state.mig", stop_only=True)
                    # its clones find the processes that run on in them (spawned ones keep
                    # their guest files, in the saved RAM too)
                    self._save_processes(tmp)
                try:
                    await disk.copy_sparse(rec.dir / "overlay.qcow2", tmp / "disk.qcow2")
                finally:
                    await qemu.execute("cont")
                    self.machine.guest.fixup_pending = True  # the clock stood still meanwhile
                disk.freeze(tmp / "disk.qcow2")
                cid = "ck" + secrets.token_hex(8)
                # the initrd (with the guest's identity) must outlive this sandbox's folder
                await asyncio.to_thread(shutil.copyfile, rec.initrd, tmp / "initrd.cpio")
                size = sum(f.stat().st_size for f in tmp.iterdir())
                from localsbx.vm.snapshot import file_digest

                state_digest = (await asyncio.to_thread(file_digest, tmp / "state.mig")
                                if kind == "memory" else "")
                crec = store.CheckpointRecord(
                    id=cid, sandbox_id=rec.id, image=rec.image, project=rec.project,
                    image_digest=rec.image_digest, kind=kind, created_at=time.time(),
                    cpus=rec.cpus, memory_mb=rec.memory_mb, env=rec.env, workdir=rec.workdir,
                    user=rec.user, kernel=rec.kernel,
                    initrd=str(store.checkpoints_dir() / cid / "initrd.cpio"),
                    base_initrd=rec.base_initrd, ram_file=rec.ram_file,
                    host_key=rec.host_key, size_bytes=size, state_digest=state_digest)
                store.commit_checkpoint(tmp, crec)
            except BaseException:
                store._rmtree(tmp)
                raise
            return {**crec.to_json(), "seconds": time.monotonic() - t0}

    async def _save_state(self, target: Path, *, stop_only: bool = False) -> None:
        """Stop the guest and migrate its whole state to ``target`` (the guest stays
        stopped; ``stop_only`` is a reminder that the caller resumes it)."""
        from localsbx.vm import snapshot

        qemu = self.machine.qemu
        if qemu.qmp is None:
            raise SandboxStateError(f"sandbox {self.rec.id}: no QMP connection to its QEMU",
                                    hint="it was started by an older localsbx; recreate it")
        await qemu.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]})
        await qemu.execute("stop")
        part = target.with_suffix(".part")
        await qemu.execute("migrate", {"uri": "exec:" + shlex.join(
            ["dd", "status=none", "bs=1M", f"of={part}"])})
        try:
            await snapshot._wait_migration(qemu, f"saving sandbox {self.rec.id}")
        except BaseException:
            with contextlib.suppress(Exception):
                await qemu.execute("cont")
            with contextlib.suppress(OSError):
                part.unlink()
            raise
        os.replace(part, target)

    # ------------------------------------------------------------------ end

    async def _stop_machine(self) -> None:
        for listener in self.forwards.values():
            with contextlib.suppress(Exception):
                listener.close()
        self.forwards.clear()
        m = self.machine
        if m is None:
            return
        with contextlib.suppress(Exception):
            await m.guest.close()
        await m.qemu.shutdown(graceful=m.qemu.proc is not None)
        # attached (not our child): by pid
        await asyncio.to_thread(store.stop_pid, self.rec.qemu_pid, self.rec.qemu_start, grace=3)

    async def terminate(self, *, reason: str) -> None:
        """Stop QEMU and remove the sandbox (folder, and its image folder if unused)."""
        if self._stopping:
            return
        self._stopping = True
        log.info("terminating sandbox %s: %s", self.rec.id, reason)
        with contextlib.suppress(Exception):
            await self._stop_machine()
        rec = self.rec
        rec.supervisor_pid = None  # it is us: do not signal ourselves
        await asyncio.to_thread(store.cleanup_sandbox, rec)
        with contextlib.suppress(OSError):
            Path(rec.control_socket).unlink()
        self.done.set()

    async def watch(self) -> None:
        """Every ``WATCH_INTERVAL``: the owner, the QEMU, the timeout, the record."""
        while not self.done.is_set():
            await asyncio.sleep(WATCH_INTERVAL)
            if self._stopping:
                continue
            with contextlib.suppress(LocalsbxError, OSError):
                self.rec = _merge_shared(self.rec, store.load_sandbox(self.rec.id))
            rec = self.rec
            if rec.owner_gone():
                await self.terminate(reason=f"its owner (pid {rec.owner_pid}) exited")
            elif not rec.qemu_alive() and not self._lock.locked():
                log.warning("sandbox %s: QEMU exited; serial log tail:\n%s", rec.id,
                            _log_tail(rec.id, 10))
                with contextlib.suppress(LocalsbxError):
                    store.update_sandbox(rec.id, state=SandboxState.FAILED,
                                         error="its QEMU exited (guest powered off or crashed)")
                self._stopping = True
                self.done.set()
            elif (left := rec.remaining_secs()) is not None and left <= 0:
                await self.terminate(reason=f"timeout of {rec.timeout_secs} s reached")


def _merge_shared(mine: SandboxRecord, disk: SandboxRecord) -> SandboxRecord:
    """Take the fields other processes may change (owner, name, timeout) from ``disk``."""
    mine.owner_pid, mine.owner_start = disk.owner_pid, disk.owner_start
    mine.name, mine.timeout_secs = disk.name, disk.timeout_secs
    return mine


def _start_time(pid: int | None) -> int | None:
    from localsbx.vm.qemu import proc_start_time

    return proc_start_time(pid) if pid else None


async def run(mode: str, sandbox_id: str, ready_fd: int | None) -> int:
    """The supervisor's life: boot, report ready, serve until terminated or suspended."""
    def report(frame: dict) -> None:
        nonlocal ready_fd
        if ready_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(ready_fd, json.dumps(frame).encode() + b"\n")
            os.close(ready_fd)
        ready_fd = None

    rec = store.load_sandbox(sandbox_id)
    sup = Supervisor(rec)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, lambda s=sig: asyncio.ensure_future(
            sup.terminate(reason=f"signal {signal.Signals(s).name}")))
    try:
        await sup.boot(mode)
        await sup.serve()
    except BaseException as exc:
        log.exception("supervisor %s of %s failed", mode, sandbox_id)
        with contextlib.suppress(Exception):
            if sup.machine is not None:
                await sup.machine.stop()
        if mode == "create":
            with contextlib.suppress(Exception):
                rec.supervisor_pid = None
                await asyncio.to_thread(store.cleanup_sandbox, rec)
        elif mode == "resume":
            with contextlib.suppress(Exception):
                store.update_sandbox(sandbox_id, supervisor_pid=None, supervisor_start=None,
                                     error=f"resume failed: {exc}")
        report(control.error_frame(exc) if isinstance(exc, Exception)
               else {"ok": False, "error": {"type": "LocalsbxError", "message": "interrupted"}})
        return 1
    report({"ok": True})
    log.info("sandbox %s %s: serving %.2f s after the supervisor started (%s)", sandbox_id, mode,
             time.monotonic() - _STARTED,
             ", ".join(f"{k} {v:.2f}" for k, v in (sup.machine.timings or {}).items()))
    watcher = asyncio.create_task(sup.watch())
    await sup.done.wait()
    watcher.cancel()
    if sup.server is not None:
        sup.server.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m localsbx.supervisor")
    p.add_argument("mode", choices=("create", "resume", "attach", "spare"))
    p.add_argument("sandbox_id", help="the sandbox, or '-' for a spare")
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--go-fd", type=int)
    a = p.parse_args(argv)
    os.umask(0o077)  # its QEMU's files (RAM state, logs, overlays) are the owner's alone
    if a.go_fd is not None:
        # import now, while the caller writes the record; then wait for its word
        import localsbx.build.builder
        import localsbx.guest.ssh
        import localsbx.vm.accel
        import localsbx.vm.disk
        import localsbx.vm.machine  # noqa: F401
        from localsbx.vm.qemu import qemu_version

        with contextlib.suppress(Exception):  # a subprocess, cached: not on the create path
            qemu_version()
        word = os.read(a.go_fd, 1 if a.mode != "spare" else 64)
        os.close(a.go_fd)
        if not word:
            return 0
        if a.mode == "spare":  # "create ID\n": from now on it is that sandbox's supervisor
            global _STARTED
            _STARTED = time.monotonic()
            a.mode, a.sandbox_id = word.decode().split()
            fd = os.open(store.sandbox_dir(a.sandbox_id) / "supervisor.log",
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
    elif a.mode == "spare":
        p.error("a spare needs --go-fd")
    from localsbx._log import env_level

    logging.basicConfig(level=env_level("INFO"),
                        format=f"%(asctime)s supervisor[{os.getpid()}] %(levelname)s %(message)s")
    try:
        return asyncio.run(run(a.mode, a.sandbox_id, a.ready_fd))
    except SnapshotError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
