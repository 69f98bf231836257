"""Commands and files in the guest, over one asyncssh connection to the guest agent.

Every command goes through the guest agent (``/usr/lib/localsbx/agent exec``, see
docs/ARCHITECTURE.md), which gives Docker's semantics whatever the guest user did to their
image: a clean environment holding exactly the image ENV plus the caller's, the image
WORKDIR, the image user, stdin at EOF unless asked for, no TTY (so stdout and stderr stay
separate and no ``\\r`` is added), and a cgroup per command so a timeout kills the whole
process tree (``cgroup.kill``), not just the first process.

Output is bytes underneath (asyncssh ``encoding=None``), so invalid UTF-8 never raises.
A command killed by signal N is reported with ``signal=N`` (SSH ``exit-signal``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import shlex
import signal as _signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from localsbx.errors import CommandTimeout, GuestError, GuestFileError

log = logging.getLogger("localsbx.guest")

AGENT = "/usr/lib/localsbx/agent"
#: The boot kit's static busybox (mounted from the initramfs with the agent): internal
#: commands fall back to its ``sh`` on a rootfs that has no ``/bin/sh``.
KIT_BUSYBOX = "/usr/lib/localsbx/busybox"
#: Longest command string sent inline; longer argv goes through ``--argfile``
#: (dropbear refuses very long exec requests).
MAX_INLINE_COMMAND = 8000
#: Seconds allowed for the kill of a timed-out command's cgroup and the channel close.
KILL_GRACE = 10.0
#: The management account (uid 0, the agent is its login shell); ``root`` is the fallback
#: for images that dropped it.
MANAGEMENT_USERS = ("localsbx", "root")

#: SSH keepalive: a guest that stops answering (hung, or its QEMU stopped behind a live
#: port forward) breaks the connection after about INTERVAL * COUNT seconds, so no
#: guest-touching await waits forever.
KEEPALIVE_INTERVAL = 15
KEEPALIVE_COUNT = 8

#: Seconds to keep collecting output after the exit status arrived.
OUTPUT_GRACE = 2.0
#: Bytes read at a time by :meth:`GuestConnection.stream_file`.
STREAM_CHUNK = 256 * 1024

OutputCallback = Callable[[bytes], None]


class _Session(asyncssh.SSHClientSession):
    """Collects one channel's output as bytes and notes how the command ended."""

    def __init__(self, out_cb: OutputCallback | None, err_cb: OutputCallback | None) -> None:
        self.out, self.err = bytearray(), bytearray()
        self._out_cb, self._err_cb = out_cb, err_cb
        self.exited = asyncio.Event()
        self.closed = asyncio.Event()
        self.status: int | None = None
        self.signal: int | None = None
        self.exc: Exception | None = None
        #: set while the channel takes more input (SSH flow control), for streamed stdin
        self.writable = asyncio.Event()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes, datatype) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self._err_cb(data) if self._err_cb else self.err.extend(data)
        else:
            self._out_cb(data) if self._out_cb else self.out.extend(data)

    def exit_status_received(self, status: int) -> None:
        self.status = status
        self.exited.set()

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.signal = _signal_number(signal) or 0
        self.exited.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.exc = exc
        self.writable.set()
        self.exited.set()
        self.closed.set()


@dataclass(frozen=True)
class ExecResult:
    """How a guest command ended.

    :param exit_status: the exit status (0-255), or ``None`` when killed by a signal.
    :param signal: the signal number that killed it, or ``None``.
    :param stdout: all of stdout, as bytes (empty when streamed to a callback only).
    :param stderr: all of stderr, as bytes.
    :param timed_out: the command ran past its timeout and its process tree was killed.
    """

    exit_status: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False

    @property
    def shell_code(self) -> int:
        """The ``docker exec``/shell convention: the status, or 128+N for signal N."""
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_status if self.exit_status is not None else 255

    def describe(self) -> str:
        if self.timed_out:
            return "timed out (process tree killed)"
        if self.signal is not None:
            try:
                name = _signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            hint = " - out of memory?" if self.signal == _signal.SIGKILL else ""
            return f"killed by {name}{hint}"
        return f"exit code {self.exit_status}"


