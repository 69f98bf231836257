"""The real ``tensorlake`` SDK (from PyPI, pinned in the dev extras) against ``localsbx
serve``: one server per test session, started as a subprocess on a free port, the way a
user runs it. The SDK reads its environment at import time, so it is set here, before any
test module imports ``tensorlake``. No part of the SDK is mocked or patched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

API_KEY = "localsbx-test-key"
NAMESPACE = os.environ.get("LOCALSBX_PROJECT", "pytest-localsbx")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()
URL = f"http://127.0.0.1:{PORT}"
os.environ["TENSORLAKE_API_URL"] = URL
os.environ["TENSORLAKE_API_KEY"] = API_KEY
os.environ["INDEXIFY_NAMESPACE"] = NAMESPACE
for var in ("TENSORLAKE_SANDBOX_API_URL", "TENSORLAKE_SANDBOX_PROXY_URL",
            "TENSORLAKE_IMAGE_SERVICE_URL"):
    os.environ.pop(var, None)


@pytest.fixture(scope="session")
def server(base_ready, tmp_path_factory) -> str:
    """``localsbx serve --api-key …`` on :data:`PORT`; its log is printed if it dies."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "localsbx.cli", "--debug", "serve", "--port", str(PORT),
             "--api-key", API_KEY, "--project", NAMESPACE],
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{URL}/openapi.json", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"localsbx serve did not start:\n{Path(log).read_text()[-3000:]}")
            time.sleep(0.2)
    yield URL
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    if os.environ.get("LOCALSBX_SERVE_LOG"):
        sys.stderr.write(Path(log).read_text())


@pytest.fixture(scope="session")
def image(server) -> str:
    """The image the SDK tests start sandboxes from: the debian-minimal base, built into
    an image once (as Tensorlake starts sandboxes from its bases)."""
    return "debian-minimal"
