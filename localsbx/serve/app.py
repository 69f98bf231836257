"""The ASGI application behind ``localsbx serve``: Tensorlake's HTTP API on one port, so
code written against the real ``tensorlake`` SDK runs unchanged against localsbx with
``TENSORLAKE_API_URL=http://127.0.0.1:8900``.

Three surfaces, one process (the SDK's localhost mode, ``notes/tensorlake-wire.md`` d.1):

- the lifecycle API ``/v1/namespaces/{ns}/…`` (:mod:`.lifecycle`); ``ns`` is a project,
- each sandbox's daemon API ``/api/v1/…`` named by ``Host: {id}.local`` (:mod:`.daemon`),
- the image API ``/images/v4/…`` and ``/platform/v1/sandbox-templates…`` (:mod:`.images`).

Errors are JSON ``{"code", "message"}`` with the status the SDK maps to its own classes:
404 → ``SandboxNotFoundError`` on sandbox calls, 409 ``sandbox_name_taken`` for a name in
use, 400 for a bad request (``RemoteAPIError``, whose text shows the message and hint).
With ``api_key`` set every request but the context upload (which carries its own token,
as Tensorlake's signed upload URLs do) needs ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import logging
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from localsbx import __version__, store
from localsbx import errors as E
from localsbx.serve import daemon, images, lifecycle, templates

log = logging.getLogger("localsbx.serve")

#: The port the SDK's ``SandboxClient.for_localhost()`` looks at.
DEFAULT_PORT = 8900

_STATUS: list[tuple[type[E.LocalsbxError], int, str]] = [
    (E.SandboxNotFound, 404, "sandbox_not_found"),
    (E.ImageNotFound, 404, "image_not_found"),
    (E.BaseImageError, 404, "image_not_found"),
    (E.NameConflict, 409, "sandbox_name_taken"),
    (E.SandboxStateError, 409, "sandbox_state_conflict"),
    (E.DefinitionError, 400, "invalid_definition"),
    (E.ConfigError, 400, "invalid_request"),
    (E.SnapshotError, 409, "snapshot_error"),
    (E.GuestFileError, 400, "file_error"),
    (E.CommandTimeout, 504, "timeout"),
    (E.VMLaunchError, 503, "sandbox_start_failed"),
]


#: Paths readable without the API key: the API's own description.
_OPEN = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


def error_status(exc: E.LocalsbxError) -> tuple[int, str]:
    """The HTTP status and error code a localsbx error is answered with."""
    for cls, status, code in _STATUS:
        if isinstance(exc, cls):
            return status, code
    return 500, "internal_error"


def create_app(*, api_key: str | None = None, project: str | None = None,
               debug: bool = False) -> FastAPI:
    """The ASGI app (FastAPI; its OpenAPI document is at ``/openapi.json``).

    :param api_key: when set, requests must carry it as a bearer token (401 otherwise).
    :param project: the project images are built into and looked up in (default: the
        current one, ``$LOCALSBX_PROJECT`` or ``default``); sandboxes use their namespace.
    :param debug: log every request (method, path, sandbox, status, milliseconds).
    """
    app = FastAPI(title="localsbx: Tensorlake's sandbox API, served locally",
                  version=__version__,
                  description="The lifecycle, sandbox daemon and image APIs the tensorlake "
                              "SDK calls, backed by local QEMU sandboxes.")
    app.state.pending = {}
    app.state.ptys = {}
    app.state.builds = {}
    app.state.build_keys = {}
    app.state.template_builds = {}
    app.state.tasks = set()
    app.state.api_key = api_key
    app.state.project = store.current_project(project)
    app.include_router(lifecycle.router)
    app.include_router(daemon.router)
    app.include_router(images.router)
    app.include_router(templates.router)

    @app.middleware("http")
    async def auth_and_log(request: Request, call_next):
        t = time.monotonic()
        path = request.url.path
        if api_key is not None and path not in _OPEN and not (
                path.startswith("/images/v4/builds/") and path.endswith("/context")
                and request.method == "PUT"):
            got = request.headers.get("authorization", "")
            if not secrets.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse({"code": "unauthorized",
                                     "message": "missing or wrong API key",
                                     "hint": "set TENSORLAKE_API_KEY to the key given to "
                                             "`localsbx serve --api-key`"}, status_code=401)
        response = await call_next(request)
        if debug:
            log.info("%s %s host=%s -> %s (%.0f ms)", request.method, path,
                     request.headers.get("host"), response.status_code,
                     (time.monotonic() - t) * 1000)
        return response

    @app.exception_handler(E.LocalsbxError)
    async def on_error(request: Request, exc: E.LocalsbxError):
        status, code = error_status(exc)
        if status >= 500:
            log.warning("%s %s failed: %s", request.method, request.url.path, exc)
        body = {"code": code, "message": exc.message}
        if exc.hint:
            body["hint"] = exc.hint
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def on_bad_body(request: Request, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
            f"{e.get('msg')}" for e in exc.errors())
        return JSONResponse({"code": "invalid_request",
                             "message": f"bad request body: {problems}"}, status_code=400)

    return app


def serve(host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, api_key: str | None = None,
          project: str | None = None, debug: bool = False) -> None:
    """Run the server until interrupted (uvicorn)."""
    import uvicorn

    app = create_app(api_key=api_key, project=project, debug=debug)
    logging.getLogger("sse_starlette").setLevel(logging.WARNING)  # it logs every chunk
    uvicorn.run(app, host=host, port=port, log_level="info" if debug else "warning",
                access_log=False, timeout_graceful_shutdown=5)