def _signal_number(name: str | None) -> int | None:
    if not name:
        return None
    name = name.upper()
    try:
        return int(_signal.Signals["SIG" + name.removeprefix("SIG")])
    except KeyError:
        return None


#: Bytes present in an agent binary that takes a clone's identity in ``fixup`` and
#: ``exec`` (``--fixup-machine-id``/``--fixup-hostname``); older agents lack them.
_IDENTITY_OPTION = b"--fixup-machine-id\0"


def agent_sets_identity(initrd: Path) -> bool:
    """Whether the agent inside ``initrd`` (the uncompressed cpio a guest booted with, so
    also the agent of every snapshot restored with it) sets a clone's machine-id and
    hostname itself (see :meth:`GuestConnection.set_identity`).

    A scan of the file for the option's string (about 5 ms for 8 MiB); ``False`` when
    the file cannot be read.
    """
    import mmap

    try:
        with open(initrd, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return m.find(_IDENTITY_OPTION) >= 0
    except (OSError, ValueError):
        return False


def agent_command(verb: str, *args: str) -> str:
    """The command string for the login shell: ``exec /usr/lib/localsbx/agent VERB ARGS``
    with POSIX single quoting (accepted by dash, bash and zsh alike)."""
    return "exec " + shlex.join([AGENT, verb, *args])


class GuestConnection:
    """One SSH connection to a guest's management server; many channels over it.

    :param host: host address of the forward, normally ``127.0.0.1``.
    :param port: host port of the ``hostfwd`` to the guest's port 10022.
    :param client_key: the store's management private key.
    :param host_key: the guest's expected host key (public); the connection is refused
        when the server presents another one.
    """

    def __init__(self, host: str, port: int, client_key: asyncssh.SSHKey,
                 host_key: asyncssh.SSHKey) -> None:
        self.host = host
        self.port = port
        self._client_key = client_key
        self._host_key = host_key
        self._conn: asyncssh.SSHClientConnection | None = None
        #: True after a snapshot restore until the clock/CRNG fixup has run in the guest;
        #: the next command then carries it (saves one round trip on the first command).
        self.fixup_pending = False
        #: ``(machine_id, hostname)`` a new clone still has to take: carried by the fixup
        #: (see :meth:`set_identity`); ``None`` once done.
        self.identity_pending: tuple[str, str] | None = None
        self.username = MANAGEMENT_USERS[0]

    @property
    def host_key(self) -> asyncssh.SSHKey:
        """The guest host key this connection pins (set it when the guest's key changes:
        the next :meth:`connect` pins the new one)."""
        return self._host_key

    @host_key.setter
    def host_key(self, key: asyncssh.SSHKey) -> None:
        self._host_key = key

    async def connect(self, *, timeout: float = 60.0, alive: Callable[[], bool] | None = None,
                      first_try: float | None = None) -> None:
        """Connect, retrying until the server answers (it may accept before it serves:
        recipe pitfall 12).

        :param timeout: seconds for the whole attempt; default 60.
        :param alive: called between tries; when it returns False (QEMU died) give up.
        :param first_try: seconds the first try may take before it is given up and retried
            (default: as long as any try, up to 15 s). A cold boot passes a short one: passt
            sends the first SYN to the broadcast MAC while it has not yet seen a frame from
            the guest, the guest's TCP drops it, and passt gives up on it only after its
            10 s SYN timeout (bases made before ``/init`` announced the guest with an ARP).
        :raises GuestError: no connection within ``timeout``.
        """
        known = asyncssh.import_known_hosts(
            f"[{self.host}]:{self.port} {self._host_key.export_public_key().decode().strip()}\n")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Exception | None = None
        delay = 0.05
        tries = 0
        while loop.time() < deadline:
            if alive is not None and not alive():
                break
            limit = max(1.0, min(15.0, deadline - loop.time()))
            if first_try is not None and tries == 0:
                limit = min(limit, first_try)
            tries += 1
            try:
                async with asyncio.timeout(limit):
                    self._conn = await asyncssh.connect(
                        self.host, self.port, username=self.username,
                        client_keys=[self._client_key], known_hosts=known, agent_path=None,
                        config=None, preferred_auth="publickey", connect_timeout=15,
                        keepalive_interval=KEEPALIVE_INTERVAL,
                        keepalive_count_max=KEEPALIVE_COUNT, kex_algs=["curve25519-sha256"],
                    )
                return
            except asyncssh.HostKeyNotVerifiable as exc:  # another guest: never retried
                raise GuestError(f"the guest's SSH server on {self.host}:{self.port} "
                                 f"presented another host key than the pinned one: {exc}") \
                    from exc
            except asyncssh.PermissionDenied as exc:
                last = exc
                if self.username == MANAGEMENT_USERS[-1]:
                    raise GuestError(f"the guest refused the management key: {exc}") from exc
                self.username = MANAGEMENT_USERS[MANAGEMENT_USERS.index(self.username) + 1]
                log.info("no %s account in the guest; using %s",
                         MANAGEMENT_USERS[0], self.username)
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                last = exc
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.5)
        raise GuestError(f"cannot reach the guest's SSH server on {self.host}:{self.port}: {last}")

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def close(self) -> None:
        """Close the connection (and every channel on it). Idempotent."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await conn.wait_closed()

    def _require(self) -> asyncssh.SSHClientConnection:
        if self._conn is None:
            raise GuestError("not connected to the guest")
        return self._conn

    async def raw(self, command: str, *, stdin: bytes | None = None,
                  stdout_cb: OutputCallback | None = None,
                  stderr_cb: OutputCallback | None = None,
                  timeout: float | None = None,
                  stdin_stream: AsyncIterator[bytes] | None = None) -> ExecResult:
        """Run one command string on the guest's login shell; bytes in, bytes out.

        stdin gets ``stdin`` (if any) and then EOF, always (asyncssh#669: a channel whose
        stdin is never closed makes ``cat``/``read`` hang). The command is done when its
        exit status arrives; output still in flight is collected for up to
        ``OUTPUT_GRACE`` seconds after that (a background process that keeps stdout open
        does not hold the call, as with ``docker exec``).

        With ``stdin_stream``, its chunks are written as they come (waiting on the channel's
        flow control, so a fast producer never piles up in memory), then EOF; the command
        may end before the stream does (``head -1``), and the rest is not read.

        :param timeout: seconds, ``None`` for no limit. On expiry the channel is closed and
            :class:`CommandTimeout` is raised with the output so far (callers that need the
            process tree killed use :meth:`exec`).
        :raises GuestError: the connection broke.
        """
        conn = self._require()
        try:
            chan, sess = await conn.create_session(
                lambda: _Session(stdout_cb, stderr_cb), command, encoding=None)
        except (asyncssh.Error, OSError) as exc:
            raise GuestError(f"cannot start a command in the guest: {exc}") from exc
        pump: asyncio.Task | None = None
        if stdin_stream is not None:
            pump = asyncio.create_task(self._pump(chan, sess, stdin_stream))
        else:
            try:
                if stdin:
                    chan.write(stdin)
                chan.write_eof()
            except (asyncssh.Error, OSError, BrokenPipeError):
                pass
        try:
            try:
                async with asyncio.timeout(timeout):
                    await sess.exited.wait()
            except TimeoutError:
                raise CommandTimeout(f"command timed out after {timeout} s",
                                     timeout=timeout or 0, stdout=bytes(sess.out),
                                     stderr=bytes(sess.err)) from None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OUTPUT_GRACE):
                    await sess.closed.wait()
        finally:
            if pump is not None:
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pump
            if sess.exited.is_set():
                chan.close()
            else:
                # cancelled or timed out: drop unsent stdin instead of flushing it (a close
                # would still deliver all of it, then EOF, and a cut-short ``put`` would
                # commit); the agent sees its input end early
                chan.abort()
        if sess.status is None and sess.signal is None:
            raise GuestError("the guest closed the command's channel without an exit status "
                             f"(the SSH connection or the guest died: {sess.exc})")
        return ExecResult(sess.status if sess.signal is None else None, sess.signal,
                          bytes(sess.out), bytes(sess.err))

    @staticmethod
    async def _pump(chan, sess: _Session, stream: AsyncIterator[bytes]) -> None:
        """Feed a stdin stream into a channel, then EOF (stops quietly if it closes)."""
        try:
            async for chunk in stream:
                if sess.closed.is_set():
                    return
                if chunk:
                    chan.write(chunk)
                    await sess.writable.wait()
            chan.write_eof()
        except (asyncssh.Error, OSError, BrokenPipeError):
            pass

    async def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None,
                   stdin: bytes | None = None, timeout: float | None = None,
                   stdout_cb: OutputCallback | None = None,
                   stderr_cb: OutputCallback | None = None,
                   kill_tree: bool = False,
                   stdin_stream: AsyncIterator[bytes] | None = None) -> ExecResult:
        """Run ``argv`` (no shell) in the guest through the agent.

        :param env: the complete environment of the command (nothing else is inherited).
        :param cwd: working directory; the command fails with 126 when it does not exist.
        :param user: ``name``, ``uid`` or ``user:group``; ``None`` = root.
        :param stdin: bytes fed to stdin, then EOF; ``None`` = stdin is ``/dev/null``.
        :param stdin_stream: instead of ``stdin``, chunks fed as they come (see :meth:`raw`).
        :param timeout: seconds; on expiry every process of the command (its cgroup) is
            SIGKILLed and the result has ``timed_out=True``; ``None`` = no limit.
        :param kill_tree: when the command ends, kill whatever it left running (a build
            step's background processes do not outlive the step, as in Docker).
        :returns: :class:`ExecResult`; a non-zero status is not an error.
        :raises GuestError: the guest or the connection failed.
        """
        if not argv:
            raise ValueError("empty argv")
        cgroup = "c" + uuid.uuid4().hex[:16]
        opts: list[str] = ["--cgroup", cgroup]
        if cwd:
            opts += ["--cwd", cwd]
        if user:
            opts += ["--user", user]
        for k, v in (env or {}).items():
            opts += ["--env", f"{k}={v}"]
        if stdin is not None or stdin_stream is not None:
            opts.append("--stdin")
        if self.fixup_pending:
            self.fixup_pending = False
            opts += ["--fixup-time-ns", str(time.time_ns()),
                     "--fixup-entropy", secrets.token_hex(64), *self._identity_opts("--fixup-")]
        command = agent_command("exec", *opts, "--", *argv)
        if len(command.encode()) > MAX_INLINE_COMMAND:
            argfile = f"/run/localsbx/args-{cgroup}"
            await self.put_file(argfile, b"\0".join(a.encode() for a in argv), mode=0o600)
            command = agent_command("exec", *opts, "--argfile", argfile, "--")
        try:
            res = await self.raw(command, stdin=stdin, stdout_cb=stdout_cb,
                                 stderr_cb=stderr_cb, timeout=timeout,
                                 stdin_stream=stdin_stream)
        except CommandTimeout as exc:
            await self.kill_cgroup(cgroup)
            return ExecResult(None, int(_signal.SIGKILL), exc.stdout, exc.stderr, timed_out=True)
        except asyncio.CancelledError:
            # Ctrl-C on the host: the command must not run on in the guest.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(KILL_GRACE):
                    await self.kill_cgroup(cgroup)
            raise
        if kill_tree:
            # a guest that cannot be reached now went away during the command (a RUN that
            # powered off the VM): that is an error, not a finished step
            await self.kill_cgroup(cgroup, strict=True)
        return res

    async def kill_cgroup(self, cgroup: str, *, strict: bool = False) -> None:
        """SIGKILL every process of a command's cgroup (bounded; errors only logged).

        :param strict: raise :class:`GuestError` when the guest cannot be reached at all.
        """
        try:
            # bounded as a whole: opening the session needs a fork in the guest, which a
            # fork bomb can stall
            async with asyncio.timeout(2 * KILL_GRACE):
                res = await self.raw(agent_command("kill", cgroup), timeout=KILL_GRACE)
            if res.exit_status not in (0, None):
                log.warning("agent kill %s: %s", cgroup, res.stderr.decode(errors="replace"))
        except (GuestError, TimeoutError) as exc:
            if strict and isinstance(exc, GuestError) and not isinstance(exc, CommandTimeout):
                raise GuestError(f"the guest went away during the command ({exc})") from exc
            log.warning("could not kill cgroup %s: %s", cgroup, exc)

    async def fixup(self) -> None:
        """Step the guest clock to host time and reseed its CRNG with 64 host-random bytes
        (after a snapshot restore: recipe pitfalls 7 and 9).

        :raises GuestError: the agent failed.
        """
        self.fixup_pending = False
        res = await self.raw(agent_command("fixup", "--time-ns", str(time.time_ns()),
                                           "--entropy", secrets.token_hex(64),
                                           *self._identity_opts("--")), timeout=30)
        if res.exit_status != 0:
            raise GuestError("post-restore fixup failed: " + res.stderr.decode(errors="replace"))

    def set_identity(self, machine_id: str, hostname: str) -> None:
        """Give a new clone its own machine-id (32 hex digits) and hostname (one DNS label)
        with the pending post-restore fixup, so the first guest command carries them: no
        extra round trip and no shell (the agent writes ``/run/localsbx/{machine-id,
        hostname,hosts}`` and calls ``sethostname``).  Only for an agent that
        :func:`agent_sets_identity`.

        :raises ValueError: a malformed machine id or hostname (the agent would refuse it).
        """
        if not re.fullmatch(r"[0-9a-f]{32}", machine_id):
            raise ValueError(f"machine id must be 32 lowercase hex digits, got {machine_id!r}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}", hostname):
            raise ValueError(f"hostname must be one DNS label, got {hostname!r}")
        self.identity_pending = (machine_id, hostname)
        self.fixup_pending = True

    def _identity_opts(self, prefix: str) -> list[str]:
        """The pending identity as agent options (``--machine-id``… or ``--fixup-machine-id``…),
        cleared: it is sent once."""
        if self.identity_pending is None:
            return []
        machine_id, hostname = self.identity_pending
        self.identity_pending = None
        return [f"{prefix}machine-id", machine_id, f"{prefix}hostname", hostname]

    async def agent(self, verb: str, *args: str, stdin: bytes | None = None,
                    timeout: float | None = 60.0,
                    stdin_stream: AsyncIterator[bytes] | None = None) -> ExecResult:
        """Run an agent verb (``sync``, ``poweroff``, ``get``...); see the contract.
        A pending post-restore fixup runs first."""
        if self.fixup_pending:
            await self.fixup()
        return await self.raw(agent_command(verb, *args), stdin=stdin, timeout=timeout,
                              stdin_stream=stdin_stream)

    async def put_file_stream(self, path: str, chunks: AsyncIterator[bytes], *, size: int,
                              mode: int = 0o644) -> None:
        """:meth:`put_file` of content as it comes (a file of any size: written under SSH
        flow control, never held whole); ``size`` is the byte count announced to the agent,
        so a stream that ends short of it (or goes past it) writes nothing.

        :raises GuestFileError: the agent could not write it, or the stream's length was
            not ``size``.
        """
        if size < 0:
            raise ValueError("put_file_stream: size must be >= 0")
        res = await self.agent("put", path, "--mode", f"{mode:o}", "--size", str(size),
                               stdin_stream=chunks, timeout=120.0 + 4.0 * size / (1 << 20))
        if res.exit_status != 0:
            raise GuestFileError(f"cannot write {path} in the sandbox: "
                                 f"{res.stderr.decode(errors='replace').strip()}")

    async def put_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Write ``data`` to ``path`` in the guest atomically (missing parents are created).

        The agent is told the size (``put --size N``) and renames its temp file into place
        only after exactly that many bytes and then end of input, so a transfer cut short
        (the connection, the supervisor or the client killed) leaves the previous file as it
        was and no temp file. Bounded: 120 s plus 4 s per MiB.

        :raises GuestFileError: the agent could not write it.
        """
        timeout = 120.0 + 4.0 * len(data) / (1 << 20)
        res = await self.agent("put", path, "--mode", f"{mode:o}", "--size", str(len(data)),
                               stdin=data, timeout=timeout)
        if res.exit_status == 2 and b"usage: put" in res.stderr:
            # A base built before ``--size`` existed (rebuild it: ``localsbx base build``).
            log.warning("the guest agent has no put --size; writing %s without the "
                        "interruption guard (rebuild the base)", path)
            res = await self.agent("put", path, "--mode", f"{mode:o}", stdin=data,
                                   timeout=timeout)
        if res.exit_status != 0:
            raise GuestFileError(f"cannot write {path} in the sandbox: "
                                 f"{res.stderr.decode(errors='replace').strip()}")

    async def get_file(self, path: str) -> bytes:
        """Read a whole guest file as bytes.

        :raises GuestFileError: no such file, a directory, or no permission.
        """
        res = await self.agent("get", path, timeout=None)
        if res.exit_status != 0:
            raise GuestFileError(f"cannot read {path} in the sandbox: "
                                 f"{res.stderr.decode(errors='replace').strip()}")
        return res.stdout

    async def stream_file(self, path: str, sink: Callable[[bytes], Any]) -> int:
        """Read a guest file in chunks, handing each to ``await sink(chunk)`` before the
        next is read: a slow sink holds the guest back through SSH flow control, so a file
        of any size never sits in memory.

        :returns: the number of bytes read.
        :raises GuestFileError: no such file, a directory, or no permission.
        """
        if self.fixup_pending:
            await self.fixup()
        conn = self._require()
        try:
            proc = await conn.create_process(agent_command("get", path), encoding=None)
        except (asyncssh.Error, OSError) as exc:
            raise GuestError(f"cannot start a command in the guest: {exc}") from exc
        total = 0
        try:
            proc.stdin.write_eof()
            err = asyncio.create_task(proc.stderr.read())
            while chunk := await proc.stdout.read(STREAM_CHUNK):
                total += len(chunk)
                res = sink(chunk)
                if asyncio.iscoroutine(res):
                    await res
            await proc.wait()
            stderr = await err
        except (asyncssh.Error, OSError) as exc:
            raise GuestError(f"reading {path} from the guest broke off: {exc}") from exc
        finally:
            proc.close()
        if proc.exit_status != 0:
            why = stderr.decode(errors="replace").strip() or (
                f"the agent ended with status {proc.exit_status}, signal {proc.exit_signal}, "
                f"after {total} bytes")
            raise GuestFileError(f"cannot read {path} in the sandbox: {why}")
        return total

    async def extract_tar(self, tar_bytes: bytes, *, timeout: float | None = None) -> ExecResult:
        """Extract a tar stream at ``/`` keeping numeric owners and modes; existing
        directories keep their metadata (GNU tar ``--no-overwrite-dir``)."""
        return await self.exec(
            ["tar", "-C", "/", "-xpf", "-", "--same-owner", "--numeric-owner",
             "--no-overwrite-dir", "--keep-directory-symlink"],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, stdin=tar_bytes, timeout=timeout)
