"""The main job on real QEMU: a Dockerfile with all five ops builds; sandboxes restored from
its snapshot see ENV, WORKDIR, COPY owners/modes and ADD extraction; they are independent."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from localsbx import Sandbox, store
from localsbx.definition.dockerfile import parse_dockerfile
from localsbx.definition.dsl import Image

from .conftest import IMAGES

pytestmark = pytest.mark.vm


def test_image_is_registered_with_its_config(main_image):
    rec = store.lookup_image(main_image)
    assert rec.env["APP_MODE"] == "test"
    assert rec.env["GREETING"] == "hello big world"
    assert rec.workdir == "/srv/app/sub"
    snap = rec.path / "snap"
    assert (snap / "state.mig").stat().st_size < 1024 * 1024  # device state only (method C)
    assert rec.meta.snapshot.memory_mib == 1024 and rec.meta.snapshot.cpus == 1


def test_env_workdir_copy_add_are_visible(shared_sandbox):
    sb = shared_sandbox
    r = sb.run('echo "$GREETING|$APP_MODE|$(pwd)"')
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "hello big world|test|/srv/app/sub\n"
    assert sb.run("cat /srv/app/built.txt").stdout == "built in /srv/app as root mode=test\n"
    assert sb.run("cat /tmp/build-pwd.txt").stdout == "/srv/app/sub\n"
    # COPY: byte-exact (CRLF kept), root-owned, relative dest resolved against WORKDIR
    assert sb.read_file("/srv/app/data.txt") == b"data line 1\r\ndata line 2\n"
    st = sb.run("stat -c '%u:%g %a' /srv/app/data.txt /opt/tools/bin/tool.sh /opt/tools /opt/tools/bin").stdout
    assert st.splitlines() == ["0:0 644", "1234:1234 750", "1234:1234 755", "1234:1234 755"]
    assert sb.run("/opt/tools/bin/tool.sh x").stdout == "tool-ok x\n"
    # ADD: local tar extracted, modes and symlinks kept
    assert sb.run("cat /opt/bundle/hello.txt").stdout == "hello-from-tar\n"
    assert sb.run("/opt/bundle/bin/run.sh").stdout == "tool-from-tar\n"
    assert sb.run("readlink /opt/bundle/link").stdout == "hello.txt\n"
    assert sb.run("test -e /opt/bundle.tar.gz").exit_code == 1


def test_shell_form_is_bin_sh_and_exec_form_has_no_shell(shared_sandbox):  # B18
    assert shared_sandbox.read_file("/tmp/b18.txt").decode().splitlines() == [
        "shell=/bin/sh", "runs-under-bin-sh", "exec-form:/bin/bash", "literal:$HOME"]


def test_build_background_process_did_not_survive(shared_sandbox):
    # the RUN started `sleep 300 &`; Docker ends a step's processes with the step
    assert shared_sandbox.run("pgrep -x sleep").exit_code == 1


def test_two_sandboxes_are_independent(main_image):
    with Sandbox.create(main_image) as a, Sandbox.create(main_image) as b:
        assert a.sandbox_id != b.sandbox_id
        a.write_file("/srv/app/only-in-a.txt", b"a")
        assert a.run("cat /srv/app/only-in-a.txt").stdout == "a"
        assert b.run("test -e /srv/app/only-in-a.txt").exit_code == 1
        ra = a.run("head -c 16 /dev/urandom | od -An -tx1").stdout
        rb = b.run("head -c 16 /dev/urandom | od -An -tx1").stdout
        assert ra != rb  # CRNG reseeded per clone


def test_dsl_and_dockerfile_give_the_same_image(main_image):
    import runpy

    dsl_img = runpy.run_path(str(IMAGES / "main" / "image.py"))["image"]
    assert isinstance(dsl_img, Image)
    from_dsl = dsl_img.to_definition()
    from_file = parse_dockerfile(IMAGES / "main" / "Dockerfile", name="t-main")
    assert from_dsl.ops == from_file.ops
    events: list[dict] = []
    rec = dsl_img.build(context_dir=str(IMAGES / "main"), emit=events.append)
    assert rec.digest == store.lookup_image(main_image).digest  # same build, reused
    assert events[-1] == {"type": "image_registered", "image_id": rec.digest,
                          "name": "t-main-dsl", "snapshot_id": rec.digest}
    assert all(e["type"] == "status" for e in events[:-1]) and len(events) > 1
    with Sandbox.create("t-main-dsl") as sb:
        assert sb.run('echo "$GREETING|$(pwd)"').stdout == "hello big world|/srv/app/sub\n"


def test_cli_new_exec_ls_terminate(main_image, tmp_path):
    lsbx = [str(Path(sys.executable).with_name("localsbx"))]
    sid = subprocess.run([*lsbx, "new", "--image", main_image, "--timeout", "120"],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        assert len(sid) == 12 and sid.isalnum()
        ls = subprocess.run([*lsbx, "ls", "--json"], capture_output=True, text=True, check=True)
        assert sid in ls.stdout
        r = subprocess.run([*lsbx, "exec", sid, "--", "sh", "-c", "echo out; echo err >&2; exit 7"],
                           capture_output=True, text=True)
        assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
        r = subprocess.run([*lsbx, "exec", sid, "--", "sh", "-c", "kill -TERM $$"],
                           capture_output=True, text=True)
        assert r.returncode == 143
        d = subprocess.run([*lsbx, "describe", sid], capture_output=True, text=True, check=True)
        assert '"image": "t-main"' in d.stdout
        src = tmp_path / "in.bin"
        src.write_bytes(bytes(range(256)) * 4)
        subprocess.run([*lsbx, "cp", str(src), f"{sid}:/tmp/in.bin"], check=True)
        subprocess.run([*lsbx, "cp", f"{sid}:/tmp/in.bin", str(tmp_path / "out.bin")], check=True)
        assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
        r = subprocess.run([*lsbx, "cp", str(src), str(tmp_path / "x")], capture_output=True,
                           text=True)
        assert r.returncode == 1 and "ID:/" in r.stderr
    finally:
        subprocess.run([*lsbx, "terminate", sid], capture_output=True)
    ls = subprocess.run([*lsbx, "ls", "--json"], capture_output=True, text=True, check=True)
    assert sid not in ls.stdout
    r = subprocess.run([*lsbx, "exec", sid, "--", "true"], capture_output=True, text=True)
    assert r.returncode == 1 and "no sandbox" in r.stderr


def test_detached_sandbox_stops_at_its_timeout(main_image):
    from .conftest import qemu_pids

    exe = str(Path(sys.executable).with_name("localsbx"))
    sid = subprocess.run([exe, "new", "--image", main_image, "--timeout", "4"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert qemu_pids(sid)
    deadline = time.monotonic() + 30
    while qemu_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not qemu_pids(sid)
    ls = subprocess.run([exe, "ls", "--json"], capture_output=True, text=True, check=True)
    assert sid not in ls.stdout
    assert not store.sandbox_dir(sid).exists()
