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
import signal as _signal
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from localsbx import store
from localsbx._loop import run_sync
from localsbx.build.builder import runtime_env
from localsbx.errors import (
    GuestError,
    SandboxNotFound,
    SandboxStateError,
    SnapshotError,
)
from localsbx.guest.ssh import ExecResult, GuestConnection
from localsbx.vm import snapshot
from localsbx.vm.accel import choose_accel
from localsbx.vm.machine import Machine, qemu_img_create
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


@dataclass
class AsyncSandbox:
    """A running sandbox (asyncio).

    Usage::

        async with await AsyncSandbox.create(image="myimg") as sb:
            res = await sb.run("echo hi")

    :ivar sandbox_id: the id (12 characters).
    :ivar notice: a sentence when the sandbox was cold-booted instead of restored.
    """

    record: store.SandboxRecord
    _guest: GuestConnection
    _machine: Machine | None = None
    notice: str | None = None
    history: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))
    _timer: asyncio.Task | None = None
    _terminated: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def sandbox_id(self) -> str:
        return self.record.id

    id = sandbox_id

    @property
    def image(self) -> str:
        return self.record.image

    @property
    def serial_log(self) -> Path:
        return self.record.dir / "serial.log"

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def create(
        cls,
        image: str,
        *,
        cpus: int | None = None,
        memory_mb: int | None = None,
        timeout_secs: int | None = None,
        project: str | None = None,
        detached: bool = False,
        name: str | None = None,
        cold_boot: bool = False,
    ) -> AsyncSandbox:
        """Start a fresh sandbox from ``image``.

        :param image: the image name in the project.
        :param cpus: vCPUs (default 1); other than the snapshot's → cold boot.
        :param memory_mb: RAM in MiB (default 1024); other than the snapshot's → cold boot.
        :param timeout_secs: the sandbox stops after this many seconds (default 600,
            Tensorlake's); 0 = never.
        :param detached: the sandbox outlives this process (CLI ``localsbx new``); otherwise
            it dies with this process, even on SIGKILL.
        :param cold_boot: boot from the image's disk instead of restoring its snapshot
            (benchmarks, or a clean boot on purpose); ``LOCALSBX_COLD_BOOT=1`` does the same
            for every sandbox of a process.
        :raises ImageNotFound: no such image.
        :raises SnapshotError: the image's snapshot files are missing or damaged.
        :raises VMLaunchError: QEMU failed or the guest did not come up (nothing is left).
        """
        t0 = time.monotonic()
        store.reap()
        img = store.lookup_image(image, project=project)
        from localsbx.base import get_base

        base = get_base(img.meta["base"])
        if base.digest != img.meta.get("base_digest"):
            raise SnapshotError(
                f"image {img.name!r} was built on another build of base {base.name!r} "
                "(the base was rebuilt since); its disk cannot be used",
                hint=f"rebuild the image (localsbx image build ... -n {img.name})")
        cpus = int(cpus or DEFAULT_CPUS)
        memory_mb = int(memory_mb or DEFAULT_MEMORY_MB)
        if cpus < 1 or memory_mb < 128:
            raise SandboxStateError(f"invalid size: {cpus} vCPU, {memory_mb} MiB "
                                    "(need at least 1 vCPU and 128 MiB)")
        timeout_secs = DEFAULT_TIMEOUT_SECS if timeout_secs is None else int(timeout_secs)
        accel = await choose_accel(base.kernel, base.initrd)
        snap = img.path / "snap"
        saved = img.meta["snapshot"]
        mismatch = snapshot.key_mismatch(saved["key"], snapshot.snapshot_key(
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
        sid = _new_id()
        d = store.sandbox_dir(sid)
        d.mkdir(parents=True)
        me = os.getpid()
        (d / "creator").write_text(f"{me} {proc_start_time(me)}")
        client_key = store.management_key()
        wrapper = []
        if detached and timeout_secs:
            wrapper = ["timeout", "--kill-after=5", str(timeout_secs)]
        machine = None
        try:
            overlay = d / "overlay.qcow2"
            if mismatch:
                qemu_img_create(overlay, img.path / "build.qcow2")
                machine = await Machine.cold_boot(
                    kernel=base.kernel, initrd=base.initrd, disk=overlay, workdir=d,
                    accel=accel, client_key=client_key, cpus=cpus, memory_mib=memory_mb,
                    detached=detached, wrapper=wrapper, name=f"localsbx-{sid}")
            else:
                qemu_img_create(overlay, snap / "disk.qcow2")
                machine = await Machine.restore(
                    snap_dir=snap, kernel=base.kernel, disk=overlay, workdir=d, accel=accel,
                    client_key=client_key, host_key_public=saved["host_key"], cpus=cpus,
                    memory_mib=memory_mb, detached=detached, wrapper=wrapper,
                    name=f"localsbx-{sid}", lazy_fixup=not detached)
            pid = machine.qemu.pid
            assert pid is not None
            rec = store.SandboxRecord(
                id=sid, image=img.name, project=img.project, image_digest=img.digest,
                pid=pid, pid_start=proc_start_time(pid),
                qemu_pid=machine.qemu.qemu_pid() or pid, ssh_port=machine.ssh_port,
                host_key=machine.host_key.export_public_key("openssh").decode().strip(),
                env=img.env, workdir=img.workdir, user=img.user, cpus=cpus,
                memory_mb=memory_mb, created_at=time.time(), timeout_secs=timeout_secs,
                restored=not mismatch, owner_pid=None if detached else me,
                owner_start=None if detached else proc_start_time(me), name=name)
            store.write_sandbox(rec)
            (d / "creator").unlink(missing_ok=True)
            if detached:
                await machine.qemu.disconnect_qmp()
        except BaseException:
            if machine is not None:
                await machine.stop()
            store._rmtree(d)
            raise
        sb = cls(rec, machine.guest, machine, notice)
        sb.timings = {**machine.timings, "total": time.monotonic() - t0}
        if not detached and timeout_secs:
            sb._timer = asyncio.get_running_loop().create_task(sb._expire(timeout_secs))
        return sb

    @classmethod
    async def connect(cls, sandbox_id: str) -> AsyncSandbox:
        """Attach to a running sandbox by id (e.g. one made by ``localsbx new``).

        :raises SandboxNotFound: no such sandbox or its QEMU is gone.
        """
        rec = store.read_sandbox(sandbox_id)
        import asyncssh

        guest = GuestConnection("127.0.0.1", rec.ssh_port, store.management_key(),
                                asyncssh.import_public_key(rec.host_key))
        try:
            await guest.connect(timeout=30, alive=rec.alive)
        except GuestError as exc:
            if not rec.alive():
                store.cleanup_sandbox(rec)
                raise SandboxNotFound(f"sandbox {sandbox_id} stopped") from exc
            raise
        return cls(rec, guest, None)

    async def _expire(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        log.warning("sandbox %s reached its timeout (%s s); terminating", self.sandbox_id, seconds)
        await self.terminate()

    async def terminate(self) -> None:
        """Stop the sandbox and delete its overlay. Idempotent."""
        if self._terminated:
            return
        self._terminated = True
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()
        with contextlib.suppress(Exception):
            await self._guest.close()
        if self._machine is not None:
            await self._machine.stop()
        else:
            await _stop_pid(self.record)
        store.cleanup_sandbox(self.record)

    async def close(self) -> None:
        """Drop this handle's connection; the sandbox keeps running."""
        with contextlib.suppress(Exception):
            await self._guest.close()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.terminate()

    def __repr__(self) -> str:
        state = "terminated" if self._terminated else "running"
        return f"<AsyncSandbox id={self.sandbox_id} image={self.image} {state}>"

    # ------------------------------------------------------------------ commands

    def _require(self) -> None:
        if self._terminated:
            raise SandboxStateError(f"sandbox {self.sandbox_id} was terminated")

    async def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   working_dir: str | None = None, timeout: float | None = None,
                   user: str | None = None, stdin: bytes | None = None,
                   stdout_cb: Callable[[bytes], None] | None = None,
                   stderr_cb: Callable[[bytes], None] | None = None) -> ExecResult:
        """Run ``argv`` (no shell) with the image ENV + ``env``, in ``working_dir`` (default
        the image WORKDIR). Lower level than :meth:`run`: returns the raw ExecResult."""
        self._require()
        full_env = {**runtime_env(self.record.env), **(env or {})}
        t = time.monotonic()
        try:
            res = await self._guest.exec(list(argv), env=full_env,
                                         cwd=working_dir or self.record.workdir,
                                         user=user or self.record.user, stdin=stdin,
                                         timeout=timeout, stdout_cb=stdout_cb,
                                         stderr_cb=stderr_cb)
        except GuestError:
            # The guest may have powered off: give its QEMU a moment to exit before deciding.
            for _ in range(40):
                if not self.record.alive():
                    break
                await asyncio.sleep(0.05)
            if not self.record.alive():
                raise SandboxNotFound(f"sandbox {self.sandbox_id} is gone (its QEMU exited); "
                                      f"serial log: {self.serial_log}") from None
            raise
        self.history.append(HistoryEntry(
            list(argv), res.shell_code, CommandResult.from_exec(res).reason.value,
            _tail(res.stdout), _tail(res.stderr), time.monotonic() - t))
        return res

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
        :raises SandboxStateError: the sandbox was terminated.
        :raises SandboxNotFound: its QEMU is gone.
        """
        data = stdin.encode() if isinstance(stdin, str) else stdin
        res = await self.exec(shell_argv(command, args), env=env, working_dir=working_dir,
                              timeout=timeout, user=user, stdin=data)
        return CommandResult.from_exec(res)

    async def read_file(self, path: str) -> bytes:
        """Read a file from the sandbox.

        :raises GuestFileError: no such file / not readable.
        """
        self._require()
        return await self._guest.get_file(path)

    async def write_file(self, path: str, content: bytes | str, *, mode: int = 0o644) -> None:
        """Write a file in the sandbox (atomically; parent folders are created).

        :raises GuestFileError: cannot be written.
        """
        self._require()
        data = content.encode() if isinstance(content, str) else content
        parent = os.path.dirname(path) or "/"
        await self._guest.exec(["mkdir", "-p", parent], env=runtime_env(self.record.env))
        await self._guest.put_file(path, data, mode=mode)

    def describe(self) -> dict:
        """The sandbox record as a dict (id, image, state, shape, ports, times)."""
        d = self.record.to_json()
        d["status"] = "terminated" if self._terminated else "running"
        return d


def _tail(data: bytes, n: int = 2000) -> str:
    return data[-n:].decode(errors="replace")


def _shape_spec(base, accel: Accel, cpus: int, memory_mb: int) -> VMSpec:
    """A spec with the shape a clone would have, for comparing snapshot keys."""
    p = Path("/nonexistent")
    return VMSpec(kernel=base.kernel, initrd=p, disk=p, serial_log=p, qmp_socket=p, accel=accel,
                  memory_mib=memory_mb, cpus=cpus, ram_file=p, ram_share=False, incoming=True)


def _check_snapshot_files(img: store.ImageRecord) -> None:
    snap = img.path / "snap"
    meta = img.meta["snapshot"]
    expect = {"state.mig": meta.get("state_size"), "ram": meta.get("ram_size"), "disk.qcow2": None,
              "initrd.cpio": None}
    for fname, size in expect.items():
        f = snap / fname
        hint = f"rebuild the image: localsbx image build <Dockerfile> -n {img.name} --force"
        if not f.exists():
            raise SnapshotError(f"image {img.name!r}: snapshot file {f} is missing", hint=hint)
        if size is not None and f.stat().st_size != size:
            raise SnapshotError(
                f"image {img.name!r}: snapshot file {f} is damaged "
                f"({f.stat().st_size} bytes, expected {size})", hint=hint)
    if not (img.path / "build.qcow2").exists():
        raise SnapshotError(f"image {img.name!r}: disk {img.path / 'build.qcow2'} is missing",
                            hint=f"rebuild the image (-n {img.name} --force)")


async def _stop_pid(rec: store.SandboxRecord, timeout: float = 5.0) -> None:
    """SIGTERM the sandbox's process, then SIGKILL after ``timeout`` seconds."""
    if not rec.alive():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(rec.pid, _signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and rec.alive():
        await asyncio.sleep(0.05)
    if rec.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, _signal.SIGKILL)


class Sandbox:
    """Synchronous twin of :class:`AsyncSandbox` (same methods, blocking).

    Usage::

        with Sandbox.create(image="myimg") as sb:
            print(sb.run("uname -a").stdout)
    """

    def __init__(self, inner: AsyncSandbox) -> None:
        self._inner = inner

    @classmethod
    def create(cls, image: str, *, cpus: int | None = None, memory_mb: int | None = None,
               timeout_secs: int | None = None, project: str | None = None,
               detached: bool = False, name: str | None = None,
               cold_boot: bool = False) -> Sandbox:
        """See :meth:`AsyncSandbox.create`."""
        return cls(run_sync(AsyncSandbox.create(image, cpus=cpus, memory_mb=memory_mb,
                                                timeout_secs=timeout_secs, project=project,
                                                detached=detached, name=name,
                                                cold_boot=cold_boot)))

    @classmethod
    def connect(cls, sandbox_id: str) -> Sandbox:
        """See :meth:`AsyncSandbox.connect`."""
        return cls(run_sync(AsyncSandbox.connect(sandbox_id)))

    @property
    def sandbox_id(self) -> str:
        return self._inner.sandbox_id

    id = sandbox_id

    @property
    def notice(self) -> str | None:
        return self._inner.notice

    @property
    def history(self) -> collections.deque:
        return self._inner.history

    @property
    def record(self) -> store.SandboxRecord:
        return self._inner.record

    @property
    def serial_log(self) -> Path:
        return self._inner.serial_log

    @property
    def timings(self) -> dict[str, float]:
        return self._inner.timings

    def run(self, command: str | Sequence[str], args: Sequence[str] | None = None,
            env: Mapping[str, str] | None = None, working_dir: str | None = None,
            timeout: float | None = None, user: str | None = None,
            stdin: bytes | str | None = None) -> CommandResult:
        """See :meth:`AsyncSandbox.run`."""
        return run_sync(self._inner.run(command, args, env, working_dir, timeout, user, stdin))

    def exec(self, argv: Sequence[str], **kw) -> ExecResult:
        """See :meth:`AsyncSandbox.exec`."""
        return run_sync(self._inner.exec(argv, **kw))

    def read_file(self, path: str) -> bytes:
        return run_sync(self._inner.read_file(path))

    def write_file(self, path: str, content: bytes | str, *, mode: int = 0o644) -> None:
        run_sync(self._inner.write_file(path, content, mode=mode))

    def describe(self) -> dict:
        return self._inner.describe()

    def terminate(self) -> None:
        run_sync(self._inner.terminate())

    def close(self) -> None:
        run_sync(self._inner.close())

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return repr(self._inner).replace("AsyncSandbox", "Sandbox")
