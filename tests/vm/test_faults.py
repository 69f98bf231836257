"""Issue 10: faults and bad input, on real QEMU. Each test asserts what a user needs: a clear
error naming the cause within a bound, previous content intact, nothing left behind."""

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localsbx import Sandbox

pytestmark = pytest.mark.vm

CLI = [str(Path(sys.executable).parent / "localsbx")]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.fixture(scope="module")
def sb(base_ready):
    with Sandbox.create("debian-minimal") as box:
        yield box


def test_interrupted_cp_keeps_the_previous_file(sb, tmp_path):  # item 4
    old = b"previous content\n" * 1000
    sb.write_file("/tmp/target.bin", old)
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(1 << 20))
    cp = subprocess.Popen([*CLI, "cp", str(big), f"{sb.sandbox_id}:/tmp/target.bin"])
    try:
        # wait until the agent is writing its temp file, then kill the client
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ls = sb.run("ls -a /tmp").stdout
            if ".localsbx-put." in ls or cp.poll() is not None:
                break
            time.sleep(0.2)
        assert cp.poll() is None, "the copy finished before it could be interrupted"
        cp.send_signal(signal.SIGKILL)
        cp.wait(timeout=10)
    finally:
        if cp.poll() is None:
            cp.kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and ".localsbx-put." in sb.run("ls -a /tmp").stdout:
        time.sleep(0.5)
    assert ".localsbx-put." not in sb.run("ls -a /tmp").stdout  # no temp file left
    assert sb.read_file("/tmp/target.bin") == old
    # the sandbox still works, and a full copy still goes through
    small = tmp_path / "small"
    small.write_bytes(b"new\n")
    subprocess.run([*CLI, "cp", str(small), f"{sb.sandbox_id}:/tmp/target.bin"], check=True,
                   timeout=120)
    assert sb.read_file("/tmp/target.bin") == b"new\n"


def test_interrupted_write_file_keeps_the_previous_file(sb):  # item 4, library
    import asyncio

    from localsbx import AsyncSandbox

    sb.write_file("/tmp/w.bin", b"old")

    async def go():
        a = await AsyncSandbox.connect(sb.sandbox_id)
        task = asyncio.create_task(a.write_file("/tmp/w.bin", os.urandom(64 << 20)))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if ".localsbx-put." in (await a.run("ls -a /tmp")).stdout or task.done():
                break
            await asyncio.sleep(0.2)
        assert not task.done()
        task.cancel()  # the connection to the supervisor goes away mid-transfer
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    time.sleep(1)
    assert sb.read_file("/tmp/w.bin") == b"old"
    assert ".localsbx-put." not in sb.run("ls -a /tmp").stdout


