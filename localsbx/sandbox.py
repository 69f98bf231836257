"""Sandboxes: fresh microVMs restored from an image snapshot (Tensorlake's ``Sandbox``).

``AsyncSandbox`` is the core; ``Sandbox`` is a thin synchronous twin with the same methods.
Names and defaults copy Tensorlake's SDK: ``Sandbox.create(image=, cpus=, memory_mb=,
timeout_secs=)``, ``run(command, args=None, env=None, working_dir=None, timeout=None)``
returning ``CommandResult(exit_code, stdout, stderr)``, ``read_file``/``write_file``,
``terminate()``, context manager. Defaults: 1 vCPU, 1024 MiB, timeout 600 s.

Restore vs cold boot: an image's snapshot was taken at 1 vCPU / 1024 MiB with one QEMU,
accelerator and kernel. A request with another vCPU count or RAM size, or a host whose QEMU,
accelerator or kernel differ, cannot load that memory snapshot: the sandbox then cold-boots
from the image's disk (``build.qcow2``, the same files, about 5-7 s under TCG instead of ~1 s)
and ``AsyncSandbox.notice`` says why. A snapshot whose files are missing or damaged is an
error (:class:`SnapshotError`) that names the file and says to rebuild the image.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import os
import secrets
import string
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Self

from localsbx import control, paths, store, supervisor
from localsbx._loop import run_sync
from localsbx.errors import (
    ConfigError,
    ImageNotFound,
    LocalsbxError,
    SandboxNotFound,
    SandboxStateError,
    SnapshotError,
)
from localsbx.guest.ssh import ExecResult
from localsbx.store import SandboxState
from localsbx.vm import snapshot
from localsbx.vm.qemu import Accel, VMSpec, proc_start_time

log = logging.getLogger("localsbx.sandbox")

DEFAULT_CPUS = 1
DEFAULT_MEMORY_MB = 1024
#: Tensorlake's default sandbox timeout, seconds.
DEFAULT_TIMEOUT_SECS = 600
_ID_ALPHABET = string.ascii_lowercase + string.digits


class CommandExitReason(str, enum.Enum):
    """Why a command ended (Tensorlake's ``CommandExitReason``)."""

    EXITED = "exited"
    SIGNALED = "signaled"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True)
class CommandResult:
    """Result of :meth:`AsyncSandbox.run` (Tensorlake's ``CommandResult`` plus bytes).

    :param exit_code: the exit status; ``-N`` when killed by signal N (Tensorlake's rule;
        the CLI exits ``128+N`` like ``docker exec``); ``-9`` on timeout.
    :param stdout: decoded UTF-8 with U+FFFD for invalid bytes.
    :param stderr: likewise.
    :param stdout_bytes: the exact bytes.
    :param stderr_bytes: the exact bytes.
    :param signal: the killing signal number, or ``None``.
    :param reason: :class:`CommandExitReason`.
    """

    exit_code: int
    stdout: str
    stderr: str
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    signal: int | None = None
    reason: CommandExitReason = CommandExitReason.EXITED

    @property
    def timed_out(self) -> bool:
        return self.reason is CommandExitReason.TIMED_OUT

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @classmethod
    def from_exec(cls, res: ExecResult) -> CommandResult:
        if res.timed_out:
            reason = CommandExitReason.TIMED_OUT
        elif res.signal is not None:
            reason = CommandExitReason.SIGNALED
        else:
            reason = CommandExitReason.EXITED
        code = -res.signal if res.signal is not None else int(res.exit_status or 0)
        return cls(code, res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace"),
                   res.stdout, res.stderr, res.signal, reason)


@dataclass
class HistoryEntry:
    """One command run in a sandbox, for failure reports (pytest plugin)."""

    argv: list[str]
    exit_code: int | None
    reason: str
    stdout_tail: str
    stderr_tail: str
    seconds: float


def new_sandbox_id() -> str:
    """A fresh sandbox id: 12 lowercase letters and digits."""
    return _new_id()


def _new_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))


def shell_argv(command: str | Sequence[str], args: Sequence[str] | None) -> list[str]:
    """Tensorlake's ``run(command, args)`` as an argv: with ``args`` (even ``[]``), run
    ``command`` directly with them (no shell); a list runs as given; a string alone runs
    with ``/bin/sh -c`` (Docker's shell form)."""
    if args is not None:
        return [str(command), *map(str, args)]
    if isinstance(command, (list, tuple)):
        return [str(c) for c in command]
    return ["/bin/sh", "-c", command]


