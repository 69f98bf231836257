"""Tensorlake's legacy sandbox-template build flow, which the TypeScript SDK (npm
``tensorlake`` 0.5.89) uses for ``Image.build()``.

Recorded from that SDK against this server (its HTTP client is in its native module):

1. ``POST /platform/v1/keys/introspect`` → the key's project;
2. ``GET …/organizations/{org}/projects/{proj}/sandbox-templates/by-name/{base}``: 404 means
   the base is not a template (so it is a base or a registry image);
3. ``POST …/sandbox-template-builds`` ``{name, dockerfile, baseImage, …}`` → a prepared
   build ``{buildId, snapshotId, rootfsNodeKind, builder: {image, command, cpus, memoryMb,
   diskMb}}``;
4. the SDK starts a *builder sandbox* from ``builder.image``, uploads the context as
   ``context.tar.gz`` and a ``spec.json`` into ``/var/lib/tensorlake/rootfs-builder/build``,
   then starts ``/usr/local/bin/tl-rootfs-build --spec … --metadata-out …`` and waits for it;
5. it reads the metadata file and registers the template (``POST …/sandbox-templates``).

localsbx does step 4's real work on the host, where its builder is: when a builder sandbox
starts ``tl-rootfs-build`` (:func:`intercept`), the server copies the context out of that
sandbox, builds the Dockerfile with :func:`build_image_async` and registers the image; the
process the SDK waits on is a real guest process that prints the build log and exits with
the build's status once the server has written the metadata file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from localsbx import store
from localsbx.errors import ConfigError, ImageNotFound, LocalsbxError
from localsbx.serve import wire

log = logging.getLogger("localsbx.serve")

router = APIRouter(tags=["legacy templates"])

BUILD_DIR = "/var/lib/tensorlake/rootfs-builder/build"
BUILDER_COMMAND = "/usr/local/bin/tl-rootfs-build"
_SCOPE = "/platform/v1/organizations/{org}/projects/{proj}"


@dataclass
class TemplateBuild:
    id: str
    name: str
    dockerfile: str
    project: str
    result: dict | None = None
    created: float = field(default_factory=time.time)


def _template(img: store.ImageRecord, *, dockerfile: str = "") -> dict:
    rec = wire.image_record(img.name, img.digest, created_at=img.meta.created_at)
    return {"id": "sandbox_template_" + img.digest[:20], "name": img.name,
            "snapshotId": rec["snapshot_id"], "snapshotSandboxId": None,
            "snapshotUri": "snapshot://" + rec["snapshot_id"],
            "snapshotFormatVersion": "localsbx", "snapshotSizeBytes": 0,
            "rootfsDiskBytes": 0, "rootfsNodeKind": "base", "public": False,
            "dockerfile": dockerfile, "createdAt": rec["created_at"],
            "updatedAt": rec["updated_at"]}


@router.post("/platform/v1/keys/introspect", summary="The project an API key belongs to")
async def introspect(request: Request) -> dict:
    project = request.app.state.project
    return {"id": "localsbx", "organizationId": "localsbx", "projectId": project,
            "project": {"id": project}, "tokenType": "api_key"}


@router.get(_SCOPE + "/sandbox-templates/by-name/{name:path}", summary="Legacy lookup")
async def template_by_name(org: str, proj: str, name: str, request: Request):
    try:
        img = await asyncio.to_thread(store.lookup_image, name,
                                      project=request.app.state.project)
    except ImageNotFound:
        return JSONResponse({"code": "not_found", "message": f"no template {name!r}"},
                            status_code=404)
    return _template(img)


@router.post(_SCOPE + "/sandbox-template-builds", summary="Prepare a template build")
async def prepare_build(org: str, proj: str, request: Request) -> dict:
    from localsbx.sandbox import default_image

    body = await request.json()
    name = store.check_name("image", str(body.get("name") or ""))
    dockerfile = body.get("dockerfile")
    if not isinstance(dockerfile, str) or not dockerfile.strip():
        raise ConfigError("the template build has no dockerfile")
    b = TemplateBuild("tbld_" + secrets.token_hex(8), name, dockerfile,
                      request.app.state.project)
    request.app.state.template_builds[b.id] = b
    return {"buildId": b.id, "snapshotId": "pending-" + b.id, "rootfsNodeKind": "base",
            "builder": {"image": default_image(), "command": "tl-rootfs-build",
                        "cpus": 1.0, "memoryMb": 1024, "diskMb": 8192}}


@router.post(_SCOPE + "/sandbox-template-builds/{bid}/complete",
             summary="Complete a template build: the template")
async def complete_build(org: str, proj: str, bid: str, request: Request):
    b = request.app.state.template_builds.get(bid)
    if b is None:
        return JSONResponse({"code": "not_found", "message": f"no template build {bid!r}"},
                            status_code=404)
    if b.result is None:
        raise ConfigError(f"template build {bid} has not finished",
                          hint="wait for tl-rootfs-build to exit 0 first")
    img = await asyncio.to_thread(store.lookup_image, b.name, project=b.project)
    return _template(img, dockerfile=b.dockerfile)


@router.post(_SCOPE + "/sandbox-templates", summary="Register a built template")
async def register_template(org: str, proj: str, request: Request):
    body = await request.json()
    name = str(body.get("name") or "")
    try:
        img = await asyncio.to_thread(store.lookup_image, name,
                                      project=request.app.state.project)
    except ImageNotFound:
        raise ConfigError(f"template {name!r} was not built here",
                          hint="build it with Image.build() against this server") from None
    return _template(img, dockerfile=str(body.get("dockerfile") or ""))


# ----------------------------------------------------------------------------- builder

def is_builder_start(body: wire.RunProcess) -> bool:
    return body.command == BUILDER_COMMAND


def _arg(args: list[str], flag: str) -> str:
    if flag in args and args.index(flag) + 1 < len(args):
        return args[args.index(flag) + 1]
    raise ConfigError(f"{BUILDER_COMMAND}: missing {flag}")


async def intercept(app, sb, body: wire.RunProcess) -> wire.RunProcess:
    """Turn the SDK's ``tl-rootfs-build`` start into a guest process that waits for the
    host-side build (started here) and reports it."""
    args = list(body.args or [])
    spec_path, meta_path = _arg(args, "--spec"), _arg(args, "--metadata-out")
    spec = json.loads(await sb.read_file(spec_path))
    b = app.state.template_builds.get(spec.get("buildId"))
    if b is None:
        raise ConfigError(f"unknown template build {spec.get('buildId')!r}",
                          hint="start the build with Image.build() against this server")
    done = f"{BUILD_DIR}/.localsbx-done"
    out = f"{BUILD_DIR}/.localsbx-log"
    await sb.run(["rm", "-f", done, out])
    task = asyncio.create_task(_build(sb, b, spec, meta_path, done, out))
    app.state.tasks.add(task)
    task.add_done_callback(app.state.tasks.discard)
    waiter = (f"while [ ! -e {shlex.quote(done)} ]; do sleep 0.3; done; "
              f"cat {shlex.quote(out)} 2>/dev/null; exit \"$(cat {shlex.quote(done)})\"")
    return body.model_copy(update={"command": "/bin/sh", "args": ["-c", waiter]})


async def _build(sb, b: TemplateBuild, spec: dict, meta_path: str, done: str,
                 out: str) -> None:
    from localsbx.build.builder import build_image_async
    from localsbx.definition.loader import load_definition

    lines: list[str] = []

    class Rep:
        def say(self, text: str) -> None:
            lines.append(text)

        def output(self, chunk: bytes) -> None:
            lines.append(chunk.decode(errors="replace").rstrip("\n"))

    status = 1
    try:
        with tempfile.TemporaryDirectory(prefix="localsbx-tbuild-") as tmp:
            ctx = Path(tmp) / "context"
            await sb.download(spec.get("contextDir") or f"{BUILD_DIR}/context", ctx)
            df = Path(tmp) / "Dockerfile"
            df.write_text(b.dockerfile)
            defn = await asyncio.to_thread(load_definition, df, name=b.name)
            img = await build_image_async(defn, context_dir=ctx, name=b.name,
                                          project=b.project, reporter=Rep())
        rec = wire.image_record(img.name, img.digest, created_at=img.meta.created_at)
        meta = {"buildId": b.id, "snapshot_id": rec["snapshot_id"],
                "snapshot_uri": "snapshot://" + rec["snapshot_id"],
                "snapshotUri": "snapshot://" + rec["snapshot_id"],
                "snapshot_format_version": "localsbx", "snapshot_size_bytes": 0,
                "rootfs_disk_bytes": int(spec.get("rootfsDiskBytes") or 0),
                "rootfs_format": "ext4", "imageSizeBytes": 0, "snapshotSizeBytes": 0}
        await sb.write_file(meta_path, json.dumps(meta).encode())
        b.result, status = meta, 0
    except LocalsbxError as exc:
        lines.append(f"error: {exc}")
    except Exception as exc:
        log.exception("template build %s crashed", b.id)
        lines.append(f"error: {type(exc).__name__}: {exc}")
    try:
        await sb.write_file(out, ("\n".join(lines) + "\n").encode())
        await sb.write_file(done, f"{status}\n".encode())
    except LocalsbxError as exc:
        log.warning("template build %s: cannot report to the builder sandbox: %s", b.id, exc)
