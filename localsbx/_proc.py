"""The one way localsbx runs a short-lived host command (``qemu-img``, a decompressor...).

* :func:`run` (async) never blocks the event loop: it uses an asyncio subprocess.
* :func:`run_sync_cmd` is its twin for the few synchronous callers (base builds).

Both take an argv (no shell), give the child ``stdin=/dev/null`` unless ``input`` is
given, capture stdout and stderr as bytes, log ``+ argv`` at debug level, and bound the
command with ``timeout`` seconds. The child runs in its own process group (session), so on
timeout, cancellation (``CancelledError``), Ctrl-C or any other exception the whole group
is SIGKILLed and reaped before the exception propagates: no host command outlives its
caller. Usage::

    res = await _proc.run(["qemu-img", "info", "--output=json", str(p)], timeout=30)
    info = json.loads(res.stdout)

QEMU itself is not run through here: it is a long-lived owned process
(:class:`localsbx.vm.qemu.QemuProcess`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from localsbx.errors import ConfigError, HostCommandError

log = logging.getLogger("localsbx.proc")

#: Lines of stderr kept in :class:`HostCommandError`.
STDERR_TAIL_LINES = 20
#: Seconds to wait for a SIGKILLed process group's leader to be reaped.
_REAP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Completed:
    """How a host command ended (the shape of ``subprocess.CompletedProcess``).

    :param argv: the command as run.
    :param returncode: its exit status; negative N when killed by signal N.
    :param stdout: all of stdout, bytes.
    :param stderr: all of stderr, bytes.
    """

    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def args(self) -> list[str]:
        """``subprocess.CompletedProcess`` spelling of :attr:`argv`."""
        return self.argv


def _tail(stderr: bytes, lines: int = STDERR_TAIL_LINES) -> str:
    return "\n".join(stderr.decode(errors="replace").splitlines()[-lines:])


def _name(argv: Sequence[str]) -> str:
    return os.path.basename(argv[0]) if argv else "?"


def _not_found(argv: list[str], exc: OSError) -> ConfigError:
    return ConfigError(f"cannot run {argv[0]}: {exc.strerror or exc}",
                       hint=f"install {_name(argv)} (and check PATH), then retry")


def _timeout_error(argv: list[str], timeout: float, stderr: bytes) -> HostCommandError:
    return HostCommandError(
        f"{_name(argv)} ran past its {timeout:g} s timeout and was killed: {shlex.join(argv)}",
        argv=argv, returncode=None, stderr_tail=_tail(stderr), timeout=timeout,
        hint="the host may be overloaded or the file system stuck (NFS, a full disk?)")


def _check(res: Completed) -> Completed:
    if res.returncode == 0:
        return res
    tail = _tail(res.stderr)
    how = (f"was killed by signal {-res.returncode}" if res.returncode < 0
           else f"failed (exit status {res.returncode})")
    last = tail.splitlines()[-1].strip() if tail else ""
    raise HostCommandError(f"{_name(res.argv)} {how}: {shlex.join(res.argv)}"
                           + (f": {last}" if last else ""),
                           argv=res.argv, returncode=res.returncode, stderr_tail=tail)


def _killpg(pid: int) -> None:
    # The child leads its own session (start_new_session), so its pgid is its pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _drain(stream: asyncio.StreamReader | None, buf: bytearray) -> None:
    if stream is not None:
        while chunk := await stream.read(65536):
            buf.extend(chunk)


async def _feed(stdin: asyncio.StreamWriter | None, data: bytes | None) -> None:
    if stdin is None:
        return
    try:
        if data:
            stdin.write(data)
            await stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the child exited without reading all its input: its exit status says why
    finally:
        stdin.close()


async def _exchange(proc: asyncio.subprocess.Process, data: bytes | None,
                    out: bytearray, err: bytearray) -> None:
    """Feed stdin and collect stdout/stderr into ``out``/``err`` as they arrive (so the
    output so far survives a timeout)."""
    await asyncio.gather(_feed(proc.stdin, data), _drain(proc.stdout, out),
                         _drain(proc.stderr, err))


async def _kill_and_reap(proc: asyncio.subprocess.Process, io_task: asyncio.Future) -> None:
    """SIGKILL the child's process group, then wait (bounded) for the child and its pipes."""
    _killpg(proc.pid)
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_REAP_TIMEOUT):
            await proc.wait()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await asyncio.shield(io_task)
    if not io_task.done():
        io_task.cancel()
        with contextlib.suppress(BaseException):
            await io_task


async def run(
    argv: Sequence[str | os.PathLike],
    *,
    timeout: float,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    check: bool = True,
) -> Completed:
    """Run ``argv`` on the host without blocking the event loop.

    :param argv: program and arguments (no shell); path-like items are converted.
    :param timeout: seconds the command may run; then its process group is SIGKILLed.
    :param input: bytes written to stdin, then EOF; ``None`` = stdin is ``/dev/null``.
    :param env: the complete environment (``None`` = inherit the host's).
    :param cwd: working directory (``None`` = the current one).
    :param check: raise on a non-zero exit (default); ``False`` returns the result anyway.
    :returns: :class:`Completed` with stdout and stderr as bytes.
    :raises HostCommandError: non-zero exit (with ``check``) or timeout
        (``returncode is None``); carries the argv and the stderr tail.
    :raises ConfigError: the program cannot be started (not installed, not executable).

    ``CancelledError`` kills the process group, reaps it, and propagates unchanged.
    """
    args = [os.fspath(a) for a in argv]
    log.debug("+ %s", shlex.join(args))
    try:
        proc = await asyncio.create_subprocess_exec(
            *args, stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True)
    except OSError as exc:
        raise _not_found(args, exc) from exc
    out, err = bytearray(), bytearray()
    io_task = asyncio.ensure_future(_exchange(proc, input, out, err))
    try:
        async with asyncio.timeout(timeout):
            await asyncio.shield(io_task)
            await proc.wait()
    except TimeoutError:
        await _kill_and_reap(proc, io_task)
        raise _timeout_error(args, timeout, bytes(err)) from None
    except BaseException:
        await _kill_and_reap(proc, io_task)
        raise
    res = Completed(args, proc.returncode if proc.returncode is not None else -1,
                    bytes(out), bytes(err))
    return _check(res) if check else res


def run_sync_cmd(
    argv: Sequence[str | os.PathLike],
    *,
    timeout: float,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    check: bool = True,
) -> Completed:
    """Synchronous :func:`run`, for callers outside any event loop (it blocks; never call
    it from a coroutine). Same parameters, result and errors; on ``KeyboardInterrupt`` or
    any other exception the process group is killed and reaped first."""
    args = [os.fspath(a) for a in argv]
    log.debug("+ %s", shlex.join(args))
    try:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True)
    except OSError as exc:
        raise _not_found(args, exc) from exc
    with proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc.pid)
            _, err = proc.communicate()
            raise _timeout_error(args, timeout, err or b"") from None
        except BaseException:
            _killpg(proc.pid)
            proc.wait()
            raise
    res = Completed(args, proc.returncode, out, err)
    return _check(res) if check else res