def _stdin_source(fobj: BinaryIO):
    """A control ``payload_source`` streaming ``fobj`` as stdin frames. The reads happen in
    a daemon thread (a blocked read of a pipe never holds the process's exit), handing
    over at most a few chunks at a time, so memory stays bounded."""
    import threading

    async def source(writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
        stop = threading.Event()

        def pump() -> None:
            try:
                fd = fobj.fileno()
            except (AttributeError, OSError, ValueError):
                fd = None
            read = getattr(fobj, "read1", None) or fobj.read
            while not stop.is_set():
                try:
                    chunk = os.read(fd, control.CHUNK) if fd is not None else read(control.CHUNK)
                except OSError:
                    chunk = b""
                try:
                    asyncio.run_coroutine_threadsafe(q.put(chunk), loop).result()
                except (RuntimeError, asyncio.CancelledError):  # the loop is gone
                    return
                if not chunk:
                    return

        threading.Thread(target=pump, name="localsbx-stdin", daemon=True).start()
        try:
            while True:
                chunk = await q.get()
                writer.write(control.stdin_frame(chunk) if chunk else control.STDIN_EOF)
                await writer.drain()
                if not chunk:
                    return
        finally:
            stop.set()
            with contextlib.suppress(asyncio.QueueEmpty):
                q.get_nowait()  # unblock a pending put; the thread then sees ``stop``

    return source


def _aiter_source(chunks: AsyncIterator[bytes]):
    """A control ``payload_source`` sending ``chunks`` as stdin frames, then EOF, each
    drained before the next is taken."""
    async def source(writer: asyncio.StreamWriter) -> None:
        try:
            async for chunk in chunks:
                for i in range(0, len(chunk), control.CHUNK):
                    writer.write(control.stdin_frame(chunk[i:i + control.CHUNK]))
                    await writer.drain()
        except BaseException:
            # the source broke (an HTTP client gone mid-body): drop the connection, so the
            # supervisor abandons the transfer (the sandbox keeps its previous file)
            writer.transport.abort()
            raise
        writer.write(control.STDIN_EOF)
        await writer.drain()
    return source


@dataclass
class AsyncSandbox:
    """A handle on a sandbox (asyncio). Any number of handles, in any processes, may drive
    the same sandbox: each call goes to the sandbox's supervisor (:mod:`localsbx.supervisor`)
    over its control socket, so a handle holds no connection and :meth:`close` only forgets it.

    Usage::

        async with await AsyncSandbox.create(image="myimg") as sb:
            res = await sb.run("echo hi")

    :ivar sandbox_id: the id (12 characters).
    :ivar record: the sandbox record as last read (:meth:`refresh` re-reads it).
    :ivar notice: a sentence when the sandbox was cold-booted instead of restored.
    """

    record: store.SandboxRecord
    notice: str | None = None
    history: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    _terminated: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def sandbox_id(self) -> str:
        return self.record.id

    id = sandbox_id

    @property
    def name(self) -> str | None:
        return self.record.name

    @property
    def image(self) -> str:
        return self.record.image

    @property
    def status(self) -> SandboxState:
        """The state as last read (:meth:`refresh` re-reads it)."""
        return SandboxState.TERMINATED if self._terminated else self.record.state

    @property
    def serial_log(self) -> Path:
        return self.record.dir / "serial.log"

    @property
    def ports(self) -> dict[int, int]:
        """Exposed guest ports → their host ports on 127.0.0.1."""
        return {int(k): v for k, v in self.record.ports.items()}

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def create(
        cls,
        image: str | None = None,
        *,
        cpus: int | None = None,
        memory_mb: int | None = None,
        disk_mb: int | None = None,
        timeout_secs: int | None = None,
        project: str | None = None,
        detached: bool = False,
        name: str | None = None,
        cold_boot: bool = False,
        snapshot_id: str | None = None,
        exposed_ports: Sequence[int] = (),
        allow_internet_access: bool = True,
        sandbox_id: str | None = None,
        allow_out: Sequence[str] = (),
        deny_out: Sequence[str] = (),
    ) -> AsyncSandbox:
        """Start a fresh sandbox (Tensorlake's ``Sandbox.create``).

        :param image: an image of the project, or a base (``debian-minimal``, with or without
            ``tensorlake/``; built once into an image of that name); default
            :data:`DEFAULT_IMAGE`.
        :param cpus: vCPUs (default 1); other than the snapshot's → cold boot.
        :param memory_mb: RAM in MiB (default 1024); other than the snapshot's → cold boot.
        :param disk_mb: root disk in MiB (default: the image's, 8192 for the Debian bases);
            a bigger one is grown after the restore (QMP ``block_resize``, then an online
            ext4 resize in the guest), so ``df /`` shows it; smaller is an error.
        :param timeout_secs: the sandbox stops after this many seconds of *running* time
            (default 600, Tensorlake's; time suspended does not count); 0 = never.
        :param detached: the sandbox outlives this process (CLI ``localsbx new``); otherwise
            its supervisor terminates it when this process exits, even on SIGKILL.
        :param name: unique among the project's live sandboxes; ``connect(name)`` finds it.
        :param cold_boot: boot from the image's disk instead of restoring its snapshot
            (benchmarks, or a clean boot on purpose); ``LOCALSBX_COLD_BOOT=1`` does the same
            for every sandbox of a process.
        :param snapshot_id: start from a checkpoint (:meth:`checkpoint`) instead of an image:
            a memory checkpoint resumes its processes, a filesystem one cold-boots its disk.
        :param exposed_ports: guest TCP ports to forward to 127.0.0.1 (see :attr:`ports`).
        :param allow_internet_access: ``False`` cuts all egress, DNS included (Tensorlake's
            ``network.allow_internet_access``).
        :param allow_out: destinations the guest may reach (IPv4 addresses, CIDRs, host
            names; Tensorlake's ``network.allow_out``): when non-empty, nothing else gets out
            (DNS still does with ``allow_internet_access``). Enforced on the host
            (:func:`localsbx.vm.net.egress_ruleset` has the exact semantics); host names are
            resolved on the host now, and those addresses are the rule for the sandbox's
            whole life, resumes included.
        :param deny_out: destinations refused (same forms); wins over ``allow_out``.
        :param sandbox_id: the id to use (12 lowercase letters and digits, from
            :func:`new_sandbox_id`), for a caller that must name the sandbox before it is
            up (``localsbx serve`` answering a ``wait=False`` create); default a new one.
        :raises ImageNotFound: no such image or base.
        :raises SnapshotError: the image's snapshot files, or the checkpoint, are missing
            or damaged.
        :raises ConfigError: a bad size, timeout or name; a name already taken; an
            ``allow_out``/``deny_out`` entry that is not a CIDR or host name, or does not resolve.
        :raises VMLaunchError: QEMU failed or the guest did not come up (nothing is left).
        """
        t0 = time.monotonic()
        egress = await asyncio.to_thread(_egress, allow_out, deny_out)  # bad input fails first
        from localsbx.vm.net import check_guest_port

        for p in exposed_ports:
            check_guest_port(p)
        store.reap()
        me = os.getpid()
        if sandbox_id is not None and not store._ID_RE.match(sandbox_id):
            raise ConfigError(f"sandbox id {sandbox_id!r}: expected 12 lowercase letters "
                              "and digits")
        sid = sandbox_id or _new_id()
        d = store.sandbox_dir(sid)
        d.mkdir(mode=0o700, parents=True)
        (d / "creator").write_text(f"{me} {proc_start_time(me)}")
        try:
            launch = supervisor.Launch.start(sid, "create")  # imports while we plan
        except BaseException:
            store._rmtree(d)
            raise
        try:
            plan = await _plan(image, cpus=cpus, memory_mb=memory_mb,
                               timeout_secs=timeout_secs, project=project, cold_boot=cold_boot,
                               snapshot_id=snapshot_id, disk_mb=disk_mb)
            if name is not None:
                store.check_name("sandbox", name)
        except BaseException:
            launch.abort()
            store._rmtree(d)
            raise
        rec = store.SandboxRecord(
            **plan, id=sid, name=name, created_at=time.time(),
            internet=bool(allow_internet_access), **egress,
            ports={str(int(p)): 0 for p in exposed_ports},
            owner_pid=None if detached else me,
            owner_start=None if detached else proc_start_time(me),
            creator_pid=me, creator_start=proc_start_time(me))
        try:
            with store.locked(paths.sandboxes_dir() / ".names.lock"):
                if name is not None:
                    _check_name_free(name, rec.project)
                store.write_sandbox(rec)
        except BaseException:
            launch.abort()
            store._rmtree(d)
            raise
        try:
            await launch.wait()
        except BaseException:
            with contextlib.suppress(Exception):
                store.cleanup_sandbox(store.load_sandbox(sid))
            store._rmtree(d)
            raise
        (d / "creator").unlink(missing_ok=True)
        supervisor.Launch.keep_spare()
        sb = cls(store.load_sandbox(sid), rec.notice)
        sb.timings = {"total": time.monotonic() - t0}
        return sb

    @classmethod
    async def connect(cls, sandbox_id: str, *, project: str | None = None) -> AsyncSandbox:
        """A handle on an existing sandbox, by id or by name (Tensorlake's
        ``Sandbox.connect``); a suspended one stays suspended until :meth:`resume`.

        :raises SandboxNotFound: no such sandbox, or it is gone.
        """
        return cls(store.read_sandbox(sandbox_id, project=project))

    async def refresh(self) -> store.SandboxRecord:
        """Re-read the record (state, ports, name).

        :raises SandboxNotFound: the sandbox is gone.
        """
        try:
            self.record = store.read_sandbox(self.record.id)
        except SandboxNotFound:
            self._terminated = True
            raise
        return self.record

    async def _socket(self) -> str:
        """The control socket of a running sandbox; a new supervisor attaches when the old
        one is gone (it was killed, or the sandbox was made by an older localsbx)."""
        if self._terminated:
            raise SandboxStateError(f"sandbox {self.sandbox_id} was terminated")
        rec = await self.refresh()
        if rec.state is SandboxState.SUSPENDED:
            raise SandboxStateError(f"sandbox {rec.id} is suspended",
                                    hint=f"resume it first: localsbx resume {rec.id}")
        if rec.state is not SandboxState.RUNNING:
            raise SandboxStateError(f"sandbox {rec.id} is {rec.state.value}")
        if not rec.supervisor_alive() or not rec.control_socket:
            with store.locked(rec.dir / ".attach.lock"):
                rec = await self.refresh()
                if not rec.supervisor_alive():
                    log.info("sandbox %s has no supervisor; attaching a new one", rec.id)
                    await supervisor.start_and_wait(rec.id, "attach", timeout=90)
                    rec = await self.refresh()
        return rec.control_socket

    async def _call(self, op: str, args: dict | None = None, **kw) -> Any:
        sock = await self._socket()
        try:
            return await control.request(sock, op, args, **kw)
        except (SandboxNotFound, control.ProtocolError):
            # the supervisor went away during the call: say why, if we can
            rec = store.load_sandbox(self.sandbox_id) if store.sandbox_dir(
                self.sandbox_id).exists() else None
            if rec is None or not rec.alive():
                # (the folder stays until terminate() or the next reap: its serial log
                # explains the death, e.g. in the pytest plugin's report)
                raise SandboxNotFound(f"sandbox {self.sandbox_id} is gone "
                                      f"(serial log: {self.serial_log})") from None
            raise

    async def terminate(self) -> None:
        """Stop the sandbox and delete it (overlay, record). Idempotent; works from any
        process, and on a suspended sandbox."""
        if self._terminated:
            return
        try:
            rec = store.load_sandbox(self.sandbox_id)
        except SandboxNotFound:
            self._terminated = True
            return
        if rec.state is SandboxState.RUNNING and rec.supervisor_alive() and rec.control_socket:
            with contextlib.suppress(LocalsbxError):
                await control.request(rec.control_socket, "terminate", timeout=30)
        self._terminated = True
        with contextlib.suppress(SandboxNotFound):
            rec = store.load_sandbox(self.sandbox_id)
            await asyncio.to_thread(store.cleanup_sandbox, rec, grace=2.0)

    async def close(self) -> None:
        """Forget this handle; the sandbox keeps running (nothing is held open)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.terminate()

    def __repr__(self) -> str:
        return f"<AsyncSandbox id={self.sandbox_id} image={self.image} {self.status.value}>"

    async def suspend(self) -> dict:
        """Save the whole guest to disk and stop its QEMU (no CPU, no RAM used); its timeout
        stops counting. Any process may :meth:`resume` it later, also after a host reboot.

        :returns: ``{"seconds": ..., "state_bytes": ...}``.
        :raises SandboxStateError: not running.
        """
        res = await self._call("suspend", timeout=600)
        await self.refresh()
        return res

    async def resume(self) -> None:
        """Resume a suspended sandbox: its processes, files and ports as they were (host
        ports are kept when free). A running sandbox is left as it is.

        :raises SandboxStateError: the sandbox is not suspended or running.
        :raises SnapshotError: its saved state is missing or does not load.
        """
        rec = await self.refresh()
        if rec.state is SandboxState.RUNNING:
            return
        if rec.state is not SandboxState.SUSPENDED:
            raise SandboxStateError(f"sandbox {rec.id} is {rec.state.value}; cannot resume")
        with store.locked(rec.dir / ".attach.lock"):
            rec = await self.refresh()
            if rec.state is SandboxState.SUSPENDED and not rec.supervisor_alive():
                await supervisor.start_and_wait(rec.id, "resume")
        await self.refresh()

    async def checkpoint(self, checkpoint_type: str = "memory") -> store.CheckpointRecord:
        """Checkpoint the running sandbox (Tensorlake's ``checkpoint``/snapshot); it goes on
        running. ``memory``: RAM, devices and disk at one instant (a clone resumes its
        processes); ``filesystem``: the disk only (a clone boots it).

        :returns: the checkpoint; its ``id`` is a ``snapshot_id`` for :meth:`create`.
        """
        res = await self._call("checkpoint", {"kind": checkpoint_type}, timeout=900)
        return store.CheckpointRecord.from_json(res)

    async def expose_port(self, port: int, *, host_port: int = 0) -> int:
        """Forward guest TCP ``port`` to 127.0.0.1 on the host (through the sandbox's SSH
        session, so the guest network policy does not matter); returns the host port."""
        res = await self._call("expose", {"port": int(port), "host_port": int(host_port)})
        await self.refresh()
        return int(res["host_port"])

    async def unexpose_port(self, port: int) -> None:
        """Stop forwarding guest ``port``."""
        await self._call("unexpose", {"port": int(port)})
        await self.refresh()

    async def connect_desktop(self, port: int = 5901, password: str | None = None, *,
                              connect_timeout: float = 30.0):
        """A :class:`localsbx.desktop.Desktop` on the sandbox's VNC server (a ``*-vnc``
        base), through an exposed port (added when ``port`` is not exposed yet).
        ``password`` ``None``: the desktop bases' ``"tensorlake"``."""
        from localsbx.desktop import DEFAULT_PASSWORD, Desktop

        await self.refresh()
        host_port = self.ports.get(int(port)) or await self.expose_port(port)
        return await asyncio.to_thread(Desktop, host_port, password=password or DEFAULT_PASSWORD,
                                       connect_timeout=connect_timeout)

    async def update(self, *, name: str | None = None, timeout_secs: int | None = None) -> None:
        """Rename the sandbox (unique per project) or change its timeout (running seconds
        from its start; Tensorlake's ``update``).

        :raises ConfigError: a bad name, or one already taken.
        """
        changes: dict[str, Any] = {}
        with store.locked(paths.sandboxes_dir() / ".names.lock"):
            if name is not None:
                store.check_name("sandbox", name)
                _check_name_free(name, self.record.project, but=self.sandbox_id)
                changes["name"] = name
            if timeout_secs is not None:
                changes["timeout_secs"] = _check_timeout(timeout_secs)
            if changes:
                self.record = store.update_sandbox(self.sandbox_id, **changes)

    # ------------------------------------------------------------------ commands

    async def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   working_dir: str | None = None, timeout: float | None = None,
                   user: str | None = None, stdin: bytes | BinaryIO | None = None,
                   stdout_cb: Callable[[bytes], None] | None = None,
                   stderr_cb: Callable[[bytes], None] | None = None) -> ExecResult:
        """Run ``argv`` (no shell) with the image ENV + ``env``, in ``working_dir`` (default
        the image WORKDIR). Lower level than :meth:`run`: returns the raw ExecResult.

        :param stdin: bytes (then EOF), or a binary file (``sys.stdin.buffer``) streamed
            as it is read, until its end or until the command ends (``exec -i``: the
            command starts at once, and host memory stays bounded).

        :raises SandboxStateError: terminated or suspended.
        :raises SandboxNotFound: its QEMU is gone.
        """
        if not argv:
            raise ConfigError("exec: empty command")
        if timeout is not None and not 0 < timeout < float("inf"):
            raise ConfigError(f"exec: timeout must be positive seconds (got {timeout})")
        out, err = bytearray(), bytearray()

        def on_data(stream: str, data: bytes) -> None:
            if stream == "stdout":
                stdout_cb(data) if stdout_cb else out.extend(data)
            else:
                stderr_cb(data) if stderr_cb else err.extend(data)

        t = time.monotonic()
        streamed = stdin is not None and not isinstance(stdin, (bytes, bytearray, memoryview))
        res = await self._call("exec", {"argv": [str(a) for a in argv], "env": _check_env(env),
                                        "cwd": working_dir, "user": user,
                                        "stdin": "stream" if streamed else stdin is not None,
                                        "timeout": timeout},
                               payload=b"" if streamed else bytes(stdin or b""),
                               payload_source=_stdin_source(stdin) if streamed else None,
                               on_data=on_data, timeout=None)
        result = ExecResult(res["exit_status"], res["signal"], bytes(out), bytes(err),
                            timed_out=bool(res["timed_out"]))
        self.history.append(HistoryEntry(
            list(argv), result.shell_code, CommandResult.from_exec(result).reason.value,
            _tail(result.stdout), _tail(result.stderr), time.monotonic() - t))
        return result

    async def run(self, command: str | Sequence[str], args: Sequence[str] | None = None,
                  env: Mapping[str, str] | None = None, working_dir: str | None = None,
                  timeout: float | None = None, user: str | None = None,
                  stdin: bytes | str | None = None) -> CommandResult:
        """Run a command to completion (Tensorlake's ``Sandbox.run``).

        :param command: with ``args``: the program; without: a shell command line run by
            ``/bin/sh -c`` (or a list = argv).
        :param args: arguments for ``command`` (no shell).
        :param env: extra environment variables (on top of the image ENV).
        :param working_dir: default: the image WORKDIR.
        :param timeout: seconds; on expiry the whole process tree is SIGKILLed and the
            result has ``reason=TIMED_OUT``, ``exit_code=-9``. ``None``: no limit.
        :param user: ``name``, ``uid`` or ``uid:gid``; default the image user (root).
        :param stdin: data for stdin (then EOF); default: stdin is empty.
        :raises SandboxStateError: the sandbox was terminated or is suspended.
        :raises SandboxNotFound: its QEMU is gone.
        """
        data = stdin.encode() if isinstance(stdin, str) else stdin
        res = await self.exec(shell_argv(command, args), env=env, working_dir=working_dir,
                              timeout=timeout, user=user, stdin=data)
        return CommandResult.from_exec(res)

    # ------------------------------------------------------------------ processes

    async def start_process(self, command: str | Sequence[str], args: Sequence[str] | None = None,
                            *, env: Mapping[str, str] | None = None,
                            working_dir: str | None = None, stdin_mode: str | None = None,
                            name: str | None = None, user: str | None = None) -> dict:
        """Start a background process (Tensorlake's ``start_process``); it runs on after this
        call, held by the sandbox's supervisor, and any process can follow it.

        :param command: as in :meth:`run` (with ``args``: no shell).
        :param stdin_mode: ``"pipe"`` to write to it (:meth:`write_stdin`); default: stdin is
            at end of file.
        :param name: find it by name too (unique among running processes).
        :returns: Tensorlake's ``ProcessInfo`` as a dict: ``pid`` (the guest pid),
            ``status`` (running, exited, signaled), ``exit_code``, ``signal``, ``command``,
            ``args``, ``started_at``, ``ended_at``.
        """
        if stdin_mode not in (None, "pipe", "null", "closed"):
            raise ConfigError(f"stdin_mode {stdin_mode!r}: use 'pipe' or leave it out")
        return await self._call("start_process", {
            "argv": shell_argv(command, args), "env": _check_env(env), "cwd": working_dir,
            "user": user, "stdin_mode": stdin_mode, "name": name})

    async def list_processes(self) -> list[dict]:
        """Background processes started with :meth:`start_process` (running and ended)."""
        return await self._call("list_processes")

    async def get_process(self, pid: int | str) -> dict:
        """One process by guest pid or name.

        :raises SandboxNotFound: no such process.
        """
        return await self._call("get_process", {"pid": pid})

    async def send_signal(self, pid: int | str, signal: int = 15) -> dict:
        """Send ``signal`` (a number) to the process."""
        return await self._call("signal_process", {"pid": pid, "signal": int(signal)})

    async def kill_process(self, pid: int | str) -> dict:
        """SIGKILL the process and everything it started; returns its final info."""
        return await self._call("kill_process", {"pid": pid}, timeout=30)

    async def write_stdin(self, pid: int | str, data: bytes | str) -> None:
        """Write to the stdin of a process started with ``stdin_mode="pipe"``."""
        await self._call("write_stdin", {"pid": pid},
                         payload=data.encode() if isinstance(data, str) else data)

    async def close_stdin(self, pid: int | str) -> None:
        """Close its stdin (it reads end of file)."""
        await self._call("close_stdin", {"pid": pid})

    async def get_output(self, pid: int | str, stream: str = "output") -> dict:
        """Output so far: ``{"pid", "lines", "line_count"}`` (``stream``: ``stdout``,
        ``stderr`` or ``output`` for both, in order)."""
        return await self._call("process_output", {"pid": pid, "stream": stream})

    async def follow_output(self, pid: int | str,
                            callback: Callable[[str, str], Any], stream: str = "output") -> dict:
        """Call ``callback(stream, line)`` for every line, past and new, until the process
        ends; returns its final info."""
        def on_data(st: str, data: bytes) -> None:
            callback(st, data.decode(errors="replace").removesuffix("\n"))

        return await self._call("process_output", {"pid": pid, "stream": stream,
                                                   "follow": True},
                                on_data=on_data, timeout=None)

    async def read_file(self, path: str) -> bytes:
        """Read a file from the sandbox.

        :raises GuestFileError: no such file / not readable.
        """
        res = await self._call("get", {"path": path}, timeout=None)
        if isinstance(res, dict) and "data" in res:
            return res["data"].get("file", b"")
        return b""

    async def write_file(self, path: str, content: bytes | str, *, mode: int = 0o644) -> None:
        """Write a file in the sandbox (atomically; parent folders are created).

        :raises GuestFileError: cannot be written.
        """
        data = content.encode() if isinstance(content, str) else content
        await self._call("put", {"path": path, "mode": mode}, payload=data, timeout=None)

    async def upload_file(self, path: str, src: str | os.PathLike | BinaryIO, *,
                          mode: int | None = None, size: int | None = None) -> None:
        """Write a sandbox file from a host file or a binary file object, streamed: the
        content passes through in chunks of :data:`control.CHUNK` bytes, so a file of any
        size never sits in memory (on either side). Atomic like :meth:`write_file`: a
        transfer cut short leaves the sandbox's previous file.

        :param src: a host path, an open binary file (``size`` is then its remaining
            length, taken from ``fstat`` when not given), or an async iterator of bytes
            (``size`` required; e.g. an HTTP request body).
        :param mode: permission bits; default the host file's, else ``0o644``.
        :raises ConfigError: ``src`` is not a readable host file.
        :raises GuestFileError: the sandbox could not write it, or the source ended early.
        """
        if hasattr(src, "__aiter__"):
            if size is None:
                raise ConfigError("upload_file: a streamed source needs its size in bytes")
            await self._call("put", {"path": path, "mode": 0o644 if mode is None else mode,
                                     "stream": True, "length": size},
                             payload_source=_aiter_source(src), timeout=None)
            return
        opened = None
        if isinstance(src, (str, os.PathLike)):
            try:
                opened = src = open(src, "rb")
            except OSError as exc:
                raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
        try:
            if size is None:
                st = os.fstat(src.fileno())
                size = st.st_size - src.tell()
                if mode is None and opened is not None:
                    mode = st.st_mode & 0o7777
            await self._call("put", {"path": path, "mode": 0o644 if mode is None else mode,
                                     "stream": True, "length": size},
                             payload_source=_stdin_source(src), timeout=None)
        finally:
            if opened is not None:
                opened.close()

    async def read_file_chunks(self, path: str) -> AsyncIterator[bytes]:
        """A sandbox file's content as it is read (chunks of up to 256 KiB), in bounded
        memory: the guest reads on only as the caller takes chunks.

        :raises GuestFileError: no such file / not readable (before the first chunk).
        """
        q: asyncio.Queue = asyncio.Queue(maxsize=8)
        done = object()

        async def on_data(stream: str, data: bytes) -> None:
            await q.put(data)

        async def fetch() -> None:
            try:
                await self._call("get", {"path": path, "stream": True}, on_data=on_data,
                                 timeout=None)
                await q.put(done)
            except Exception as exc:  # noqa: BLE001 - handed to the consumer
                await q.put(exc)

        task = asyncio.create_task(fetch())
        try:
            while True:
                item = await q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def download_file(self, path: str, dest: str | os.PathLike) -> int:
        """Copy a sandbox file to a host file, streamed (bounded memory); ``dest`` is
        written to a temporary file beside it and renamed into place when complete.

        :returns: bytes copied.
        :raises GuestFileError: the sandbox file cannot be read.
        """
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.localsbx-{os.getpid()}.part")
        total = 0
        try:
            with open(tmp, "wb") as out:
                async for chunk in self.read_file_chunks(path):
                    await asyncio.to_thread(out.write, chunk)
                    total += len(chunk)
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return total

    async def list_directory(self, path: str) -> list[dict]:
        """The entries of a sandbox folder (Tensorlake's ``list_directory``): ``name``,
        ``is_dir``, ``size`` (bytes), ``modified_at`` (UNIX seconds), sorted by name.

        :raises GuestFileError: no such folder, or not readable.
        """
        from localsbx.errors import GuestFileError

        # "PATH/" makes find refuse a file ("Not a directory") rather than list nothing
        folder = path if path.endswith("/") else path + "/"
        res = await self.exec(["find", folder, "-mindepth", "1", "-maxdepth", "1", "-printf",
                               "%y\\t%s\\t%T@\\t%f\\0"],
                              env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
        if res.exit_status != 0:
            raise GuestFileError(f"cannot list {path} in the sandbox: "
                                 + res.stderr.decode(errors="replace").strip())
        out = []
        for item in res.stdout.split(b"\0"):
            if not item:
                continue
            kind, size, mtime, name = item.decode(errors="replace").split("\t", 3)
            out.append({"name": name, "is_dir": kind == "d", "size": int(size),
                        "modified_at": float(mtime)})
        return sorted(out, key=lambda e: e["name"])

    async def delete_file(self, path: str) -> None:
        """Delete a file (or an empty folder) in the sandbox (Tensorlake's ``delete_file``).

        :raises GuestFileError: no such file, a non-empty folder, or no permission.
        """
        from localsbx.errors import GuestFileError

        res = await self.exec(["/bin/sh", "-c", 'if [ -d "$1" ] && [ ! -L "$1" ]; then '
                               'rmdir -- "$1"; else rm -- "$1"; fi', "sh", path],
                              env={"PATH": "/usr/bin:/bin"})
        if res.exit_status != 0:
            raise GuestFileError(f"cannot delete {path} in the sandbox: "
                                 + res.stderr.decode(errors="replace").strip())

    async def upload(self, src: str | os.PathLike, dest: str) -> None:
        """Copy a host file or folder into the sandbox (``docker cp SRC ID:DEST``): a file
        keeps its mode (``DEST`` ending in ``/`` gets the file's name); a folder is copied
        recursively with modes, owners and symlinks as they are. Both are written as root,
        whatever the image's ``USER`` (``docker cp`` extracts as root too).

        :raises ConfigError: ``src`` does not exist.
        :raises GuestFileError: the sandbox could not write it.
        """
        import io
        import tarfile

        from localsbx.errors import GuestFileError

        src = Path(src)
        if not src.exists() and not src.is_symlink():
            raise ConfigError(f"cp: {src}: no such file or folder on the host")
        if src.is_file():
            if dest.endswith("/"):
                dest += src.name
            await self.upload_file(dest, src)
            return
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            tf.add(src, arcname=dest.lstrip("/").rstrip("/") or ".")
        res = await self.exec(["tar", "-C", "/", "-xpf", "-", "--same-owner", "--numeric-owner",
                               "--no-overwrite-dir"],
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, stdin=buf.getvalue(),
                              user="root", working_dir="/")
        if res.exit_status != 0:
            raise GuestFileError("cp: extracting in the sandbox failed: "
                                 + res.stderr.decode(errors="replace").strip())

    async def download(self, src: str, dest: str | os.PathLike) -> None:
        """Copy a sandbox file or folder to the host (``docker cp ID:SRC DEST``): folders
        recursively, symlinks copied as links (absolute ones too, as ``docker cp`` does).

        :raises GuestFileError: ``src`` cannot be read in the sandbox.
        :raises ConfigError: the host folder for ``dest`` does not exist.
        """
        import io
        import tarfile

        from localsbx.errors import GuestFileError

        want_dir = str(dest).endswith("/")
        dest = Path(dest)
        if want_dir and not dest.is_dir():
            raise ConfigError(f"cp: host folder {dest} does not exist")
        parent = dest if dest.is_dir() else dest.parent
        if not parent.is_dir():
            raise ConfigError(f"cp: host folder {parent} does not exist")
        probe = await self.exec(["test", "-d", src])
        if probe.exit_status != 0:  # a file, or a symlink to one (followed, like `cat`)
            target = dest / os.path.basename(src.rstrip("/")) if dest.is_dir() else dest
            await self.download_file(src, target)
            return
        name = os.path.basename(src.rstrip("/")) or "root"
        res = await self.exec(["tar", "-C", os.path.dirname(src.rstrip("/")) or "/", "-cf", "-",
                               os.path.basename(src.rstrip("/")) or "."])
        if res.exit_status != 0:
            raise GuestFileError(f"cp: cannot read {src} in the sandbox: "
                                 + res.stderr.decode(errors="replace").strip())
        root = dest / name if dest.exists() else dest
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(res.stdout)) as tf:
            members = []
            for m in tf.getmembers():
                m.name = os.path.relpath(m.name, os.path.basename(src.rstrip("/")) or ".")
                if m.name != ".":
                    members.append(m)
            # 'tar' filter: names stay inside ``root``; link targets are kept as they are
            tf.extractall(root, members=members, filter="tar")

    async def interactive(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                          working_dir: str | None = None, term: str = "xterm",
                          size: tuple[int, int] = (80, 24), stdin_fd: int = 0,
                          stdout_fd: int = 1) -> int:
        """Run ``argv`` on a guest PTY wired to ``stdin_fd``/``stdout_fd`` (``exec -it``,
        ``localsbx ssh``); window size changes (SIGWINCH) are passed on. The caller puts
        its terminal in raw mode.

        :returns: the command's exit code (128+N for signal N).
        """
        import asyncssh

        from localsbx.build.builder import runtime_env
        from localsbx.guest.ssh import GuestConnection, agent_command

        rec = await self.refresh()
        if rec.state is not SandboxState.RUNNING:
            raise SandboxStateError(f"sandbox {rec.id} is {rec.state.value}")
        guest = GuestConnection("127.0.0.1", rec.ssh_port, store.management_key(),
                                asyncssh.import_public_key(rec.host_key))
        await guest.connect(timeout=30, alive=rec.qemu_alive)
        try:
            full_env = {**runtime_env(rec.env), "TERM": term, **(env or {})}
            opts = ["--stdin", "--cwd", working_dir or rec.workdir]
            if rec.user:
                opts += ["--user", rec.user]
            for k, v in full_env.items():
                opts += ["--env", f"{k}={v}"]
            conn = guest._require()
            proc = await conn.create_process(agent_command("exec", *opts, "--", *argv),
                                             term_type=term, term_size=size, encoding=None)
            loop = asyncio.get_running_loop()

            def on_input() -> None:
                data = os.read(stdin_fd, 4096)
                if data:
                    proc.stdin.write(data)
                else:
                    loop.remove_reader(stdin_fd)
                    proc.stdin.write_eof()

            def on_winch() -> None:
                import shutil

                sz = shutil.get_terminal_size()
                with contextlib.suppress(Exception):
                    proc.change_terminal_size(sz.columns, sz.lines)

            loop.add_reader(stdin_fd, on_input)
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
                import signal as _signal

                loop.add_signal_handler(_signal.SIGWINCH, on_winch)
            try:
                while chunk := await proc.stdout.read(65536):
                    os.write(stdout_fd, chunk)
                await proc.wait_closed()
            finally:
                loop.remove_reader(stdin_fd)
                with contextlib.suppress(Exception):
                    import signal as _signal

                    loop.remove_signal_handler(_signal.SIGWINCH)
            code = proc.exit_status
            if proc.exit_signal:
                from localsbx.guest.ssh import _signal_number

                return 128 + (_signal_number(proc.exit_signal[0]) or 0)
            return code if code is not None and code >= 0 else 255
        finally:
            await guest.close()

    async def open_pty(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                       working_dir: str | None = None, term: str = "xterm",
                       size: tuple[int, int] = (80, 24)) -> PtyProcess:
        """Start ``argv`` on a guest PTY and hand back its ends (Tensorlake's
        ``create_pty``; ``localsbx serve`` wires it to the SDK's WebSocket).

        :param size: ``(cols, rows)``.
        :raises SandboxStateError: not running.
        """
        import asyncssh

        from localsbx.build.builder import runtime_env
        from localsbx.guest.ssh import GuestConnection, agent_command

        rec = await self.refresh()
        if rec.state is not SandboxState.RUNNING:
            raise SandboxStateError(f"sandbox {rec.id} is {rec.state.value}")
        if not argv:
            raise ConfigError("pty: empty command")
        guest = GuestConnection("127.0.0.1", rec.ssh_port, store.management_key(),
                                asyncssh.import_public_key(rec.host_key))
        await guest.connect(timeout=30, alive=rec.qemu_alive)
        try:
            full_env = {**runtime_env(rec.env), "TERM": term, **(env or {})}
            opts = ["--stdin", "--cwd", working_dir or rec.workdir]
            if rec.user:
                opts += ["--user", rec.user]
            for k, v in full_env.items():
                opts += ["--env", f"{k}={v}"]
            proc = await guest._require().create_process(
                agent_command("exec", *opts, "--", *argv), term_type=term,
                term_size=size, encoding=None)
        except BaseException:
            await guest.close()
            raise
        return PtyProcess(guest, proc)

    def describe(self) -> dict:
        """The sandbox record as a dict, with ``status`` (Tensorlake's) and ``expires_at``."""
        d = self.record.to_json()
        d["status"] = self.status.value
        d["expires_at"] = self.record.deadline
        return d