def _first_line_then_exit(target: str) -> tuple[float, bytes, int]:
    """``(echo first; sleep 25) | localsbx exec -i TARGET -- head -1``: seconds to the
    answer, the answer, the exit code (the CLI must exit while its stdin is still open)."""
    t = time.monotonic()
    p = subprocess.Popen([*CLI, "exec", "-i", target, "--", "head", "-1"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        p.stdin.write(b"first\n")
        p.stdin.flush()
        rc = p.wait(timeout=60)  # stdin stays open all along
        return time.monotonic() - t, p.stdout.read(), rc
    finally:
        p.kill()
        p.stdin.close()


def test_exec_i_streams_stdin(sb):  # item 5
    took, out, rc = _first_line_then_exit(sb.sandbox_id)
    assert out == b"first\n" and rc == 0
    assert took < 20, f"answered after {took:.1f} s: stdin was read to its end first"
    # the full CLI (a name, not an id, skips the fast path) streams as well
    sb.update(name="faults-stream")
    took, out, rc = _first_line_then_exit("faults-stream")
    assert out == b"first\n" and rc == 0 and took < 30


def test_exec_i_from_an_endless_producer_stays_bounded(sb):  # item 5
    sup_pid = int(sb.describe()["supervisor_pid"]) if "supervisor_pid" in sb.describe() else None
    before = _rss_kib(sup_pid) if sup_pid else 0
    t = time.monotonic()
    out = subprocess.run(["bash", "-c", f"yes | {CLI[0]} exec -i {sb.sandbox_id} -- head -1"],
                         capture_output=True, timeout=60)
    assert out.stdout == b"y\n" and out.returncode == 0, out.stderr
    assert time.monotonic() - t < 30
    # a whole stream still arrives complete, then EOF
    out = subprocess.run(["bash", "-c", f"head -c 3000000 /dev/zero | {CLI[0]} exec -i "
                          f"{sb.sandbox_id} -- wc -c"], capture_output=True, timeout=120)
    assert out.stdout.strip() == b"3000000", out.stderr
    if sup_pid:
        assert _rss_kib(sup_pid) - before < 64 * 1024


def _build_fails(tmp_path, name: str, body: str, bound: float):
    """Build ``FROM debian-minimal`` + ``body``; return the ImageBuildError, checking the
    bound, that no QEMU of this build is left and that nothing was registered."""
    from localsbx import paths, store
    from localsbx.errors import ImageBuildError, ImageNotFound

    from .conftest import build, qemu_pids

    with contextlib.suppress(ImageNotFound):  # left by an earlier run
        store.remove_image(name)
    (tmp_path / "Dockerfile").write_text("FROM debian-minimal\n" + body)
    t = time.monotonic()
    with pytest.raises(ImageBuildError) as ei:
        build(tmp_path / "Dockerfile", name, force=True)
    took = time.monotonic() - t
    assert took < bound, f"the failure took {took:.0f} s"
    assert not qemu_pids(f"localsbx-build-{name}")
    with pytest.raises(ImageNotFound):
        store.lookup_image(name)
    assert not list((paths.data_dir() / "images").glob(".tmp-*"))
    return ei.value


def test_kernel_panic_in_run_ends_the_step_at_once(base_ready, tmp_path):  # item 7
    exc = _build_fails(tmp_path, "faults-panic",
                       "RUN echo before-the-panic && sleep 2 && echo c > /proc/sysrq-trigger\n", 180)
    assert "line 2" in exc.step and "RUN" in exc.step
    assert "before-the-panic" in exc.output_tail  # the step's output so far
    assert "build VM console" in exc.output_tail and "Kernel panic" in exc.output_tail
    assert "LOCALSBX_STEP_TIMEOUT" not in (exc.hint or "")


def test_run_that_kills_everything_names_the_step(base_ready, tmp_path):  # item 7 (Poor)
    exc = _build_fails(tmp_path, "faults-kill-all",
                       "RUN echo ok\nRUN echo partial-output; sleep 1; kill -9 -1; sleep 30\n",
                       240)
    assert "line 3" in exc.step
    assert "partial-output" in exc.output_tail and "build VM console" in exc.output_tail
    assert "stopped or the connection" in exc.message


def test_run_that_powers_off_names_the_step(base_ready, tmp_path):  # item 7 (Poor)
    exc = _build_fails(tmp_path, "faults-poweroff",
                       "RUN echo going-down; sync; echo o > /proc/sysrq-trigger\n", 180)
    assert "line 2" in exc.step and "going-down" in exc.output_tail


def test_fork_bomb_still_hits_the_step_timeout(base_ready, tmp_path, monkeypatch):  # item 8
    monkeypatch.setenv("LOCALSBX_STEP_TIMEOUT", "20")
    exc = _build_fails(tmp_path, "faults-bomb",
                       "RUN bomb() { bomb | bomb & }; bomb; sleep 60\n", 20 + 150)
    assert "line 2" in exc.step


def test_bad_step_timeout_is_refused_before_any_vm(base_ready, tmp_path, monkeypatch):
    from localsbx.errors import ConfigError

    from .conftest import build, qemu_pids

    monkeypatch.setenv("LOCALSBX_STEP_TIMEOUT", "abc")
    (tmp_path / "Dockerfile").write_text("FROM debian-minimal\nRUN true\n")
    before = qemu_pids()
    t = time.monotonic()
    with pytest.raises(ConfigError, match="LOCALSBX_STEP_TIMEOUT"):
        build(tmp_path / "Dockerfile", "faults-bad-timeout", force=True)
    assert time.monotonic() - t < 5 and qemu_pids() <= before


@pytest.fixture(scope="module")
def snap_image(base_ready, tmp_path_factory):
    from .conftest import build

    d = tmp_path_factory.mktemp("snapimg")
    (d / "Dockerfile").write_text("FROM debian-minimal\nARG TOKEN=s3cr3t-value\n"
                                  "RUN echo \"snap $TOKEN\" | wc -c > /snap.txt\n")
    build(d / "Dockerfile", "faults-snap")
    return d / "Dockerfile"


def test_image_store_is_private_and_keeps_no_build_secret(snap_image):  # store modes
    from localsbx import paths, store

    rec = store.lookup_image("faults-snap")
    assert stat.S_IMODE(paths.data_dir().stat().st_mode) == 0o700
    for p in [rec.path, *rec.path.rglob("*")]:
        assert p.is_symlink() or p.stat().st_mode & 0o077 == 0, f"{p} is readable by others"
    assert "s3cr3t-value" not in (rec.path / "image.json").read_text()


def test_damaged_snapshot_files_are_named_before_any_qemu(snap_image):  # store damage
    from localsbx import store
    from localsbx.errors import SnapshotError

    from .conftest import qemu_pids

    rec = store.lookup_image("faults-snap")
    state = rec.path / "snap" / "state.mig"
    good = state.read_bytes()
    before = qemu_pids()
    try:
        os.chmod(state, 0o600)
        state.write_bytes(os.urandom(len(good)))  # same size: only the digest tells
        t = time.monotonic()
        with pytest.raises(SnapshotError, match="state.mig is damaged"):
            Sandbox.create("faults-snap")
        assert time.monotonic() - t < 15 and qemu_pids() <= before
    finally:
        state.write_bytes(good)
        os.chmod(state, 0o400)
    with Sandbox.create("faults-snap") as box:  # intact again: restores
        assert box.run("cat /snap.txt").stdout.strip() == "18"


def test_rebuild_does_not_reuse_a_build_whose_ram_file_is_gone(snap_image):  # store damage
    from localsbx import store
    from localsbx.build.builder import Reporter
    from localsbx.errors import SnapshotError

    from .conftest import build

    rec = store.lookup_image("faults-snap")
    (rec.path / "snap" / "ram").unlink()
    with pytest.raises(SnapshotError, match="ram is missing"):
        Sandbox.create("faults-snap")
    said = []
    rep = Reporter()
    rep.say = said.append
    build(snap_image, "faults-snap", reporter=rep)
    assert any("building again" in s for s in said) and not any("reusing" in s for s in said)
    with Sandbox.create("faults-snap") as box:
        assert box.run("cat /snap.txt").exit_code == 0


def test_cp_copies_absolute_symlinks_as_links(sb, tmp_path):  # cp
    sb.run("mkdir -p /tmp/tree/sub && echo x > /tmp/tree/sub/f && ln -s /etc/hostname "
           "/tmp/tree/abs && ln -s sub/f /tmp/tree/rel && ln -s /nowhere /tmp/tree/dangling")
    res = subprocess.run([*CLI, "cp", f"{sb.sandbox_id}:/tmp/tree", str(tmp_path / "tree")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert os.readlink(tmp_path / "tree" / "abs") == "/etc/hostname"
    assert os.readlink(tmp_path / "tree" / "rel") == "sub/f"
    assert os.readlink(tmp_path / "tree" / "dangling") == "/nowhere"
    assert (tmp_path / "tree" / "sub" / "f").read_text() == "x\n"
    res = subprocess.run([*CLI, "cp", f"{sb.sandbox_id}:/etc", str(tmp_path / "etc")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr


def test_cp_to_a_missing_host_folder_is_a_clear_error(sb, tmp_path):  # cp
    res = subprocess.run([*CLI, "cp", f"{sb.sandbox_id}:/etc/hostname",
                          str(tmp_path / "no" / "such" / "x")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr
    res = subprocess.run([*CLI, "cp", str(tmp_path / "missing"), f"{sb.sandbox_id}:/tmp/x"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "no such file" in res.stderr and "Traceback" not in res.stderr


def test_exec_it_with_piped_stdin_is_refused_clearly(sb):  # options
    res = subprocess.run([*CLI, "exec", "-it", sb.sandbox_id, "--", "true"], input=b"x",
                         capture_output=True, timeout=60)
    assert res.returncode != 0 and b"not a terminal" in res.stderr  # as docker exec -it
