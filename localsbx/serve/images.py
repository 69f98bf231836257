"""Tensorlake's image API as the SDK's ``Image.build()`` and image catalog calls use it:
the content-addressed build flow under ``/images/v4`` (admit a build, upload its context
tar, seal it with the tar's sha256, poll until it succeeds with an image record or fails
with the step's message) and the legacy ``/platform/v1/sandbox-templates`` catalog, which
here is always empty (a legacy hit is fatal to the SDK's CAS builds).

A build is localsbx's own builder run on the uploaded context (:func:`build_image_async`),
registered in the server's project, so ``localsbx image ls`` shows it and ``Sandbox.create
(image=NAME)`` starts from it. Bases (``debian-minimal``, ``tensorlake/debian-minimal``, …)
are in the catalog too, as Tensorlake's are. Shapes: ``notes/tensorlake-wire.md`` d.5, 3.3.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from localsbx import paths, store
from localsbx.errors import ConfigError, ImageNotFound, LocalsbxError
from localsbx.serve import wire

log = logging.getLogger("localsbx.serve")

router = APIRouter(tags=["images"])

#: The largest build context accepted, in bytes (the SDK is told in ``max_bytes``).
MAX_CONTEXT_BYTES = 4 << 30
#: Seconds an admitted build may wait for its context before it is dropped.
PENDING_BUILD_TTL = 3600.0
#: Seconds a finished build stays pollable.
FINISHED_BUILD_TTL = 24 * 3600.0


@dataclass
class Build:
    """One CAS build: ``pending`` (waiting for its context), ``running``, ``succeeded``
    (``result`` is the image record) or ``failed`` (``error`` says why) or ``canceled``."""

    id: str
    req: wire.CreateBuild
    project: str
    upload_token: str
    dir: Path
    status: str = "pending"
    error: str | None = None
    result: dict | None = None
    log: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    task: asyncio.Task | None = None

    def record(self, base_url: str) -> dict:
        d = {"build_id": self.id, "status": self.status, "phase": self.status,
             "kind": self.req.kind, "name": self.req.name, "attempt_no": 1,
             "created_at_ms": int(self.created * 1000), "updated_at_ms": int(self.updated * 1000),
             "context_upload": {"url": f"{base_url}/images/v4/builds/{self.id}/context"
                                       f"?token={self.upload_token}",
                                "method": "PUT", "max_bytes": MAX_CONTEXT_BYTES}}
        if self.error is not None:
            d["error"] = self.error
        if self.result is not None:
            d["result"] = self.result
        return d


def _builds(request: Request) -> dict[str, Build]:
    return request.app.state.builds


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _not_found(what: str) -> JSONResponse:
    return JSONResponse({"code": "not_found", "message": what}, status_code=404)


# ----------------------------------------------------------------------------- catalog

def _du(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_blocks * 512
    return total


def _image_json(img: store.ImageRecord) -> dict:
    return wire.image_record(img.name, img.digest, created_at=img.meta.created_at,
                             size=_du(img.path))


def _base_json(name: str) -> dict | None:
    from localsbx.base import get_base
    from localsbx.errors import BaseImageError

    try:
        b = get_base(name.removeprefix("tensorlake/"))
    except BaseImageError:
        return None
    created = (b.path / "base.json").stat().st_mtime
    return wire.image_record(name, "base-" + b.name + "-" + str(b.meta.get("recipe_digest", "")),
                             created_at=created, size=b.size_bytes,
                             virtual_size=int(b.meta.get("rootfs_virtual_size") or 0))


def find_image(ref: str, project: str) -> dict | None:
    """The catalog entry for ``ref``: an image of the project, else a built base (with or
    without ``tensorlake/``), as Tensorlake resolves ``FROM`` against its catalog."""
    try:
        return _image_json(store.lookup_image(ref, project=project))
    except ImageNotFound:
        return _base_json(ref)


@router.get("/images/v4/images/name/{ref:path}", summary="Find an image by name")
async def image_by_name(ref: str, request: Request) -> Response:
    found = await asyncio.to_thread(find_image, ref, request.app.state.project)
    return JSONResponse(found) if found else _not_found(f"no image named {ref!r}")


def _by_id(image_id: str, project: str) -> store.ImageRecord | None:
    for img in store.list_images(project):
        if wire.image_public_id(img.digest) == image_id:
            return img
    return None


@router.get("/images/v4/images/{image_id}", summary="Get an image by id")
async def image_by_id(image_id: str, request: Request) -> Response:
    img = await asyncio.to_thread(_by_id, image_id, request.app.state.project)
    return JSONResponse(_image_json(img)) if img else _not_found(f"no image {image_id!r}")


@router.get("/images/v4/images", summary="List images")
async def list_images(request: Request) -> dict:
    imgs = await asyncio.to_thread(store.list_images, request.app.state.project)
    return {"items": [_image_json(i) for i in imgs], "next_after": None}


@router.delete("/images/v4/images/name/{ref:path}", summary="Delete an image by name")
async def delete_image(ref: str, request: Request) -> Response:
    try:
        await asyncio.to_thread(store.remove_image, ref, project=request.app.state.project)
    except ImageNotFound as exc:
        return _not_found(exc.message)
    return Response(status_code=204)


@router.delete("/images/v4/images/{image_id}", summary="Delete an image by id")
async def delete_image_by_id(image_id: str, request: Request) -> Response:
    img = await asyncio.to_thread(_by_id, image_id, request.app.state.project)
    if img is None:
        return _not_found(f"no image {image_id!r}")
    await asyncio.to_thread(store.remove_image, img.name, project=img.project)
    return Response(status_code=204)


# The legacy template catalog: empty here (localsbx images are all CAS images).

@router.get("/platform/v1/sandbox-templates", summary="Legacy templates (always empty)")
async def legacy_list() -> dict:
    return {"items": [], "pagination": {"next": None}}


@router.get("/platform/v1/sandbox-templates/by-name/{ref:path}", summary="Legacy lookup")
async def legacy_by_name(ref: str) -> Response:
    return _not_found(f"no legacy template {ref!r}")


@router.delete("/platform/v1/sandbox-templates/by-name/{ref:path}", summary="Legacy delete")
async def legacy_delete(ref: str) -> Response:
    return _not_found(f"no legacy template {ref!r}")


@router.get("/platform/v1/sandbox-templates/{tid}", summary="Legacy get")
async def legacy_get(tid: str) -> Response:
    return _not_found(f"no legacy template {tid!r}")


# ----------------------------------------------------------------------------- builds

@router.post("/images/v4/builds", summary="Admit a build (then upload its context)")
async def create_build(body: wire.CreateBuild, request: Request) -> Response:
    builds = _builds(request)
    await asyncio.to_thread(expire_builds, builds)
    key = request.headers.get("idempotency-key")
    idem = request.app.state.build_keys
    for k in [k for k, v in idem.items() if v not in builds]:
        del idem[k]
    if key and key in idem and idem[key] in builds:
        return JSONResponse(builds[idem[key]].record(_base_url(request)))
    if body.kind != "dockerfile":
        raise ConfigError(f"image build kind {body.kind!r} is not supported by localsbx",
                          hint="build from a Dockerfile or an Image definition")
    store.check_name("image", body.name)
    active = [b for b in builds.values() if b.req.name == body.name
              and b.status in ("pending", "running")]
    if active:
        return JSONResponse({"code": "image_build_in_progress", "active_build_id": active[0].id,
                             "message": f"image {body.name!r} is already being built "
                                        f"({active[0].id})"}, status_code=409)
    bid = "bld_" + secrets.token_hex(8)
    d = paths.data_dir() / "serve" / "builds" / bid
    d.mkdir(parents=True, mode=0o700)
    b = Build(bid, body, request.app.state.project, secrets.token_urlsafe(16), d)
    builds[bid] = b
    if key:
        idem[key] = bid
    return JSONResponse(b.record(_base_url(request)))


def _build(request: Request, bid: str) -> Build | None:
    return _builds(request).get(bid)


@router.put("/images/v4/builds/{bid}/context", summary="Upload the context (plain tar)")
async def upload_context(bid: str, request: Request, token: str = "") -> Response:
    b = _build(request, bid)
    if b is None:
        return _not_found(f"no build {bid!r}")
    if not secrets.compare_digest(token, b.upload_token):
        return JSONResponse({"code": "forbidden", "message": "bad upload token"},
                            status_code=403)
    if b.status != "pending":
        raise ConfigError(f"build {bid} is {b.status}; its context can no longer change")
    size = 0
    with open(b.dir / "context.tar", "wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_CONTEXT_BYTES:
                raise ConfigError(f"build context over {MAX_CONTEXT_BYTES >> 30} GiB",
                                  hint="add a .dockerignore to leave large files out")
            await asyncio.to_thread(f.write, chunk)
    return Response(status_code=200)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@router.post("/images/v4/builds/{bid}/context/seal", summary="Seal the context; the build starts")
async def seal_context(bid: str, body: wire.SealContext, request: Request) -> Response:
    b = _build(request, bid)
    if b is None:
        return _not_found(f"no build {bid!r}")
    tar = b.dir / "context.tar"
    if not tar.is_file():
        raise ConfigError(f"build {bid}: no context was uploaded",
                          hint="PUT the context tar to context_upload.url first")
    got = await asyncio.to_thread(_sha256, tar)
    if got != body.digest.removeprefix("sha256:"):
        raise ConfigError(f"build {bid}: context digest mismatch (uploaded {got}, sealed "
                          f"{body.digest})", hint="upload the context again")
    if b.status == "pending":
        b.status, b.updated = "running", time.time()
        b.task = asyncio.create_task(_run(b))
    return JSONResponse(b.record(_base_url(request)))


@router.get("/images/v4/builds/{bid}", summary="Poll a build")
async def get_build(bid: str, request: Request) -> Response:
    b = _build(request, bid)
    return JSONResponse(b.record(_base_url(request))) if b else _not_found(f"no build {bid!r}")


@router.post("/images/v4/builds/{bid}/cancel", summary="Cancel a build")
async def cancel_build(bid: str, request: Request) -> Response:
    b = _build(request, bid)
    if b is None:
        return _not_found(f"no build {bid!r}")
    outcome = "already_finished"
    if b.status in ("pending", "running"):
        if b.task is not None:
            b.task.cancel()
            with contextlib.suppress(BaseException):
                await b.task
        b.status, b.error, b.updated, outcome = "canceled", "canceled", time.time(), "canceled"
    return JSONResponse({"outcome": outcome, "build": b.record(_base_url(request))})


class _BuildLog:
    """The builder's progress lines, kept on the build (and logged with ``--debug``)."""

    def __init__(self, b: Build) -> None:
        self.b = b

    def say(self, text: str) -> None:
        self.b.log.append(text)
        log.info("build %s: %s", self.b.id, text)

    def output(self, chunk: bytes) -> None:
        self.b.log.append(chunk.decode(errors="replace"))