class PtyProcess:
    """A command on a guest PTY (:meth:`AsyncSandbox.open_pty`): ``read`` what it
    prints, ``write`` keystrokes, ``resize``, ``wait`` for its exit code (128+N for signal
    N, as a shell reports it), ``close`` to hang up (the command gets SIGHUP)."""

    def __init__(self, guest, proc) -> None:
        self._guest, self._proc = guest, proc

    async def read(self, n: int = 65536) -> bytes:
        """Output, or ``b""`` at the end."""
        try:
            return await self._proc.stdout.read(n)
        except Exception:  # noqa: BLE001 - a closed channel is the end of output
            return b""

    def write(self, data: bytes) -> None:
        with contextlib.suppress(Exception):
            self._proc.stdin.write(data)

    def resize(self, cols: int, rows: int) -> None:
        with contextlib.suppress(Exception):
            self._proc.change_terminal_size(cols, rows)

    async def wait(self) -> int:
        from localsbx.guest.ssh import _signal_number

        await self._proc.wait_closed()
        if self._proc.exit_signal:
            return 128 + (_signal_number(self._proc.exit_signal[0]) or 0)
        code = self._proc.exit_status
        return code if code is not None and code >= 0 else 255

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self._proc.close()
        await self._guest.close()


def _check_name_free(name: str, project: str, *, but: str | None = None) -> None:
    if store._ID_RE.match(name):
        raise ConfigError(f"sandbox name {name!r} looks like a sandbox id (12 lowercase "
                          "letters and digits)", hint="pick a name with a '-' or capitals")
    taken = [r.id for r in store.list_sandboxes(project=project) if r.name == name and r.id != but]
    if taken:
        from localsbx.errors import NameConflict

        raise NameConflict(f"sandbox name {name!r} is already used by sandbox {taken[0]} in "
                          f"project {project!r}",
                          hint="pick another name, or terminate that sandbox")


