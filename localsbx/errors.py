"""The one exception hierarchy of localsbx.

Every error a user can see carries a message that says what went wrong and
what to do about it; the CLI prints ``str(err)`` and, when set, ``err.hint``.
Library code never calls ``sys.exit``; it raises one of these::

    LocalsbxError
     +-- ConfigError              bad option, environment or host set-up
     +-- HostCommandError         a host tool (qemu-img, zstd...) failed or timed out
     +-- DefinitionError          a Dockerfile / DSL definition is wrong (file, line)
     +-- BaseImageError           a base image is unknown, missing or not built
     +-- ImageNotFound            no image of that name in the project
     +-- ImageBuildError          a build step failed (step, exit code, output tail)
     +-- SnapshotError            a snapshot is missing, corrupt or incompatible
     +-- VMError                  QEMU failed
     |    +-- VMLaunchError       QEMU did not start or the guest never became ready
     |    +-- AbnormalShutdown    QEMU had to be killed
     +-- SandboxNotFound          no sandbox with that id (or it is gone)
     +-- SandboxStateError        the sandbox is not in a state that allows this
     +-- GuestError               talking to the guest failed (SSH)
          +-- CommandTimeout      a guest command ran past its timeout (also a TimeoutError)
          +-- GuestFileError      reading/writing a guest file failed

``CancelledError`` and other ``BaseException`` are never wrapped: resources are
cleaned up and the exception is re-raised unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass


class LocalsbxError(Exception):
    """Root of all localsbx errors.

    :param message: what went wrong, in words a user can act on.
    :param hint: optional next step ("run `localsbx base build debian-minimal`").
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\nhint: {self.hint}"
        return self.message


class ConfigError(LocalsbxError):
    """A bad option, environment variable or host set-up (missing qemu-system-x86_64, ...)."""


class NameConflict(ConfigError):
    """A sandbox name already used in the project (Tensorlake answers 409
    ``sandbox_name_taken``)."""


class HostCommandError(LocalsbxError):
    """A command run on the host (``qemu-img``, a decompressor...) exited non-zero or ran
    past its timeout (it was killed then). Raised by :mod:`localsbx._proc`.

    :param argv: the command as run.
    :param returncode: its exit status (negative N: killed by signal N), or ``None`` when
        it timed out.
    :param stderr_tail: the last lines of its stderr (text, possibly empty).
    :param timeout: the timeout in seconds it ran past, or ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        argv: list[str],
        returncode: int | None,
        stderr_tail: str = "",
        timeout: float | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.timeout = timeout

    @property
    def timed_out(self) -> bool:
        """The command was killed because it ran past its timeout."""
        return self.returncode is None

    def __str__(self) -> str:
        text = self.message
        if self.stderr_tail:
            text += "\n--- stderr (tail) ---\n" + self.stderr_tail.rstrip("\n")
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


@dataclass(frozen=True)
class SourceLocation:
    """Where in a definition something is: file path (or ``<dsl>``) and 1-based line."""

    path: str
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.line}" if self.line else self.path


class DefinitionError(LocalsbxError):
    """An image definition is wrong: unknown instruction, bad flag, missing FROM, bad JSON...

    :param location: file and line of the offending instruction, when known.
    """

    def __init__(
        self, message: str, *, location: SourceLocation | None = None, hint: str | None = None
    ) -> None:
        prefix = f"{location}: " if location else ""
        super().__init__(prefix + message, hint=hint)
        self.location = location


class BaseImageError(LocalsbxError):
    """A base image is unknown, missing on disk, or not built yet."""


class ImageNotFound(LocalsbxError):
    """No image of that name is registered in the project."""


class ImageBuildError(LocalsbxError):
    """A build step failed.

    :param step: human description of the step ("line 3: RUN pip install six").
    :param exit_code: the step's exit code (128+N when killed by signal N), if it ran.
    :param output_tail: the last lines of the step's combined output (text).
    """

    def __init__(
        self,
        message: str,
        *,
        step: str | None = None,
        exit_code: int | None = None,
        output_tail: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.step = step
        self.exit_code = exit_code
        self.output_tail = output_tail

    def __str__(self) -> str:
        text = self.message
        if self.output_tail:
            text += "\n--- output (tail) ---\n" + self.output_tail.rstrip("\n")
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class SnapshotError(LocalsbxError):
    """A snapshot file is missing, corrupt, or was taken with another QEMU/accel/RAM/kernel."""


class VMError(LocalsbxError):
    """QEMU failed."""


class VMLaunchError(VMError):
    """QEMU did not start, exited early, or the guest never became reachable.

    :param argv: the QEMU argv.
    :param returncode: QEMU's exit status if it exited, else ``None``.
    :param log_tail: the tail of the guest serial log / QEMU stderr.
    """

    def __init__(
        self,
        message: str,
        *,
        argv: list[str] | None = None,
        returncode: int | None = None,
        log_tail: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.argv = argv or []
        self.returncode = returncode
        self.log_tail = log_tail

    def __str__(self) -> str:
        text = self.message
        if self.returncode is not None:
            text += f" (qemu exit status {self.returncode})"
        if self.log_tail:
            text += "\n--- log (tail) ---\n" + self.log_tail.rstrip("\n")
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class AbnormalShutdown(VMError):
    """QEMU did not stop when asked and had to be killed."""


class SandboxNotFound(LocalsbxError):
    """No sandbox with that id exists (or its QEMU is gone)."""


class DesktopError(LocalsbxError):
    """No VNC desktop to connect to, or the VNC session failed (:mod:`localsbx.desktop`)."""


class SandboxStateError(LocalsbxError):
    """The sandbox is not in a state that allows the operation (e.g. already terminated)."""


class GuestError(LocalsbxError):
    """Talking to the guest failed (SSH connection lost, agent missing...)."""


class CommandTimeout(GuestError, TimeoutError):
    """A guest command ran past its timeout; its whole process tree was killed.

    Copies asyncssh's ``TimeoutError(ProcessError, asyncio.TimeoutError)``: callers that
    catch the stdlib ``TimeoutError`` still catch it, and the partial output stays here.

    :param timeout: the timeout in seconds.
    :param stdout: bytes captured before the kill.
    :param stderr: bytes captured before the kill.
    """

    def __init__(
        self, message: str, *, timeout: float, stdout: bytes = b"", stderr: bytes = b""
    ) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr


class GuestFileError(GuestError):
    """Reading or writing a file in the guest failed (no such file, permission...)."""