def _client_paths(text: str, b: Build) -> str:
    """A build error as the SDK's user reads it: paths in the server's unpacked copy of
    the context become paths relative to their own context folder."""
    ctx = b.dir / "context"
    for prefix in {str(ctx.resolve()), str(ctx)}:
        text = text.replace(prefix + "/", "").replace(prefix, ".")
    return text


def expire_builds(builds: dict[str, Build], *, now: float | None = None) -> int:
    """Forget builds whose context never came (pending longer than
    :data:`PENDING_BUILD_TTL`) and finished builds older than :data:`FINISHED_BUILD_TTL`,
    deleting their folders. :returns: how many were dropped."""
    now = time.time() if now is None else now
    gone = [bid for bid, b in builds.items()
            if (b.status == "pending" and now - b.updated > PENDING_BUILD_TTL)
            or (b.status in ("succeeded", "failed", "canceled")
                and now - b.updated > FINISHED_BUILD_TTL)]
    for bid in gone:
        b = builds.pop(bid)
        store._rmtree(b.dir)
    return len(gone)


def _unpack(tar: Path, dest: Path) -> None:
    dest.mkdir()
    try:
        with tarfile.open(tar) as tf:
            tf.extractall(dest, filter="tar")  # names stay inside dest
    except (tarfile.TarError, OSError) as exc:
        raise ConfigError(f"the uploaded build context is not a readable tar archive "
                          f"({type(exc).__name__})",
                          hint="upload a plain (uncompressed) tar of the context folder, "
                               "as the SDK's Image.build() does") from None