def _check_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """A command's extra environment as a plain dict, each name checked as POSIX and
    Docker's ``-e`` require (not empty, no ``=``, no NUL; values without NUL).

    :raises ConfigError: a name or value the guest could not take, saying which.
    """
    out = {}
    for k, v in (env or {}).items():
        k, v = str(k), str(v)
        if not k or "=" in k or "\0" in k:
            raise ConfigError(f"environment variable name {k!r}: give a non-empty name "
                              "without '=' or NUL")
        if "\0" in v:
            raise ConfigError(f"environment variable {k}: its value contains a NUL byte")
        out[k] = v
    return out


def _check_timeout(value) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"timeout {value!r}: expected whole seconds") from None
    if v < 0:
        raise ConfigError(f"timeout {v}: must be 0 (never) or positive seconds")
    if v > MAX_TIMEOUT_SECS:
        raise ConfigError(f"timeout {v}: at most {MAX_TIMEOUT_SECS} s (68 years); "
                          "give 0 for no timeout")
    return v


#: The image a sandbox starts from when none is given: Tensorlake's default base
#: (``ubuntu-minimal``) when it is built here, else the first built of these.
DEFAULT_IMAGES = ("ubuntu-minimal", "debian-minimal")


def default_image() -> str:
    """The default image name (:data:`DEFAULT_IMAGES`): the first that is built, also when
    it is outdated (its recipe changed since; it keeps working until rebuilt).

    :raises BaseImageError: no base is built.
    """
    from localsbx.base import list_bases
    from localsbx.errors import BaseImageError

    # an outdated base (built from an earlier recipe) still boots: it stays the default
    built = {b.name for b in list_bases() if b.built}
    for n in DEFAULT_IMAGES:
        if n in built:
            return n
    raise BaseImageError("no base image is built, so there is no default image",
                         hint="localsbx base build debian-minimal")


