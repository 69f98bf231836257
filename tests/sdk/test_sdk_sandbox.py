"""The real Tensorlake Python SDK drives localsbx sandboxes through ``localsbx serve``:
lifecycle, commands, files, processes, PTY, checkpoints, suspend/resume, ports. Each test
uses the SDK exactly as a user's code would (no mock, no patch)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from tensorlake.sandbox import Sandbox
from tensorlake.sandbox.exceptions import RemoteAPIError, SandboxNotFoundError

from localsbx import store

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def sbx(image):
    sb = Sandbox.create(image=image, timeout_secs=1800)
    yield sb
    sb.terminate()


# ----------------------------------------------------------------------------- commands

def test_run_reports_exit_codes_stdout_and_stderr(sbx):
    r = sbx.run("sh", ["-c", "echo out; echo err >&2; echo two; exit 3"])
    assert (r.exit_code, r.stdout, r.stderr, r.reason.value) == (3, "out\ntwo", "err", "exited")
    assert sbx.run("true").exit_code == 0


def test_run_env_working_dir_and_user(sbx):
    r = sbx.run("sh", ["-c", 'echo "$GREETING $(pwd) $(id -u)"'], env={"GREETING": "hi"},
                working_dir="/tmp")
    assert r.stdout == "hi /tmp 0"
    r = sbx.run("id", ["-u"], user="nobody")
    assert r.exit_code == 0 and r.stdout == "65534"


def test_run_signal_and_timeout(sbx):
    r = sbx.run("sh", ["-c", "kill -TERM $$"])
    assert (r.exit_code, r.reason.value) == (-15, "signaled")
    t = time.monotonic()
    r = sbx.run("sh", ["-c", "sleep 30; echo late"], timeout=1.5)
    assert r.timed_out and r.exit_code == -9 and "late" not in r.stdout
    assert time.monotonic() - t < 20


def test_run_of_a_missing_program_fails_in_the_sandbox(sbx):
    r = sbx.run("/no/such/program")
    assert r.exit_code != 0


# ----------------------------------------------------------------------------- files

def test_files_write_read_list_delete(sbx):
    sbx.write_file("/tmp/sdk/a.txt", b"hello\x00world")
    assert sbx.read_file("/tmp/sdk/a.txt").value == b"hello\x00world"
    entries = {e.name: e for e in sbx.list_directory("/tmp/sdk").entries}
    assert entries["a.txt"].size == 11 and not entries["a.txt"].is_dir
    sbx.delete_file("/tmp/sdk/a.txt")
    assert "a.txt" not in {e.name for e in sbx.list_directory("/tmp/sdk").entries}
    with pytest.raises(RemoteAPIError) as exc:
        sbx.read_file("/tmp/sdk/a.txt")
    assert exc.value.status_code == 404


def test_a_100_mib_file_round_trips(sbx):
    data = os.urandom(1 << 20) * 100
    sbx.write_file("/tmp/big.bin", data)
    r = sbx.run("sha256sum", ["/tmp/big.bin"])
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(sbx.read_file("/tmp/big.bin").value).digest() == hashlib.sha256(data).digest()
    sbx.delete_file("/tmp/big.bin")


# ----------------------------------------------------------------------------- processes

def test_processes_start_stdin_output_follow_list_get(sbx):
    p = sbx.start_process("sh", ["-c", "while read l; do echo got:$l; done; echo bye >&2"],
                          stdin_mode="pipe")
    assert p.status.value == "running" and p.pid > 0
    sbx.write_stdin(p.pid, b"one\ntwo\n")
    sbx.close_stdin(p.pid)
    events = list(sbx.follow_output(p.pid))
    assert [e.line for e in events if e.stream == "stdout"] == ["got:one", "got:two"]
    assert [e.line for e in events if e.stream == "stderr"] == ["bye"]
    assert sbx.get_stdout(p.pid).lines == ["got:one", "got:two"]
    assert sbx.get_stderr(p.pid).lines == ["bye"]
    info = sbx.get_process(p.pid)
    assert info.status.value == "exited" and info.exit_code == 0
    assert p.pid in {x.pid for x in sbx.list_processes()}


def test_processes_signal_and_kill(sbx):
    p = sbx.start_process("sleep", ["300"])
    q = sbx.start_process("sleep", ["300"])
    assert sbx.send_signal(p.pid, 15).success
    deadline = time.monotonic() + 20
    while sbx.get_process(p.pid).status.value == "running" and time.monotonic() < deadline:
        time.sleep(0.3)
    info = sbx.get_process(p.pid)
    assert info.status.value == "signaled" and info.signal == 15
    sbx.kill_process(q.pid)
    deadline = time.monotonic() + 20
    while sbx.get_process(q.pid).status.value == "running" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert sbx.get_process(q.pid).signal == 9


def test_pty_session_echoes_and_passes_the_exit_code(sbx):
    got = bytearray()
    pty = sbx.create_pty("sh", rows=30, cols=100, on_data=got.extend)
    pty.send_input("stty size; echo $((6*7))\n")
    deadline = time.monotonic() + 30
    while b"42\r\n" not in got and time.monotonic() < deadline:
        time.sleep(0.1)
    pty.resize(120, 40)
    pty.send_input("stty size; exit 3\n")
    assert pty.wait(timeout=30) == 3
    text = got.decode(errors="replace")
    assert "42" in text and "30 100" in text and "40 120" in text


# ----------------------------------------------------------------------------- lifecycle

def test_create_without_waiting_then_connect_by_id_and_name(image):
    pending = Sandbox.create(image=image, name="sdk-pending", wait=False)
    assert pending.sandbox_id
    sb = pending.ready(timeout=180, poll_interval=0.5)
    try:
        assert sb.run("echo", ["ok"]).stdout == "ok"
        by_id = Sandbox.connect(sb.sandbox_id)
        by_name = Sandbox.connect("sdk-pending")
        assert by_id.sandbox_id == by_name.sandbox_id == sb.sandbox_id
        listed = {i.sandbox_id: i for i in Sandbox.list()}
        assert listed[sb.sandbox_id].status.value == "running"
        assert listed[sb.sandbox_id].name == "sdk-pending"
        # the same store: localsbx sees what the SDK made
        assert store.read_sandbox(sb.sandbox_id).name == "sdk-pending"
        sb.update(name="sdk-renamed")
        assert Sandbox.connect("sdk-renamed").sandbox_id == sb.sandbox_id
        assert store.read_sandbox(sb.sandbox_id).name == "sdk-renamed"
    finally:
        sb.terminate()
    with pytest.raises(SandboxNotFoundError):
        Sandbox.connect(sb.sandbox_id)
    assert sb.sandbox_id not in {i.sandbox_id for i in Sandbox.list()}


def test_a_sandbox_made_by_the_cli_is_driven_by_the_sdk(image):
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-m", "localsbx.cli", "new", "--image", image,
                          "--name", "cli-made"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    sid = out.stdout.strip().splitlines()[-1]
    try:
        sb = Sandbox.connect("cli-made")
        assert sb.sandbox_id == sid
        assert sb.run("sh", ["-c", "echo $((2+3))"]).stdout == "5"
    finally:
        subprocess.run([sys.executable, "-m", "localsbx.cli", "terminate", sid], timeout=60)


def test_checkpoint_snapshots_and_restore(sbx):
    sbx.write_file("/root/state.txt", b"before checkpoint")
    snap = sbx.checkpoint()
    assert snap.status.value in ("completed", "local_ready")
    sid = snap.snapshot_id
    assert sid in {s.snapshot_id for s in sbx.list_snapshots()}
    info = Sandbox.get_snapshot(sid)
    assert info.sandbox_id == sbx.sandbox_id
    clone = Sandbox.create(snapshot_id=sid)
    try:
        assert clone.read_file("/root/state.txt").value == b"before checkpoint"
        assert clone.sandbox_id != sbx.sandbox_id
    finally:
        clone.terminate()
    Sandbox.delete_snapshot(sid)
    assert sid not in {s.snapshot_id for s in sbx.list_snapshots()}


def test_suspend_and_resume_keep_files_processes_and_a_grown_disk(image):
    sb = Sandbox.create(image=image, disk_mb=10240)
    try:
        assert sb.info().resources.disk_mb == 10240
        sb.write_file("/root/keep.txt", b"kept")
        p = sb.start_process("sleep", ["600"])
        sb.suspend()
        assert Sandbox.connect(sb.sandbox_id).status.value == "suspended"
        assert store.read_sandbox(sb.sandbox_id).state.value == "suspended"
        sb.resume()
        assert sb.status.value == "running"
        assert sb.read_file("/root/keep.txt").value == b"kept"
        assert sb.get_process(p.pid).status.value == "running"
        size = sb.run("sh", ["-c", "df -B1M --output=size / | tail -1"]).stdout.strip()
        assert int(size) >= 9700
    finally:
        sb.terminate()


def test_exposed_ports_reach_a_server_in_the_sandbox(image):
    sb = Sandbox.create(image=image, exposed_ports=[8080])
    try:
        sb.write_file("/srv/index.html", b"from the sandbox")
        sb.start_process("python3", ["-m", "http.server", "8080", "-d", "/srv"])
        assert 8080 in (sb.info().exposed_ports or [])
        host_port = store.read_sandbox(sb.sandbox_id).ports["8080"]
        body = None
        for _ in range(60):
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{host_port}/index.html",
                                              timeout=3).read()
                break
            except OSError:
                time.sleep(0.5)
        assert body == b"from the sandbox"
        with sb.create_tunnel(8080, local_port=0) as tun:  # the SDK's WebSocket tunnel
            got = urllib.request.urlopen(f"http://127.0.0.1:{tun.local_port}/index.html",
                                         timeout=10).read()
        assert got == b"from the sandbox"
        sb.update(exposed_ports=[])
        assert not store.read_sandbox(sb.sandbox_id).ports
    finally:
        sb.terminate()


def test_concurrent_runs_from_threads(sbx):
    errors, codes = [], []

    def worker(n: int) -> None:
        try:
            for i in range(5):
                r = sbx.run("sh", ["-c", f"echo {n}-{i}"])
                codes.append(r.stdout == f"{n}-{i}")
        except Exception as exc:  # noqa: BLE001 - collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(codes) == 20 and all(codes)


def test_egress_lists_are_enforced_and_reported(image):
    """``deny_out`` through the SDK's own parameter: the listed name is refused in the
    guest, DNS still answers, and ``info().network_policy`` reports the lists."""
    sb = Sandbox.create(image=image, deny_out=["pypi.org"], timeout_secs=300)
    try:
        pol = sb.info().network_policy
        assert (pol.allow_internet_access, pol.allow_out, pol.deny_out) == (True, [], ["pypi.org"])
        r = sb.run("python3", ["-c", "import socket, urllib.request\n"
                               "print(socket.gethostbyname('pypi.org'))\n"
                               "try:\n urllib.request.urlopen('https://pypi.org/simple/six/', "
                               "timeout=5); print('OPEN')\n"
                               "except Exception as e:\n print('REFUSED', e)"])
        assert r.exit_code == 0, r.stderr
        addr, verdict = r.stdout.splitlines()
        assert addr[0].isdigit() and verdict.startswith("REFUSED"), r.stdout
    finally:
        sb.terminate()
