"""Tensorlake's per-sandbox daemon API (``/api/v1/…``), which the SDK reaches through the
``sandbox_url`` it was given. The sandbox is named by the request's ``Host: {id}.local``
(the SDK's rule for a localhost ``sandbox_url``) or by ``X-Tensorlake-Sandbox-Id`` (its rule
for any other host), so one port serves every sandbox.

Shapes copy the real daemon as the SDK reads it (``notes/tensorlake-wire.md`` d.4):
``processes/run`` and ``…/follow`` are ``text/event-stream`` with one JSON object per event
(``{"line", "timestamp", "stream"}`` then ``{"exit_code"}`` or ``{"signal"}``), output is split
into lines without their ``\\n`` (the SDK joins them with ``\\n``), timestamps are epoch
milliseconds, and PTY frames are the SDK's opcodes (``0x00`` data, ``0x01`` resize ``>HH``
cols rows, ``0x02`` ready, ``0x03`` exit ``>i``). A suspended sandbox is resumed first when
its ``auto_resume`` is on (Tensorlake's default).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import struct
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse
from sse_starlette.sse import EventSourceResponse

from localsbx import __version__, store
from localsbx.errors import ConfigError, GuestFileError, SandboxNotFound
from localsbx.sandbox import AsyncSandbox
from localsbx.serve import templates, wire
from localsbx.store import SandboxState
from localsbx.vm.net import GUEST_SSH_PORT

log = logging.getLogger("localsbx.serve")

router = APIRouter(prefix="/api/v1", tags=["sandbox daemon"])

OP_DATA, OP_RESIZE, OP_READY, OP_EXIT = 0x00, 0x01, 0x02, 0x03


def target_id(headers) -> str:
    """The sandbox a daemon request is for (``X-Tensorlake-Sandbox-Id``, else the
    ``{id}.local`` Host), or raise :class:`SandboxNotFound`."""
    sid = headers.get("x-tensorlake-sandbox-id")
    if not sid:
        host = (headers.get("host") or "").rsplit(":", 1)[0]
        if host.endswith(".local"):
            sid = host.removesuffix(".local")
    if not sid:
        raise SandboxNotFound("no sandbox named by this request",
                              hint="send Host: <sandbox id>.local or X-Tensorlake-Sandbox-Id")
    return sid


async def _sandbox(headers) -> AsyncSandbox:
    rec = await asyncio.to_thread(store.read_sandbox, target_id(headers))
    sb = AsyncSandbox(rec)
    if rec.state is SandboxState.SUSPENDED and rec.extra.get("auto_resume", True):
        log.info("auto-resuming sandbox %s", rec.id)
        await sb.resume()
    return sb


def _ms() -> int:
    return int(time.time() * 1000)


class _Lines:
    """Splits one stream's chunks into whole lines (the last, unterminated one at
    :meth:`flush`)."""

    def __init__(self, stream: str, out: asyncio.Queue) -> None:
        self.stream, self.out, self.buf = stream, out, b""

    def feed(self, chunk: bytes) -> None:
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for ln in lines:
            self._put(ln)

    def flush(self) -> None:
        if self.buf:
            self._put(self.buf)
            self.buf = b""

    def _put(self, ln: bytes) -> None:
        self.out.put_nowait({"line": ln.decode(errors="replace"), "timestamp": _ms(),
                             "stream": self.stream})


def _argv(body: wire.RunProcess) -> list[str]:
    if not body.command:
        raise ConfigError("command is empty")
    return [body.command, *(body.args or [])]


@router.post("/processes/run", summary="Run a command to completion (event stream)")
async def run_process(body: wire.RunProcess, request: Request) -> Response:
    sb = await _sandbox(request.headers)
    argv = _argv(body)
    if body.timeout is not None and not 0 < body.timeout < float("inf"):
        raise ConfigError(f"timeout {body.timeout}: must be positive seconds")
    q: asyncio.Queue = asyncio.Queue()
    out, err = _Lines("stdout", q), _Lines("stderr", q)

    async def runner() -> None:
        try:
            res = await sb.exec(argv, env=body.env, working_dir=body.working_dir,
                                timeout=body.timeout, user=wire.user_arg(body.user),
                                stdout_cb=out.feed, stderr_cb=err.feed)
            out.flush()
            err.flush()
            if res.timed_out:
                q.put_nowait({"signal": 9, "reason": "timed_out"})
            elif res.signal is not None:
                q.put_nowait({"signal": res.signal, "reason": "signaled"})
            else:
                q.put_nowait({"exit_code": res.exit_status, "reason": "exited"})
        except Exception as exc:  # noqa: BLE001 - the stream ends without an exit event
            log.info("run in %s failed: %s", sb.sandbox_id, exc)
            q.put_nowait({"error": str(exc)})
        q.put_nowait(None)

    task = asyncio.create_task(runner())

    async def events() -> AsyncIterator[str]:
        try:
            while (ev := await q.get()) is not None:
                yield json.dumps(ev)
        finally:
            if not task.done():  # the client went away: the command's tree is killed
                task.cancel()

    return EventSourceResponse(events(), ping=15)


@router.post("/processes", summary="Start a background process")
async def start_process(body: wire.RunProcess, request: Request) -> dict:
    sb = await _sandbox(request.headers)
    if templates.is_builder_start(body):
        body = await templates.intercept(request.app, sb, body)
    argv = _argv(body)
    if body.stdin_mode not in (None, "pipe", "closed"):
        raise ConfigError(f"stdin_mode {body.stdin_mode!r}: use 'pipe' or 'closed'")
    p = await sb.start_process(argv[0], argv[1:], env=body.env, working_dir=body.working_dir,
                               stdin_mode=body.stdin_mode, name=body.name,
                               user=wire.user_arg(body.user))
    return wire.process_info(p)


@router.get("/processes", summary="List background processes")
async def list_processes(request: Request) -> dict:
    sb = await _sandbox(request.headers)
    return {"processes": [wire.process_info(p) for p in await sb.list_processes()]}


def _pid(p: str) -> int | str:
    return int(p) if p.lstrip("-").isdigit() else p


@router.get("/processes/{p}", summary="One process, by pid or name")
async def get_process(p: str, request: Request) -> dict:
    sb = await _sandbox(request.headers)
    return wire.process_info(await sb.get_process(_pid(p)))


@router.delete("/processes/{p}", summary="SIGKILL a process and its children")
async def kill_process(p: str, request: Request) -> dict:
    sb = await _sandbox(request.headers)
    return wire.process_info(await sb.kill_process(_pid(p)))


@router.post("/processes/{p}/signal", summary="Send a signal")
async def signal_process(p: str, body: wire.Signal, request: Request) -> dict:
    sb = await _sandbox(request.headers)
    await sb.send_signal(_pid(p), body.signal)
    return {"success": True}


@router.post("/processes/{p}/stdin", summary="Write to stdin (raw body)")
async def write_stdin(p: str, request: Request) -> dict:
    sb = await _sandbox(request.headers)
    await sb.write_stdin(_pid(p), await request.body())
    return {}


@router.post("/processes/{p}/stdin/close", summary="Close stdin")
async def close_stdin(p: str, request: Request) -> dict:
    sb = await _sandbox(request.headers)
    await sb.close_stdin(_pid(p))
    return {}


def _stream(kind: str) -> str:
    if kind not in ("stdout", "stderr", "output"):
        raise SandboxNotFound(f"no such output stream {kind!r}")
    return kind


@router.get("/processes/{p}/{kind}", summary="Output so far (stdout, stderr or output)")
async def process_output(p: str, kind: str, request: Request) -> dict:
    sb = await _sandbox(request.headers)
    res = await sb.get_output(_pid(p), _stream(kind))
    return {"pid": res["pid"], "lines": res["lines"], "line_count": res["line_count"]}


@router.get("/processes/{p}/{kind}/follow", summary="Follow output (event stream)")
async def follow_output(p: str, kind: str, request: Request) -> Response:
    sb = await _sandbox(request.headers)
    stream = _stream(kind)
    await sb.get_process(_pid(p))  # 404 before the stream starts
    q: asyncio.Queue = asyncio.Queue()

    async def runner() -> None:
        try:
            await sb.follow_output(
                _pid(p), lambda st, line: q.put_nowait(
                    {"line": line, "timestamp": _ms(), "stream": st}), stream)
        except Exception as exc:  # noqa: BLE001 - the stream just ends
            log.info("follow in %s failed: %s", sb.sandbox_id, exc)
        q.put_nowait(None)

    task = asyncio.create_task(runner())

    async def events() -> AsyncIterator[str]:
        try:
            while (ev := await q.get()) is not None:
                yield json.dumps(ev)
        finally:
            task.cancel()

    return EventSourceResponse(events(), ping=15)


# ----------------------------------------------------------------------------- files

def _path(path: str | None) -> str:
    if not path or not path.startswith("/"):
        raise ConfigError(f"path {path!r}: give an absolute path in the sandbox")
    return path


def _file_error(exc: GuestFileError) -> JSONResponse:
    text = str(exc)
    status = 404 if "No such file" in text or "not found" in text.lower() else (
        403 if "Permission denied" in text else 400)
    return JSONResponse({"code": "file_error", "message": text}, status_code=status)


@router.get("/files", summary="Read a file (raw bytes)")
async def read_file(request: Request, path: str | None = None) -> Response:
    sb = await _sandbox(request.headers)
    chunks = sb.read_file_chunks(_path(path))
    try:  # the first chunk (or the error, before any byte) decides the status
        first = await anext(chunks, b"")
    except GuestFileError as exc:
        return _file_error(exc)

    async def body() -> AsyncIterator[bytes]:
        if first:
            yield first
        async for chunk in chunks:
            yield chunk
    return StreamingResponse(body(), media_type="application/octet-stream")


@router.put("/files", summary="Write a file (raw body)")
async def write_file(request: Request, path: str | None = None) -> Response:
    sb = await _sandbox(request.headers)
    p = _path(path)
    length = request.headers.get("content-length")
    try:
        if length is not None and length.isdigit():
            # streamed into the guest as it arrives: bounded memory for any size
            await sb.upload_file(p, request.stream(), size=int(length))
        else:  # chunked upload: spooled to a host temp file first (never whole in memory)
            with tempfile.TemporaryFile() as spool:
                async for chunk in request.stream():
                    await asyncio.to_thread(spool.write, chunk)
                spool.seek(0)
                await sb.upload_file(p, spool)
    except GuestFileError as exc:
        return _file_error(exc)
    return Response(status_code=204)


@router.delete("/files", summary="Delete a file or an empty folder")
async def delete_file(request: Request, path: str | None = None) -> Response:
    sb = await _sandbox(request.headers)
    try:
        await sb.delete_file(_path(path))
    except GuestFileError as exc:
        return _file_error(exc)
    return Response(status_code=204)


@router.get("/files/list", summary="List a folder")
async def list_directory(request: Request, path: str | None = None) -> Response:
    sb = await _sandbox(request.headers)
    p = _path(path)
    try:
        entries = await sb.list_directory(p)
    except GuestFileError as exc:
        return _file_error(exc)
    return JSONResponse({"path": p, "entries": [
        {"name": e["name"], "is_dir": e["is_dir"], "size": e["size"],
         "modified_at": e["modified_at"]} for e in entries]})


# ----------------------------------------------------------------------------- PTY

@dataclass
class PtySession:
    sandbox_id: str
    token: str
    pty: Any  # localsbx.sandbox.PtyProcess
    attached: bool = False


def _ptys(app) -> dict[str, PtySession]:
    return app.state.ptys


@router.post("/pty", summary="Start a PTY session")
async def create_pty(body: wire.PtyRequest, request: Request) -> dict:
    sb = await _sandbox(request.headers)
    if not (1 <= body.rows <= 1000 and 1 <= body.cols <= 1000):
        raise ConfigError(f"rows {body.rows} / cols {body.cols}: each must be 1-1000")
    argv = [body.command, *(body.args or [])]
    pty = await sb.open_pty(argv, env=body.env, working_dir=body.working_dir,
                            size=(body.cols, body.rows))
    sid, token = "pty_" + secrets.token_hex(8), secrets.token_urlsafe(24)
    _ptys(request.app)[sid] = PtySession(sb.sandbox_id, token, pty)
    return {"session_id": sid, "token": token}


@router.delete("/pty/{session_id}", summary="End a PTY session")
async def delete_pty(session_id: str, request: Request) -> Response:
    s = _ptys(request.app).pop(session_id, None)
    if s is None:
        return JSONResponse({"code": "not_found", "message": f"no PTY session {session_id}"},
                            status_code=404)
    await s.pty.close()
    return Response(status_code=204)


@router.websocket("/pty/{session_id}/ws")
async def pty_ws(ws: WebSocket, session_id: str) -> None:
    if not _ws_authorized(ws):
        await ws.close(code=4401)
        return
    s = _ptys(ws.app).get(session_id)
    token = ws.headers.get("x-pty-token") or ws.query_params.get("token")
    if s is None or not token or not secrets.compare_digest(token, s.token) or s.attached:
        await ws.close(code=4404 if s is None else 4401)
        return
    s.attached = True
    await ws.accept()
    ready = asyncio.Event()

    async def pump_in() -> None:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            data = msg.get("bytes")
            if not data:
                continue
            if data[0] == OP_READY:
                ready.set()
            elif data[0] == OP_DATA:
                s.pty.write(data[1:])
            elif data[0] == OP_RESIZE and len(data) >= 5:
                cols, rows = struct.unpack(">HH", data[1:5])
                s.pty.resize(cols, rows)

    reader = asyncio.create_task(pump_in())
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready.wait(), 10)
        while chunk := await s.pty.read():
            await ws.send_bytes(bytes([OP_DATA]) + chunk)
        code = await s.pty.wait()
        await ws.send_bytes(bytes([OP_EXIT]) + struct.pack(">i", code))
        await ws.close(code=1000, reason=f"exit:{code}")
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        reader.cancel()
        _ptys(ws.app).pop(session_id, None)
        await s.pty.close()


# ----------------------------------------------------------------------------- tunnels

def _ws_authorized(ws: WebSocket) -> bool:
    """The API key check for WebSockets (the HTTP middleware does not see them)."""
    key = getattr(ws.app.state, "api_key", None)
    if key is None:
        return True
    got = ws.headers.get("authorization", "")
    return secrets.compare_digest(got.encode(), f"Bearer {key}".encode())


#: Guest ports a tunnel may not reach: the management SSH server of localsbx itself.
RESERVED_PORTS = frozenset({GUEST_SSH_PORT})


@router.websocket("/tunnels/tcp")
async def tcp_tunnel(ws: WebSocket) -> None:
    """Relay one TCP connection to a guest port over the WebSocket (binary frames), by
    way of the sandbox's port forward (exposed on demand)."""
    if not _ws_authorized(ws):
        await ws.close(code=4401)
        return
    try:
        sb = await _sandbox(ws.headers)
        port = int(ws.query_params.get("port", ""))
        if not 0 < port < 65536 or port in RESERVED_PORTS:
            raise ConfigError(f"port {port}: not a port a tunnel may reach")
        host_port = sb.ports.get(port) or await sb.expose_port(port)
        reader, writer = await asyncio.open_connection("127.0.0.1", host_port)
    except Exception as exc:  # noqa: BLE001 - refused as a close reason
        await ws.close(code=4400, reason=str(exc)[:120])
        return
    await ws.accept()

    async def up() -> None:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                break
            if msg.get("bytes"):
                writer.write(msg["bytes"])
                await writer.drain()
        writer.close()

    task = asyncio.create_task(up())
    try:
        while data := await reader.read(65536):
            await ws.send_bytes(data)
        await ws.close()
    except (WebSocketDisconnect, RuntimeError, ConnectionError):
        pass
    finally:
        task.cancel()
        writer.close()


# ----------------------------------------------------------------------------- health

@router.get("/health", summary="Daemon health")
async def health(request: Request) -> dict:
    await _sandbox(request.headers)
    return {"healthy": True}


@router.get("/info", summary="Daemon info")
async def info(request: Request) -> dict:
    sb = await _sandbox(request.headers)
    procs = await sb.list_processes()
    rec = sb.record
    return {"version": __version__,
            "uptime_secs": int(time.time() - (rec.running_since or rec.created_at)),
            "running_processes": sum(p["status"] == "running" for p in procs),
            "total_processes": len(procs)}
