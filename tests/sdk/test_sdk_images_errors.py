"""The real Tensorlake SDK's image calls (``Image.build()`` on the CAS flow, the image
catalog) and the SDK error classes localsbx serve can cause, plus ``AsyncSandbox``."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest
from tensorlake.image import Image
from tensorlake.image.sandbox_builder import (
    SandboxImageDeleteError,
    delete_sandbox_image,
    find_sandbox_image_by_name,
    list_sandbox_images,
)
from tensorlake.sandbox import AsyncSandbox, Sandbox
from tensorlake.sandbox.exceptions import RemoteAPIError, SandboxError, SandboxNotFoundError

from localsbx import store
from localsbx.errors import ImageNotFound

pytestmark = pytest.mark.vm


def test_image_build_then_sandbox_from_it_then_catalog(image, tmp_path, monkeypatch):
    (tmp_path / "hello.txt").write_text("copied from the context\n")
    img = (Image(name="sdk-built", base_image=image)
           .run("echo built > /built.txt")
           .env("GREETING", "hello from ENV")
           .copy("hello.txt", "/opt/hello.txt")
           .workdir("/opt"))
    res = img.build(context_dir=str(tmp_path))
    assert res["name"] == "sdk-built" and res["snapshotId"]
    # registered in localsbx's own store
    assert store.lookup_image("sdk-built").name == "sdk-built"
    sb = Sandbox.create(image="sdk-built")
    try:
        r = sb.run("sh", ["-c", 'cat /built.txt hello.txt; echo "$GREETING"; pwd'])
        assert r.stdout == "built\ncopied from the context\nhello from ENV\n/opt"
    finally:
        sb.terminate()
    names = {i["name"] for i in list_sandbox_images()}
    assert "sdk-built" in names
    found = find_sandbox_image_by_name("sdk-built")
    assert found is not None and found["name"] == "sdk-built"
    delete_sandbox_image("sdk-built")
    assert find_sandbox_image_by_name("sdk-built") is None
    with pytest.raises(SandboxImageDeleteError) as exc:
        delete_sandbox_image("sdk-built")
    assert "sdk-built" in str(exc.value)


def test_a_failed_build_raises_with_the_step_message(image):
    from tensorlake.image.builds import ImageBuildFailedError

    img = Image(name="sdk-broken", base_image=image).run("echo about to fail; exit 7")
    with pytest.raises(ImageBuildFailedError) as exc:
        img.build()
    assert "exit 7" in str(exc.value) or "status 7" in str(exc.value)
    with pytest.raises(ImageNotFound):
        store.lookup_image("sdk-broken")


# ----------------------------------------------------------------------------- errors

def test_unknown_sandbox_is_sandbox_not_found(server):
    with pytest.raises(SandboxNotFoundError):
        Sandbox.connect("zzzzzzzzzzzz")
    with pytest.raises(SandboxNotFoundError):
        Sandbox.connect("no-such-name")


def test_a_taken_name_is_a_409_with_the_sdk_code(image):
    sb = Sandbox.create(image=image, name="sdk-dup")
    try:
        with pytest.raises(RemoteAPIError) as exc:
            Sandbox.create(image=image, name="sdk-dup")
        assert exc.value.status_code == 409 and exc.value.code == "sandbox_name_taken"
        assert "sdk-dup" in str(exc.value)
    finally:
        sb.terminate()


def test_bad_requests_are_remote_api_errors_with_words(image):
    with pytest.raises(RemoteAPIError) as exc:
        Sandbox.create(image=image, allow_out=["10.0.0.1/8"])  # host bits set
    assert exc.value.status_code == 400 and "allow_out" in str(exc.value)
    with pytest.raises(RemoteAPIError) as exc:
        Sandbox.create(image="no-such-image")
    assert exc.value.status_code == 404 and "no-such-image" in str(exc.value)
    with pytest.raises(RemoteAPIError) as exc:
        Sandbox.create(image=image, memory_mb=0)
    assert exc.value.status_code == 400


def test_a_wrong_api_key_is_refused(image):
    with pytest.raises(RemoteAPIError) as exc:
        Sandbox.create(image=image, api_key="wrong")
    assert exc.value.status_code == 401
    with pytest.raises(RemoteAPIError):
        list(Sandbox.list(api_key="wrong"))


def test_a_terminated_sandbox_refuses_commands(image):
    sb = Sandbox.create(image=image)
    sb.terminate()
    with pytest.raises(SandboxError):
        sb.run("true")


def test_openapi_document_lists_the_three_surfaces(server):
    doc = json.loads(urllib.request.urlopen(f"{server}/openapi.json").read())
    paths = doc["paths"]
    assert "/v1/namespaces/{ns}/sandboxes" in paths
    assert "/api/v1/processes/run" in paths
    assert "/images/v4/builds" in paths


# ----------------------------------------------------------------------------- async

async def test_async_sandbox_create_run_files_terminate(image, server):
    sb = await AsyncSandbox.create(image=image)
    try:
        r = await sb.run("sh", ["-c", "echo async; exit 4"])
        assert (r.exit_code, r.stdout) == (4, "async")
        await sb.write_file("/tmp/x", os.urandom(4096) + b"end")
        assert (await sb.read_file("/tmp/x")).value.endswith(b"end")
        p = await sb.start_process("sh", ["-c", "echo bg"])
        assert [e.line for e in await sb.follow_stdout(p.pid)] == ["bg"]
        assert (await AsyncSandbox.connect(sb.sandbox_id)).sandbox_id == sb.sandbox_id
        snap = await sb.checkpoint()
        clone = await AsyncSandbox.create(snapshot_id=snap.snapshot_id)
        try:
            assert (await clone.read_file("/tmp/x")).value.endswith(b"end")
        finally:
            await clone.terminate()
        assert snap.snapshot_id in {s.snapshot_id for s in await sb.list_snapshots()}
        from tensorlake.sandbox import AsyncSandboxClient

        client = AsyncSandboxClient.for_localhost(api_url=server, namespace=os.environ["INDEXIFY_NAMESPACE"])
        await client.delete_snapshot(snap.snapshot_id)
        await sb.suspend()
        await sb.resume()
        assert (await sb.run("cat", ["/tmp/x"])).exit_code == 0
    finally:
        await sb.terminate()


def test_a_create_that_fails_after_answering_is_a_sandbox_error(server):
    pending = Sandbox.create(image="no-such-image-either", wait=False)
    with pytest.raises(SandboxError) as exc:
        pending.ready(timeout=60, poll_interval=0.5)
    assert "no-such-image-either" in str(exc.value)
    assert not isinstance(exc.value, SandboxNotFoundError)


def test_the_guest_cannot_reach_the_server(image, server):
    port = server.rsplit(":", 1)[1]
    sb = Sandbox.create(image=image)
    try:
        probe = ("import socket,sys\n"
                 "for h in ('10.0.2.2','10.0.2.3','127.0.0.1'):\n"
                 "    s=socket.socket(); s.settimeout(3)\n"
                 f"    try: s.connect((h,{port})); print('reached',h)\n"
                 "    except OSError as e: print('refused',h)\n")
        r = sb.run("python3", ["-c", probe])
        assert r.exit_code == 0, r.stderr
        assert "reached" not in r.stdout and r.stdout.count("refused") == 3
    finally:
        sb.terminate()


def test_a_pending_sandbox_observed_at_once_is_sandbox_pending(image):
    from tensorlake.sandbox.exceptions import SandboxPending

    pending = Sandbox.create(image=image, wait=False)
    try:
        with pytest.raises(SandboxPending) as exc:
            pending.ready(timeout=0)
        assert exc.value.sandbox_id == pending.sandbox_id
        sb = pending.ready(timeout=180, poll_interval=0.5)
        assert sb.run("true").exit_code == 0
    finally:
        Sandbox.connect(pending.sandbox_id).terminate()


def test_a_second_build_of_the_same_name_is_image_build_in_progress(image):
    from tensorlake.image.builds import ImageBuildInProgressError, start_build, wait_build

    first = start_build(Image(name="sdk-slow", base_image=image).run("sleep 20"))
    try:
        with pytest.raises(ImageBuildInProgressError) as exc:
            start_build(Image(name="sdk-slow", base_image=image).run("true"))
        assert exc.value.active_build_id
    finally:
        assert wait_build(first.build_id)["name"] == "sdk-slow"
    store.remove_image("sdk-slow")