async def image_for(image: str | None, project: str | None) -> store.ImageRecord:
    """The image record a sandbox starts from: a registered image, or a base built once
    into an image of the same name (Tensorlake starts sandboxes from its bases too).

    :raises ImageNotFound: neither an image nor a known base.
    """
    from localsbx.base import known_base_names

    name = image or default_image()
    try:
        img = store.lookup_image(name, project=project)
        if not _stale_base_image(img):
            return img
        base = img.meta.base
    except ImageNotFound:
        base = name.removeprefix("tensorlake/")
        if base not in known_base_names():
            raise
    try:
        img = store.lookup_image(base, project=project)
        if not _stale_base_image(img):
            return img
    except ImageNotFound:
        pass
    from localsbx.build.builder import build_image_async
    from localsbx.definition.ops import ImageDefinition

    log.info("building image %s from base %s (once)", base, base)
    return await build_image_async(ImageDefinition(name=base, base=base, source=f"<base {base}>"),
                                   name=base, project=project)


def _stale_base_image(img: store.ImageRecord) -> bool:
    """An image made from a base alone (by :func:`image_for`) whose base was rebuilt since:
    it is rebuilt in its turn, as nobody else would (a user's image says to rebuild it)."""
    from localsbx.base import get_base
    from localsbx.errors import BaseImageError

    if img.meta.source != f"<base {img.meta.base}>":
        return False
    try:
        return get_base(img.meta.base).digest != img.meta.base_digest
    except BaseImageError:
        return False


