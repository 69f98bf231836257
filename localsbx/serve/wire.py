"""Tensorlake's wire shapes: the request bodies ``localsbx serve`` accepts (pydantic models,
so they are in ``/openapi.json``) and the JSON it answers with, built from localsbx's own
records.

Every shape copies what the real ``tensorlake`` SDK (Python 0.5.163, TypeScript 0.5.89)
sends and needs back, as recorded in ``notes/tensorlake-wire.md`` and read from the SDK's
``tensorlake/sandbox/models.py``: field names, lowercase statuses, epoch-second times.
Unknown request fields are accepted and ignored, as Tensorlake's API does, so a newer SDK
does not break on a field this server does not know.
"""

from __future__ import annotations

import functools
import hashlib
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from localsbx import store

#: The namespace the SDK uses when ``INDEXIFY_NAMESPACE`` is not set; it maps to the
#: localsbx project of the same name.
DEFAULT_NAMESPACE = "default"


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class Resources(_Body):
    cpus: float | None = None
    memory_mb: int | None = None
    disk_mb: int | None = None
    gpus: list[dict] | None = None


class Network(_Body):
    allow_internet_access: bool = True
    allow_out: list[str] = Field(default_factory=list)
    deny_out: list[str] = Field(default_factory=list)


class CreateSandbox(_Body):
    """``POST /v1/namespaces/{ns}/sandboxes`` (Tensorlake's ``CreateSandboxRequest``)."""

    image: str | None = None
    resources: Resources | None = None
    timeout_secs: int | None = None
    entrypoint: list[str] | None = None
    network: Network | None = None
    snapshot_id: str | None = None
    allow_unauthenticated_access: bool | None = None
    exposed_ports: list[int] | None = None
    name: str | None = None
    file_systems: list[dict] | None = None
    wait: bool | None = None
    max_pending_secs: int | None = None
    auto_resume: bool | None = None


class UpdateSandbox(_Body):
    """``PATCH /v1/namespaces/{ns}/sandboxes/{id}`` (Tensorlake's ``UpdateSandboxRequest``)."""

    name: str | None = None
    allow_unauthenticated_access: bool | None = None
    exposed_ports: list[int] | None = None
    auto_resume: bool | None = None
    network: Network | None = None
    resources: Resources | None = None


class SnapshotRequest(_Body):
    snapshot_type: str | None = None


class ProcessUser(_Body):
    name: str | None = None
    uid: int | None = None
    gid: int | None = None


class RunProcess(_Body):
    """``POST /api/v1/processes/run`` and ``POST /api/v1/processes``: ``command`` is the
    program and ``args`` its arguments (no shell), as Tensorlake's sandbox daemon runs it."""

    command: str
    args: list[str] | None = None
    env: dict[str, str] | None = None
    working_dir: str | None = None
    timeout: float | None = None
    user: str | ProcessUser | None = None
    stdin_mode: str | None = None
    stdout_mode: str | None = None
    stderr_mode: str | None = None
    name: str | None = None


class Signal(_Body):
    signal: int


class PtyRequest(_Body):
    command: str
    args: list[str] | None = None
    env: dict[str, str] | None = None
    working_dir: str | None = None
    rows: int = 24
    cols: int = 80


class CreateBuild(_Body):
    """``POST /images/v4/builds`` (the SDK's CAS image build admission)."""

    kind: str = "dockerfile"
    name: str
    dockerfile_path: str = "Dockerfile"
    parents: list[dict] = Field(default_factory=list)
    build_args: dict[str, str] = Field(default_factory=dict)
    builder_resources: dict | None = None
    disk_mb: int | None = None
    image_ref: str | None = None


class SealContext(_Body):
    digest: str


# ----------------------------------------------------------------------------- answers

def user_arg(user: str | ProcessUser | None) -> str | None:
    """Tensorlake's process user (a name, ``uid[:gid]``, or ``{name, uid, gid}``) as the
    ``user`` string localsbx's guest agent takes."""
    if user is None or isinstance(user, str):
        return user or None
    if user.name:
        return user.name
    if user.uid is not None:
        return f"{user.uid}:{user.gid}" if user.gid is not None else str(user.uid)
    return None


def disk_mb(rec: store.SandboxRecord) -> int:
    """The guest's root disk in MiB: its base's rootfs virtual size (the SDK requires
    ``resources.disk_mb``), or what the sandbox was grown to."""
    return rec.disk_mb or _disk_mb_of(rec.image_digest)


