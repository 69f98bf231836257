"""Tensorlake's sandbox lifecycle API, namespaced as the SDK calls it in localhost mode:
``/v1/namespaces/{ns}/sandboxes…`` and ``/v1/namespaces/{ns}/snapshots…``; ``ns`` is the
localsbx project. Each handler is a thin view of :class:`localsbx.sandbox.AsyncSandbox` and
the store, so a sandbox made here is the same one ``localsbx ls`` shows, and the reverse.

Statuses, field names and the 200/202 split copy Tensorlake's API as the real SDK needs it
(``notes/tensorlake-wire.md`` d.3); what localsbx cannot do is refused with a 400 that
says so (``allow_out``/``deny_out``, GPUs, file systems, live resizes), never ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from localsbx import store
from localsbx.errors import ConfigError, LocalsbxError, SandboxNotFound, SandboxStateError
from localsbx.sandbox import AsyncSandbox, check_resources, new_sandbox_id
from localsbx.serve import wire
from localsbx.store import SandboxState

log = logging.getLogger("localsbx.serve")

router = APIRouter(prefix="/v1/namespaces/{ns}", tags=["lifecycle"])


@dataclass
class PendingCreate:
    """A create answered before its sandbox is up (``wait: false``), or one that failed
    and whose failure the SDK has not read yet."""

    sid: str
    namespace: str
    req: wire.CreateSandbox
    created_at: float = field(default_factory=time.time)
    error: str | None = None
    task: asyncio.Task | None = None


def _pending(request: Request) -> dict[str, PendingCreate]:
    return request.app.state.pending


def sandbox_url(request: Request) -> str:
    """Where the SDK reaches a sandbox's daemon API: this server; the SDK then sends
    ``Host: {id}.local`` (Tensorlake's localhost rule), which :mod:`.daemon` dispatches on."""
    return str(request.base_url).rstrip("/")


def _info(request: Request, ns: str, rec: store.SandboxRecord) -> dict:
    return wire.sandbox_info(rec, namespace=ns, sandbox_url=sandbox_url(request))


def _check_supported(req: wire.CreateSandbox | wire.UpdateSandbox) -> None:
    res = req.resources
    if res is not None and res.gpus:
        raise ConfigError("GPUs are not available in localsbx sandboxes",
                          hint="leave gpus out")
    if isinstance(req, wire.CreateSandbox) and req.file_systems:
        raise ConfigError("file_systems mounts are not supported by localsbx",
                          hint="copy files in with write_file/upload instead")


def _create_kwargs(ns: str, req: wire.CreateSandbox) -> dict:
    res = req.resources or wire.Resources()
    cpus = None
    if res.cpus is not None:
        if not math.isfinite(res.cpus) or res.cpus <= 0:
            raise ConfigError(f"resources.cpus {res.cpus}: must be a positive number")
        cpus = max(1, math.ceil(res.cpus))
    check_resources(cpus=cpus, memory_mb=res.memory_mb, timeout_secs=req.timeout_secs,
                    disk_mb=res.disk_mb)
    return dict(image=req.image, cpus=cpus, memory_mb=res.memory_mb, disk_mb=res.disk_mb,
                timeout_secs=req.timeout_secs, project=ns, detached=True, name=req.name,
                snapshot_id=req.snapshot_id, exposed_ports=tuple(req.exposed_ports or ()),
                allow_internet_access=(req.network.allow_internet_access
                                       if req.network else True),
                allow_out=tuple(req.network.allow_out if req.network else ()),
                deny_out=tuple(req.network.deny_out if req.network else ()))


async def _create(ns: str, req: wire.CreateSandbox, sid: str) -> AsyncSandbox:
    sb = await AsyncSandbox.create(**_create_kwargs(ns, req), sandbox_id=sid)
    extra = {k: v for k, v in (("allow_unauthenticated_access", req.allow_unauthenticated_access),
                               ("auto_resume", req.auto_resume)) if v is not None}
    if extra:
        sb.record = store.update_sandbox(sb.sandbox_id, extra={**sb.record.extra, **extra})
    if req.entrypoint:
        await sb.start_process(list(req.entrypoint)[0], list(req.entrypoint)[1:],
                               name="entrypoint")
    return sb


@router.post("/sandboxes", summary="Create a sandbox (Tensorlake's Sandbox.create)")
async def create_sandbox(ns: str, body: wire.CreateSandbox, request: Request) -> Response:
    _check_supported(body)
    _create_kwargs(ns, body)  # bad sizes fail now, before anything starts
    sid = new_sandbox_id()
    if body.wait is False:
        pend = PendingCreate(sid, ns, body)
        _pending(request)[sid] = pend

        async def run() -> None:
            try:
                await _create(ns, body, sid)
                _pending(request).pop(sid, None)
            except Exception as exc:  # noqa: BLE001 - kept for the SDK's next poll
                log.info("create %s failed: %s", sid, exc)
                pend.error = str(exc)

        pend.task = asyncio.create_task(run())
        return JSONResponse({"sandbox_id": sid, "status": "pending",
                             "pending_reason": "scheduling", "name": body.name},
                            status_code=202)
    sb = await _create(ns, body, sid)
    d = {"sandbox_id": sb.sandbox_id, "status": "running", "name": sb.name,
         "sandbox_url": sandbox_url(request)}
    return JSONResponse(d)


def _lookup(request: Request, ns: str, ident: str) -> store.SandboxRecord:
    try:
        rec = store.read_sandbox(ident, project=ns)
    except SandboxNotFound:
        raise
    if rec.project != ns:
        raise SandboxNotFound(f"sandbox {ident} is not in namespace {ns!r}")
    return rec


@router.get("/sandboxes/{ident}", summary="Get a sandbox by id or name")
async def get_sandbox(ns: str, ident: str, request: Request) -> dict:
    pend = _pending(request).get(ident)
    if pend is not None and pend.namespace == ns:
        if pend.error is not None:
            return wire.pending_info(pend.sid, namespace=ns, name=pend.req.name,
                                     req=pend.req, created_at=pend.created_at,
                                     status="failed", error=pend.error)
        with contextlib.suppress(SandboxNotFound, ValueError):
            rec = store.load_sandbox(ident)
            if rec.state is not SandboxState.PENDING:
                return _info(request, ns, rec)
        return wire.pending_info(pend.sid, namespace=ns, name=pend.req.name, req=pend.req,
                                 created_at=pend.created_at)
    rec = await asyncio.to_thread(_lookup, request, ns, ident)
    return _info(request, ns, rec)


@router.get("/sandboxes", summary="List the namespace's sandboxes")
async def list_sandboxes(ns: str, request: Request, status: str | None = None) -> dict:
    recs = await asyncio.to_thread(store.list_sandboxes, project=ns)
    out = [_info(request, ns, r) for r in recs]
    seen = {r.id for r in recs}
    for p in list(_pending(request).values()):
        if p.namespace == ns and p.sid not in seen:
            out.append(wire.pending_info(p.sid, namespace=ns, name=p.req.name, req=p.req,
                                         created_at=p.created_at,
                                         status="failed" if p.error else "pending",
                                         error=p.error))
    if status:
        out = [d for d in out if d["status"] == status]
    return {"sandboxes": out}


@router.patch("/sandboxes/{ident}", summary="Rename, re-expose ports")
async def update_sandbox(ns: str, ident: str, body: wire.UpdateSandbox, request: Request) -> dict:
    _check_supported(body)
    rec = await asyncio.to_thread(_lookup, request, ns, ident)
    sb = AsyncSandbox(rec)
    res = body.resources
    if res is not None and ((res.cpus is not None and math.ceil(res.cpus) != rec.cpus)
                            or (res.memory_mb is not None and res.memory_mb != rec.memory_mb)
                            or res.disk_mb is not None):
        raise ConfigError("resizing a running sandbox is not supported by localsbx",
                          hint="create a new sandbox with the resources you need")
    if body.network is not None and body.network.allow_internet_access != rec.internet:
        raise ConfigError("allow_internet_access cannot change on a running localsbx sandbox",
                          hint="create a new sandbox with the network policy you need")
    if body.network is not None and (list(body.network.allow_out) != rec.allow_out
                                     or list(body.network.deny_out) != rec.deny_out):
        raise ConfigError("network.allow_out / deny_out cannot change on a running localsbx "
                          "sandbox", hint="create a new sandbox with the network policy you need")
    if body.name is not None:
        await sb.update(name=body.name)
    if body.exposed_ports is not None:
        want = {int(p) for p in body.exposed_ports}
        have = {int(p) for p in rec.ports}
        for p in sorted(want - have):
            await sb.expose_port(p)
        for p in sorted(have - want):
            await sb.unexpose_port(p)
    extra = {k: v for k, v in (("allow_unauthenticated_access", body.allow_unauthenticated_access),
                               ("auto_resume", body.auto_resume)) if v is not None}
    if extra:
        store.update_sandbox(rec.id, extra={**store.load_sandbox(rec.id).extra, **extra})
    return _info(request, ns, await sb.refresh())


@router.delete("/sandboxes/{ident}", summary="Terminate a sandbox")
async def delete_sandbox(ns: str, ident: str, request: Request) -> dict:
    pend = _pending(request).pop(ident, None)
    if pend is not None and pend.task is not None and not pend.task.done():
        pend.task.cancel()
        with contextlib.suppress(BaseException):
            await pend.task
        return {}
    if pend is not None:
        return {}
    rec = await asyncio.to_thread(_lookup, request, ns, ident)
    await AsyncSandbox(rec).terminate()
    return {}


@router.post("/sandboxes/{ident}/suspend", summary="Suspend: state to disk, QEMU gone")
async def suspend_sandbox(ns: str, ident: str, request: Request,
                          wait_ms: int | None = Query(None)) -> dict:
    rec = await asyncio.to_thread(_lookup, request, ns, ident)
    if rec.state is SandboxState.RUNNING:
        sb = AsyncSandbox(rec)
        await sb.suspend()
        rec = sb.record
    elif rec.state is not SandboxState.SUSPENDED:
        raise SandboxStateError(f"sandbox {rec.id} is {rec.state.value}; cannot suspend")
    return _info(request, ns, rec)


@router.post("/sandboxes/{ident}/resume", summary="Resume a suspended sandbox")
async def resume_sandbox(ns: str, ident: str, request: Request,
                         wait_ms: int | None = Query(None)) -> dict:
    rec = await asyncio.to_thread(_lookup, request, ns, ident)
    sb = AsyncSandbox(rec)
    await sb.resume()
    return _info(request, ns, await sb.refresh())


@router.post("/sandboxes/{ident}/snapshot", summary="Checkpoint (memory or filesystem)")
async def snapshot_sandbox(ns: str, ident: str, request: Request) -> dict:
    kind = "memory"
    raw = await request.body()
    if raw.strip():
        body = wire.SnapshotRequest.model_validate_json(raw)
        kind = body.snapshot_type or "memory"
    if kind not in ("memory", "filesystem"):
        raise ConfigError(f"snapshot_type {kind!r}: use 'memory' or 'filesystem'")
    rec = await asyncio.to_thread(_lookup, request, ns, ident)
    cp = await AsyncSandbox(rec).checkpoint(kind)
    return {"snapshot_id": cp.id, "status": cp.status, "snapshot_type": cp.kind}


@router.get("/sandboxes/{ident}/snapshots", summary="Snapshots taken of a sandbox")
async def sandbox_snapshots(ns: str, ident: str, request: Request) -> dict:
    try:
        sid = (await asyncio.to_thread(_lookup, request, ns, ident)).id
    except SandboxNotFound:
        sid = ident  # a terminated sandbox's snapshots are still listed
    cps = await asyncio.to_thread(store.list_checkpoints, sid)
    return {"snapshots": [wire.snapshot_info(c, namespace=ns) for c in cps if c.project == ns]}


def _checkpoint(ns: str, sid: str) -> store.CheckpointRecord:
    try:
        cp = store.read_checkpoint(sid)
    except LocalsbxError:
        raise SandboxNotFound(f"no snapshot {sid!r}",
                              hint="list them: localsbx snapshot ls") from None
    if cp.project != ns:
        raise SandboxNotFound(f"snapshot {sid} is not in namespace {ns!r}")
    return cp


@router.get("/snapshots", summary="List snapshots")
async def list_snapshots(ns: str) -> dict:
    cps = await asyncio.to_thread(store.list_checkpoints)
    return {"snapshots": [wire.snapshot_info(c, namespace=ns) for c in cps if c.project == ns]}


@router.get("/snapshots/{sid}", summary="Get a snapshot")
async def get_snapshot(ns: str, sid: str) -> dict:
    return wire.snapshot_info(await asyncio.to_thread(_checkpoint, ns, sid), namespace=ns)


@router.delete("/snapshots/{sid}", summary="Delete a snapshot")
async def delete_snapshot(ns: str, sid: str) -> dict:
    cp = await asyncio.to_thread(_checkpoint, ns, sid)
    await asyncio.to_thread(store.delete_checkpoint, cp.id)
    return {}