def check_resources(*, cpus=None, memory_mb=None, timeout_secs=None, disk_mb=None) -> int:
    """Check a sandbox's sizes before anything starts; ``None`` means the default.

    :param cpus: vCPUs, 1 to :data:`MAX_CPUS`.
    :param memory_mb: MiB of guest RAM, 128 up to the host's RAM.
    :param timeout_secs: seconds, 0 (never) up to :data:`MAX_TIMEOUT_SECS`.
    :param disk_mb: MiB of root disk, up to :data:`MAX_DISK_MB`.
    :returns: the timeout in seconds the sandbox gets.
    :raises ConfigError: a size out of range, saying the range.
    """
    if cpus is not None and not 1 <= int(cpus) <= MAX_CPUS:
        raise ConfigError(f"cpus {cpus}: give 1 to {MAX_CPUS} vCPUs")
    if memory_mb is not None and not 128 <= int(memory_mb) <= _host_memory_mb():
        raise ConfigError(f"memory {memory_mb} MiB: need at least 128 MiB and at most the "
                          f"host's {_host_memory_mb()} MiB")
    if disk_mb is not None and not 0 < int(disk_mb) <= MAX_DISK_MB:
        raise ConfigError(f"disk {disk_mb} MiB: give a size in MiB up to {MAX_DISK_MB}")
    return DEFAULT_TIMEOUT_SECS if timeout_secs is None else _check_timeout(timeout_secs)