async def _run(b: Build) -> None:
    from localsbx.build.builder import build_image_async
    from localsbx.definition.loader import load_definition

    try:
        ctx = b.dir / "context"
        await asyncio.to_thread(_unpack, b.dir / "context.tar", ctx)
        dockerfile = (ctx / b.req.dockerfile_path).resolve()
        if not dockerfile.is_relative_to(ctx.resolve()) or not dockerfile.is_file():
            raise ConfigError(f"dockerfile_path {b.req.dockerfile_path!r} is not a file in the "
                              "uploaded context")
        defn = await asyncio.to_thread(load_definition, dockerfile, name=b.req.name,
                                       build_args=dict(b.req.build_args) or None)
        img = await build_image_async(defn, context_dir=ctx, name=b.req.name,
                                      project=b.project, reporter=_BuildLog(b))
        b.result = await asyncio.to_thread(_image_json, img)
        b.status = "succeeded"
    except asyncio.CancelledError:
        b.status, b.error = "canceled", "canceled"
        raise
    except LocalsbxError as exc:
        b.status, b.error = "failed", _client_paths(str(exc), b)
    except Exception as exc:
        log.exception("build %s crashed", b.id)
        b.status, b.error = "failed", _client_paths(f"{type(exc).__name__}: {exc}", b)
    finally:
        b.updated = time.time()
        with contextlib.suppress(OSError):
            await asyncio.to_thread(store._rmtree, b.dir / "context")