@functools.lru_cache(maxsize=256)
def _disk_mb_of(image_digest: str) -> int:
    from localsbx.base import get_base

    try:
        meta = store.ImageMeta.from_json(store.read_json(store.image_dir(image_digest)
                                                         / "image.json"))
        size = get_base(meta.base).meta.get("rootfs_virtual_size")
        return int(size) // (1 << 20) if size else 8192
    except Exception:  # noqa: BLE001 - an image or base removed since: the default is right
        return 8192


def sandbox_info(rec: store.SandboxRecord, *, namespace: str, sandbox_url: str | None,
                 status: str | None = None) -> dict[str, Any]:
    """Tensorlake's ``SandboxInfo`` for a localsbx sandbox record."""
    st = status or rec.state.value
    d: dict[str, Any] = {
        "id": rec.id,  # not also "sandbox_id": the SDK takes either, and refuses both
        "namespace": namespace,
        "status": st,
        "image": rec.image,
        "name": rec.name,
        "resources": {"cpus": float(rec.cpus), "memory_mb": rec.memory_mb,
                      "disk_mb": disk_mb(rec)},
        "timeout_secs": rec.timeout_secs,
        "created_at": rec.created_at,
        "network_policy": {"allow_internet_access": rec.internet,
                           "allow_out": list(rec.allow_out), "deny_out": list(rec.deny_out)},
        "exposed_ports": sorted(int(p) for p in rec.ports),
        "allow_unauthenticated_access": bool(rec.extra.get("allow_unauthenticated_access")),
        "auto_resume": bool(rec.extra.get("auto_resume", True)),
        "file_systems": [],
    }
    if sandbox_url and (st == "running" or (st == "suspended" and d["auto_resume"])):
        d["sandbox_url"] = sandbox_url  # a suspended one resumes on its next daemon call
    if rec.error:
        d["error_details"] = rec.error
    return d


def pending_info(sid: str, *, namespace: str, name: str | None, req: CreateSandbox,
                 created_at: float, status: str = "pending",
                 error: str | None = None) -> dict[str, Any]:
    """``SandboxInfo`` of a sandbox still being created (or whose creation failed)."""
    res = req.resources or Resources()
    d: dict[str, Any] = {
        "id": sid, "namespace": namespace, "status": status,
        "image": req.image, "name": name,
        "resources": {"cpus": float(res.cpus or 1), "memory_mb": int(res.memory_mb or 1024),
                      "disk_mb": int(res.disk_mb or 8192)},
        "timeout_secs": req.timeout_secs, "created_at": created_at,
        "pending_reason": "scheduling" if status == "pending" else None,
        "exposed_ports": sorted(req.exposed_ports or []), "file_systems": [],
    }
    if error:
        d["error_details"] = error
        d["termination_reason"] = "startup_failed"
    return d


def snapshot_info(cp: store.CheckpointRecord, *, namespace: str) -> dict[str, Any]:
    """Tensorlake's ``SnapshotInfo`` for a localsbx checkpoint."""
    return {
        "id": cp.id, "namespace": namespace, "sandbox_id": cp.sandbox_id,
        "base_image": cp.image, "snapshot_type": cp.kind, "status": cp.status,
        "size_bytes": cp.size_bytes, "created_at": cp.created_at,
    }


def process_info(p: dict) -> dict[str, Any]:
    """Tensorlake's ``ProcessInfo`` from the supervisor's process dict."""
    return {
        "pid": p["pid"], "status": p["status"], "exit_code": p.get("exit_code"),
        "signal": p.get("signal"), "stdin_writable": bool(p.get("stdin_open")),
        "command": p["command"], "args": list(p.get("args") or []),
        "started_at": p["started_at"], "ended_at": p.get("ended_at"),
    }


def image_public_id(digest: str) -> str:
    """The ``image_…`` id under which an image folder is known on the wire."""
    return "image_" + digest[:24]


def image_record(name: str, digest: str, *, created_at: float, size: int = 0,
                 virtual_size: int = 0) -> dict[str, Any]:
    """The image service's image record (all eight fields the SDK requires)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created_at))
    return {
        "id": image_public_id(digest), "name": name,
        "snapshot_id": hashlib.sha256(digest.encode()).hexdigest(),
        "global": False, "physical_size_bytes": int(size),
        "logical_size_bytes": int(virtual_size or size),
        "created_at": stamp, "updated_at": stamp,
    }