async def _plan(image: str | None, *, cpus, memory_mb, timeout_secs, project, cold_boot,
                snapshot_id, disk_mb=None) -> dict:
    """Decide how a new sandbox boots: the record fields that describe it (one place
    for the clone's VM shape and the snapshot-key check)."""
    from localsbx.base import get_base
    from localsbx.vm.accel import choose_accel

    timeout = check_resources(cpus=cpus, memory_mb=memory_mb, timeout_secs=timeout_secs,
                              disk_mb=disk_mb)
    if snapshot_id is not None:
        plan = _plan_checkpoint(snapshot_id, cpus=cpus, memory_mb=memory_mb, timeout=timeout)
        return {**plan, "disk_mb": int(disk_mb or 0)}
    img = await image_for(image, project)
    base = get_base(img.meta.base)
    grow = _disk_growth(base, disk_mb)
    if base.digest != img.meta.base_digest:
        raise SnapshotError(
            f"image {img.name!r} was built on another build of base {base.name!r} "
            "(the base was rebuilt since); its disk cannot be used",
            hint=f"rebuild the image (localsbx image build ... -n {img.name})")
    cpus = int(cpus or DEFAULT_CPUS)
    memory_mb = int(memory_mb or DEFAULT_MEMORY_MB)
    accel = await choose_accel(base.kernel, base.initrd)
    snap = img.path / "snap"
    saved = img.meta.snapshot
    mismatch = snapshot.key_mismatch(saved.key, snapshot.snapshot_key(
        _shape_spec(base, accel, cpus, memory_mb), kernel_digest=base.kernel_digest))
    notice = None
    cold_boot = cold_boot or os.environ.get("LOCALSBX_COLD_BOOT") == "1"
    if cold_boot and not mismatch:
        mismatch = ["cold boot requested"]
        notice = f"image {img.name!r}: cold boot requested"
    elif mismatch:
        notice = (f"image {img.name!r} cannot restore its memory snapshot here ("
                  + "; ".join(mismatch) + "): cold-booting from the image's disk instead")
        log.warning("%s", notice)
    else:
        _check_snapshot_files(img)
    common = {"image": img.name, "project": img.project, "image_digest": img.digest,
                  "cpus": cpus, "memory_mb": memory_mb, "timeout_secs": timeout, "env": img.env,
                  "workdir": img.workdir, "user": img.user, "kernel": str(base.kernel),
                  "base_initrd": str(base.initrd), "notice": notice, "source": "image",
                  "disk_mb": grow}
    if mismatch:
        if not (img.path / "build.qcow2").exists():
            raise SnapshotError(f"image {img.name!r}: disk {img.path / 'build.qcow2'} is missing",
                                hint=f"rebuild the image (-n {img.name} --force)")
        return {**common, "cold_boot": True, "restored": False, "initrd": str(base.initrd),
                "ram_file": None, "disk_backing": str(img.path / "build.qcow2")}
    return {**common, "cold_boot": False, "restored": True, "initrd": str(snap / "initrd.cpio"),
            "ram_file": str(snap / "ram"), "state_file": str(snap / "state.mig"),
            "disk_backing": str(snap / "disk.qcow2"), "host_key": saved.host_key}


#: The largest root disk a sandbox may ask for, in MiB (qcow2 files are sparse: only what
#: the guest writes takes host space).
MAX_DISK_MB = 1 << 20
#: vCPUs a sandbox may ask for (QEMU's microvm takes more, but beyond this a guest on one host
#: only thrashes; Tensorlake's own sizes are far below).
MAX_CPUS = 64
#: The longest timeout: seconds that still fit a signed 32-bit count (about 68 years).
MAX_TIMEOUT_SECS = 2**31 - 1


def _disk_growth(base, disk_mb) -> int:
    """``disk_mb`` to grow the root disk to after boot, or 0 (the image's size is enough).

    :raises ConfigError: smaller than the image's disk (a disk is never shrunk)."""
    if disk_mb is None:
        return 0
    have = int(base.meta.get("rootfs_virtual_size") or 0) >> 20
    if int(disk_mb) < have:
        raise ConfigError(f"disk {disk_mb} MiB: the image's disk is already {have} MiB "
                          "(a sandbox's disk can grow, not shrink)",
                          hint=f"ask for at least {have} MiB, or leave disk_mb out")
    return int(disk_mb) if int(disk_mb) > have else 0


def _plan_checkpoint(cid: str, *, cpus, memory_mb, timeout: int) -> dict:
    c = store.read_checkpoint(cid)
    for what, asked, have in (("cpus", cpus, c.cpus), ("memory_mb", memory_mb, c.memory_mb)):
        if asked is not None and int(asked) != have and c.kind == "memory":
            raise ConfigError(f"checkpoint {cid} was taken at {what}={have}; a memory "
                              f"checkpoint restores only at that shape (asked {asked})")
    for f in ("disk.qcow2", "initrd.cpio") + (("state.mig",) if c.kind == "memory" else ()):
        if not (c.dir / f).exists():
            raise SnapshotError(f"checkpoint {cid}: file {c.dir / f} is missing",
                                hint="delete the checkpoint and take a new one")
    if c.kind == "memory" and c.state_digest and snapshot.file_digest(
            c.dir / "state.mig") != c.state_digest:
        raise SnapshotError(f"checkpoint {cid}: file {c.dir / 'state.mig'} is damaged (its "
                            "sampled content digest differs from the one recorded when it was "
                            "taken)", hint="delete the checkpoint and take a new one")
    common = {"image": c.image, "project": c.project, "image_digest": c.image_digest,
                  "cpus": int(cpus or c.cpus), "memory_mb": int(memory_mb or c.memory_mb),
                  "timeout_secs": timeout, "env": c.env, "workdir": c.workdir, "user": c.user,
                  "kernel": c.kernel, "base_initrd": c.base_initrd, "source": f"checkpoint:{cid}",
                  "disk_backing": str(c.dir / "disk.qcow2")}
    if c.kind == "filesystem":
        return {**common, "cold_boot": True, "restored": False,
                "initrd": c.base_initrd or c.initrd, "ram_file": None}
    return {**common, "cold_boot": False, "restored": True, "initrd": str(c.dir / "initrd.cpio"),
            "ram_file": c.ram_file, "state_file": str(c.dir / "state.mig"),
            "host_key": c.host_key}


def _host_memory_mb() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError):
        return 1 << 20


def list_sandboxes(project: str | None = None) -> list[store.SandboxRecord]:
    """The live sandboxes (pending, running, suspended), optionally of one project
    (Tensorlake's ``list``)."""
    store.reap()
    return store.list_sandboxes(project=project)


def _egress(allow_out: Sequence[str], deny_out: Sequence[str]) -> dict:
    """The record's egress fields: the entries as given and resolved (host names on the
    host, now). :raises ConfigError: a bad or unresolvable entry."""
    from localsbx.vm.net import resolve_egress

    if isinstance(allow_out, str) or isinstance(deny_out, str):
        raise ConfigError("allow_out / deny_out: expected a list of destinations, got a string",
                          hint='e.g. allow_out=["pypi.org"]')
    allow, deny = [str(e) for e in allow_out], [str(e) for e in deny_out]
    return {"allow_out": allow, "deny_out": deny,
            "allow_nets": list(resolve_egress(allow, what="allow_out")),
            "deny_nets": list(resolve_egress(deny, what="deny_out"))}


