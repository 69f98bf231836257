"""The control protocol between a sandbox's supervisor and its clients (CLI, library, pytest
plugin, the HTTP server): framing, the client, error transport.

A connection to ``control_socket`` (a unix socket, mode 0600 in the sandbox folder) carries
*frames* both ways. A frame is one line of JSON (UTF-8, ``\\n``-terminated, at most 1 MiB)
optionally followed by exactly ``size`` raw bytes when the JSON has a ``"size"`` key, so
file contents and command output travel without base64. A request is a frame with ``"op"``;
the supervisor answers with zero or more data frames (``{"stream": "stdout"|"stderr",
"size": N}`` + N bytes) and one final frame: ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": {"type": "SandboxStateError", "message": ..., "hint": ...}}``, which
the client raises again as the same :mod:`localsbx.errors` class. A client may stream
data after its request too: ``exec`` with ``"stdin": "stream"`` takes
``{"stream": "stdin", "size": N}`` frames and ends with ``{"stream": "stdin", "eof": true}``
(:func:`stdin_frame`, :data:`STDIN_EOF`); the supervisor reads them only as fast as the guest
takes them and stops when the command ends. One request per
connection; connections are cheap (a unix socket, no handshake), so concurrent operations
use one connection each.

This module imports only the standard library and :mod:`localsbx.errors`, so
``localsbx exec`` can start, send a command and stream its output in a few tens of
milliseconds (no typer, rich or asyncssh import).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from localsbx import errors

#: Longest JSON line accepted, bytes.
MAX_LINE = 1 << 20
#: Size of data frames, bytes.
CHUNK = 256 * 1024


class ProtocolError(errors.GuestError):
    """The supervisor's answer did not follow the protocol, or the connection broke."""


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict, bytes] | None:
    """One frame: ``(header, payload)``; ``None`` at a clean end of stream.

    :raises ProtocolError: a torn or malformed frame.
    """
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError("the control connection closed in the middle of a frame") from None
    except asyncio.LimitOverrunError:
        raise ProtocolError("control frame longer than 1 MiB") from None
    try:
        header = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"malformed control frame: {line[:200]!r}") from exc
    if not isinstance(header, dict):
        raise ProtocolError(f"malformed control frame: {line[:200]!r}")
    payload = b""
    size = header.get("size")
    if size:
        try:
            payload = await reader.readexactly(int(size))
        except asyncio.IncompleteReadError:
            raise ProtocolError("the control connection closed in the middle of data") from None
    return header, payload


def encode_frame(header: dict, payload: bytes = b"") -> bytes:
    """The bytes of one frame (``size`` is set from ``payload``)."""
    if payload:
        header = {**header, "size": len(payload)}
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + payload


def error_frame(exc: BaseException) -> dict:
    """The final frame for an exception (``LocalsbxError`` keeps its class, message and hint)."""
    if isinstance(exc, errors.LocalsbxError):
        body = {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}
        for attr in ("step", "exit_code", "output_tail", "log_tail", "returncode"):
            if getattr(exc, attr, None) is not None:
                body[attr] = getattr(exc, attr)
    else:
        body = {"type": "LocalsbxError", "message": f"{type(exc).__name__}: {exc}", "hint": None}
    return {"ok": False, "error": body}


def raise_error(body: dict) -> None:
    """Raise the :mod:`localsbx.errors` exception an error frame describes."""
    cls = getattr(errors, str(body.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.LocalsbxError)):
        cls = errors.LocalsbxError
    message = body.get("message") or "the sandbox supervisor reported an error"
    try:
        exc = cls(message, hint=body.get("hint"))
    except TypeError:
        exc = errors.LocalsbxError(message, hint=body.get("hint"))
    for attr in ("step", "exit_code", "output_tail", "log_tail", "returncode"):
        if attr in body:
            setattr(exc, attr, body[attr])
    raise exc


DataCallback = Callable[[str, bytes], Any]


async def request(socket_path: str, op: str, args: dict | None = None, *,
                  payload: bytes = b"", on_data: DataCallback | None = None,
                  timeout: float | None = 30.0,
                  payload_source: Callable[[asyncio.StreamWriter], Awaitable[None]] | None = None,
                  ) -> Any:
    """Send one request and return its result.

    :param socket_path: the sandbox's ``control_socket``.
    :param payload: raw bytes sent after the request line (e.g. a file's content).
    :param on_data: called with ``(stream, bytes)`` for every data frame (command output,
        file content); without it data frames are collected and returned as
        ``{"result": ..., "data": {stream: bytes}}``.
    :param timeout: seconds for the whole exchange, ``None`` = no limit (long commands).
    :param payload_source: writes streamed data frames after the request (a command's
        stdin); it runs alongside the reading of the answer and is cancelled when the final
        frame arrives (the command may end before its input does). ``payload`` must be
        empty then.
    :raises SandboxNotFound: nothing listens on the socket (the supervisor is gone).
    :raises LocalsbxError: the error the supervisor reported, as its own class.
    """
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(socket_path, limit=MAX_LINE), timeout=10)
    except (FileNotFoundError, ConnectionRefusedError, TimeoutError) as exc:
        raise errors.SandboxNotFound(f"the sandbox supervisor at {socket_path} does not answer "
                                     f"({type(exc).__name__})") from exc
    collected: dict[str, bytearray] = {}
    feeder: asyncio.Task | None = None
    try:
        async with asyncio.timeout(timeout):
            writer.write(encode_frame({"op": op, **(args or {})}, payload))
            await writer.drain()
            if payload_source is not None:
                feeder = asyncio.create_task(_feed(payload_source, writer))
            while True:
                frame = await read_frame(reader)
                if frame is None:
                    raise ProtocolError(f"the sandbox supervisor closed the connection during "
                                        f"{op!r} (it may have stopped)")
                header, data = frame
                if "stream" in header:
                    if on_data is not None:
                        res = on_data(header["stream"], data)
                        if asyncio.iscoroutine(res):
                            await res
                    else:
                        collected.setdefault(header["stream"], bytearray()).extend(data)
                    continue
                if header.get("ok"):
                    result = header.get("result")
                    if on_data is None and collected:
                        return {"result": result,
                                "data": {k: bytes(v) for k, v in collected.items()}}
                    return result
                raise_error(header.get("error") or {})
    except TimeoutError:
        raise errors.GuestError(f"the sandbox supervisor did not finish {op!r} within "
                                f"{timeout} s") from None
    finally:
        if feeder is not None:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ConnectionError):
            pass


async def _feed(source: Callable[[asyncio.StreamWriter], Awaitable[None]],
                writer: asyncio.StreamWriter) -> None:
    """Run a payload source; the peer closing early is not an error (it has answered)."""
    with contextlib.suppress(ConnectionError, OSError):
        await source(writer)
        await writer.drain()


def stdin_frame(data: bytes) -> bytes:
    """A chunk of a streamed stdin (``exec`` with ``"stdin": "stream"``)."""
    return encode_frame({"stream": "stdin"}, data)


#: The end of a streamed stdin.
STDIN_EOF = encode_frame({"stream": "stdin", "eof": True})