def _tail(data: bytes, n: int = 2000) -> str:
    return data[-n:].decode(errors="replace")


def _shape_spec(base, accel: Accel, cpus: int, memory_mb: int) -> VMSpec:
    """A spec with the shape a clone would have, for comparing snapshot keys."""
    p = Path("/nonexistent")
    return VMSpec(kernel=base.kernel, initrd=p, disk=p, serial_log=p, qmp_socket=p, accel=accel,
                  memory_mib=memory_mb, cpus=cpus, ram_file=p, ram_share=False, incoming=True)


def _check_snapshot_files(img: store.ImageRecord) -> None:
    """Sizes and sampled digests of the snapshot files, before a restore."""
    snapshot.check_image_snapshot(img.path, img.meta.snapshot, img.name)


class Sandbox:
    """Synchronous twin of :class:`AsyncSandbox` (same methods, blocking).

    Usage::

        with Sandbox.create(image="myimg") as sb:
            print(sb.run("uname -a").stdout)
    """

    def __init__(self, inner: AsyncSandbox) -> None:
        self._inner = inner

    @classmethod
    def create(cls, image: str | None = None, **kw) -> Sandbox:
        """See :meth:`AsyncSandbox.create` (same keyword arguments)."""
        return cls(run_sync(AsyncSandbox.create(image, **kw)))

    @classmethod
    def connect(cls, sandbox_id: str, *, project: str | None = None) -> Sandbox:
        """See :meth:`AsyncSandbox.connect`."""
        return cls(run_sync(AsyncSandbox.connect(sandbox_id, project=project)))

    sandbox_id = property(lambda self: self._inner.sandbox_id)
    id = sandbox_id
    name = property(lambda self: self._inner.name)
    image = property(lambda self: self._inner.image)
    status = property(lambda self: self._inner.status)
    notice = property(lambda self: self._inner.notice)
    history = property(lambda self: self._inner.history)
    record = property(lambda self: self._inner.record)
    serial_log = property(lambda self: self._inner.serial_log)
    timings = property(lambda self: self._inner.timings)
    ports = property(lambda self: self._inner.ports)

    def run(self, command: str | Sequence[str], args: Sequence[str] | None = None,
            env: Mapping[str, str] | None = None, working_dir: str | None = None,
            timeout: float | None = None, user: str | None = None,
            stdin: bytes | str | None = None) -> CommandResult:
        """See :meth:`AsyncSandbox.run`."""
        return run_sync(self._inner.run(command, args, env, working_dir, timeout, user, stdin))

    def exec(self, argv: Sequence[str], **kw) -> ExecResult:
        """See :meth:`AsyncSandbox.exec`."""
        return run_sync(self._inner.exec(argv, **kw))

    def start_process(self, *a, **kw):
        """See :meth:`AsyncSandbox.start_process`."""
        return run_sync(self._inner.start_process(*a, **kw))

    def list_processes(self, *a, **kw):
        """See :meth:`AsyncSandbox.list_processes`."""
        return run_sync(self._inner.list_processes(*a, **kw))

    def get_process(self, *a, **kw):
        """See :meth:`AsyncSandbox.get_process`."""
        return run_sync(self._inner.get_process(*a, **kw))

    def send_signal(self, *a, **kw):
        """See :meth:`AsyncSandbox.send_signal`."""
        return run_sync(self._inner.send_signal(*a, **kw))

    def kill_process(self, *a, **kw):
        """See :meth:`AsyncSandbox.kill_process`."""
        return run_sync(self._inner.kill_process(*a, **kw))

    def write_stdin(self, *a, **kw):
        """See :meth:`AsyncSandbox.write_stdin`."""
        return run_sync(self._inner.write_stdin(*a, **kw))

    def close_stdin(self, *a, **kw):
        """See :meth:`AsyncSandbox.close_stdin`."""
        return run_sync(self._inner.close_stdin(*a, **kw))

    def get_output(self, *a, **kw):
        """See :meth:`AsyncSandbox.get_output`."""
        return run_sync(self._inner.get_output(*a, **kw))

    def follow_output(self, *a, **kw):
        """See :meth:`AsyncSandbox.follow_output`."""
        return run_sync(self._inner.follow_output(*a, **kw))

    def read_file(self, path: str) -> bytes:
        """See :meth:`AsyncSandbox.read_file`."""
        return run_sync(self._inner.read_file(path))

    def write_file(self, path: str, content: bytes | str, *, mode: int = 0o644) -> None:
        """See :meth:`AsyncSandbox.write_file`."""
        run_sync(self._inner.write_file(path, content, mode=mode))

    def upload_file(self, path: str, src, *, mode: int | None = None,
                    size: int | None = None) -> None:
        """See :meth:`AsyncSandbox.upload_file` (streamed)."""
        run_sync(self._inner.upload_file(path, src, mode=mode, size=size))

    def download_file(self, path: str, dest) -> int:
        """See :meth:`AsyncSandbox.download_file` (streamed)."""
        return run_sync(self._inner.download_file(path, dest))

    def list_directory(self, path: str) -> list[dict]:
        """See :meth:`AsyncSandbox.list_directory`."""
        return run_sync(self._inner.list_directory(path))

    def delete_file(self, path: str) -> None:
        """See :meth:`AsyncSandbox.delete_file`."""
        run_sync(self._inner.delete_file(path))

    def upload(self, src, dest: str) -> None:
        """See :meth:`AsyncSandbox.upload`."""
        run_sync(self._inner.upload(src, dest))

    def download(self, src: str, dest) -> None:
        """See :meth:`AsyncSandbox.download`."""
        run_sync(self._inner.download(src, dest))

    def refresh(self) -> store.SandboxRecord:
        """See :meth:`AsyncSandbox.refresh`."""
        return run_sync(self._inner.refresh())

    def suspend(self) -> dict:
        """See :meth:`AsyncSandbox.suspend`."""
        return run_sync(self._inner.suspend())

    def resume(self) -> None:
        """See :meth:`AsyncSandbox.resume`."""
        run_sync(self._inner.resume())

    def checkpoint(self, checkpoint_type: str = "memory") -> store.CheckpointRecord:
        """See :meth:`AsyncSandbox.checkpoint`."""
        return run_sync(self._inner.checkpoint(checkpoint_type))

    def expose_port(self, port: int, *, host_port: int = 0) -> int:
        """See :meth:`AsyncSandbox.expose_port`."""
        return run_sync(self._inner.expose_port(port, host_port=host_port))

    def unexpose_port(self, port: int) -> None:
        """See :meth:`AsyncSandbox.unexpose_port`."""
        run_sync(self._inner.unexpose_port(port))

    def connect_desktop(self, port: int = 5901, password: str | None = None, **kw):
        """See :meth:`AsyncSandbox.connect_desktop`."""
        return run_sync(self._inner.connect_desktop(port, password, **kw))

    def update(self, *, name: str | None = None, timeout_secs: int | None = None) -> None:
        """See :meth:`AsyncSandbox.update`."""
        run_sync(self._inner.update(name=name, timeout_secs=timeout_secs))

    def describe(self) -> dict:
        """See :meth:`AsyncSandbox.describe`."""
        return self._inner.describe()

    def terminate(self) -> None:
        """See :meth:`AsyncSandbox.terminate`."""
        run_sync(self._inner.terminate())

    def close(self) -> None:
        """See :meth:`AsyncSandbox.close`."""
        run_sync(self._inner.close())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return repr(self._inner).replace("AsyncSandbox", "Sandbox")
