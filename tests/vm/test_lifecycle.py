"""The control plane on real QEMU: any process drives any sandbox through its supervisor.

Each test starts sandboxes with the CLI or the library and drives them from *other*
processes (separate CLI invocations), as a user would: exec, expose, suspend/resume,
checkpoint and clones, names, timeouts that pause, SIGKILLs of creators, supervisors and
owners.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from localsbx import Sandbox, store
from localsbx.errors import ConfigError, SandboxNotFound, SandboxStateError

from .conftest import qemu_pids

pytestmark = pytest.mark.vm

LSBX = str(Path(sys.executable).parent / "localsbx")


def cli(*args: str, check: bool = True, timeout: float = 300, input: bytes | None = None):
    res = subprocess.run([LSBX, *args], capture_output=True, timeout=timeout, input=input)
    if check and res.returncode != 0:
        raise AssertionError(f"localsbx {' '.join(args)} -> {res.returncode}\n"
                             f"{res.stdout.decode()}\n{res.stderr.decode()}")
    return res


def out(*args: str, **kw) -> str:
    return cli(*args, **kw).stdout.decode().strip()


def describe(sid: str) -> dict:
    return json.loads(out("describe", sid))


def wait_until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


@pytest.fixture
def new_sandbox(main_image):
    made: list[str] = []

    def make(*args: str) -> str:
        sid = out("new", "--image", main_image, *args)
        made.append(sid)
        return sid

    yield make
    for sid in made:
        cli("terminate", sid, check=False)
    for sid in made:
        assert not qemu_pids(f"localsbx-{sid}"), f"QEMU of {sid} left running"


def test_exec_from_other_processes_and_an_exposed_server(new_sandbox):
    sid = new_sandbox("--expose", "8000")
    # a server started by one CLI process (detached in the guest) ...
    cli("exec", sid, "--", "sh", "-c",
        "echo served > /tmp/index.html; cd /tmp && "
        "(setsid python3 -m http.server 8000 >/dev/null 2>&1 &)")
    host_port = describe(sid)["ports"]["8000"]
    assert host_port > 0
    # ... reached from the host by another process
    body = wait_until(lambda: _get(f"http://127.0.0.1:{host_port}/index.html"), 30,
                      "the exposed server answers")
    assert body == b"served\n"
    # exit codes, stderr and stdin through the fast path
    res = cli("exec", sid, "--", "sh", "-c", "cat; echo oops >&2; exit 7", check=False,
              input=b"ignored without -i")
    assert res.returncode == 7 and res.stdout == b"" and res.stderr == b"oops\n"
    res = cli("exec", "-i", sid, "--", "sh", "-c", "tr a-z A-Z", input=b"piped\n")
    assert res.stdout == b"PIPED\n"
    res = cli("exec", sid, "--", "sh", "-c", "kill -TERM $$", check=False)
    assert res.returncode == 128 + signal.SIGTERM
    # expose and unexpose on a running sandbox, from yet another process
    cli("exec", sid, "--", "sh", "-c", "(setsid python3 -m http.server 8001 -d /tmp "
        ">/dev/null 2>&1 &)")
    p2 = int(out("expose", sid, "8001"))
    assert int(out("expose", sid, "8001")) == p2  # exposing again gives the same forward
    assert cli("expose", sid, "70000", check=False).returncode == 1
    assert wait_until(lambda: _get(f"http://127.0.0.1:{p2}/index.html"), 30, "8001 answers")
    cli("unexpose", sid, "8001")
    assert "8001" not in describe(sid)["ports"]
    assert _get(f"http://127.0.0.1:{p2}/index.html") is None


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read()
    except OSError:
        return None


def test_three_clones_of_a_memory_checkpoint_continue_its_process(new_sandbox):
    sid = new_sandbox()
    cli("exec", sid, "--", "sh", "-c",
        "(n=0; while :; do n=$((n+1)); echo $n > /tmp/counter; sleep 0.2; done) "
        ">/dev/null 2>&1 & echo $! > /tmp/counter.pid")
    sb = Sandbox.connect(sid)
    ticker = sb.start_process("sh", ["-c", "i=0; while :; do echo $i; i=$((i+1)); sleep 0.3; done"],
                              name="ticker")
    spawn = has_agent_spawn(sb)
    time.sleep(2)
    ck = out("checkpoint", sid)
    at_checkpoint = int(out("exec", sid, "--", "cat", "/tmp/counter"))
    assert ck in out("snapshot", "ls", sid)
    seen = []
    try:
        for _ in range(3):
            clone = new_sandbox_from(ck)
            try:
                probe = out("exec", clone, "--", "sh", "-c",
                            "a=$(cat /tmp/counter); sleep 1; b=$(cat /tmp/counter); "
                            "kill -0 $(cat /tmp/counter.pid) && echo alive; "
                            "echo $a $b; cat /etc/machine-id; hostname; "
                            "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; "
                            "cat /etc/hostname; awk '$1 == \"127.0.1.1\" {print $2}' /etc/hosts")
                lines = probe.splitlines()
                assert lines[0] == "alive"
                a, b = map(int, lines[1].split())
                assert a >= 1 and b > a  # the counter runs on in the clone
                assert abs(int(lines[5]) - time.time()) < 5  # the clock was stepped
                assert lines[3] == clone
                assert lines[6:] == [clone, clone]  # /etc/hostname, /etc/hosts
                seen.append((lines[2], lines[4]))
                # the managed process is listed in the clone, running, with its output
                # from before the checkpoint (its guest files are in the saved RAM)
                csb = Sandbox.connect(clone)
                [p] = [p for p in csb.list_processes() if p["name"] == "ticker"]
                assert (p["pid"], p["status"]) == (ticker["pid"], "running")
                if spawn:
                    def three(c=csb):
                        lines = c.get_output("ticker", "stdout")["lines"]
                        return len(lines) >= 3 and lines

                    got = wait_until(three, 30, "the clone's ticker output")
                    assert got[:3] == ["0", "1", "2"] and got == [str(i) for i in range(len(got))]
            finally:
                cli("terminate", clone)
        assert at_checkpoint >= 1
        assert len({m for m, _ in seen}) == 3, "machine-ids must differ"
        assert len({r for _, r in seen}) == 3, "random bytes must differ"
    finally:
        cli("snapshot", "rm", ck)
    assert ck not in out("snapshot", "ls")


def has_agent_spawn(sb: Sandbox) -> bool:
    """Whether the guest agent of this sandbox's image knows ``agent spawn`` (background
    processes in guest files); a store whose base predates it keeps the SSH-channel path."""
    return "unknown verb" not in sb.run("/usr/lib/localsbx/agent spawn 2>&1; true").stdout


def new_sandbox_from(ck: str) -> str:
    return out("new", "--snapshot", ck)


def test_suspend_in_one_process_resume_in_another_with_timeout_paused(new_sandbox):
    sid = new_sandbox("--timeout", "40", "--expose", "8000")
    cli("exec", sid, "--", "sh", "-c",
        "echo kept > /root/file; (while :; do date +%s >> /tmp/ticks; sleep 1; done) "
        ">/dev/null 2>&1 & echo $! > /tmp/ticker.pid")
    web = Sandbox.connect(sid).start_process("sleep 600", name="bg")
    before = describe(sid)
    cli("suspend", sid)
    d = describe(sid)
    assert d["status"] == "suspended" and d["qemu_pid"] is None
    assert not qemu_pids(f"localsbx-{sid}")  # no QEMU: no CPU, no RAM
    assert "suspended" in out("ls")
    left_at_suspend = d["time_left_secs"]
    time.sleep(12)
    assert describe(sid)["time_left_secs"] == pytest.approx(left_at_suspend, abs=0.5)
    res = cli("exec", sid, "--", "true", check=False)
    assert res.returncode != 0 and b"suspended" in res.stderr
    # as after a host reboot: the pids in the record now belong to other processes (PID 1,
    # with another start time), and no runtime file of the old supervisor is left
    store.update_sandbox(sid, supervisor_pid=1, supervisor_start=12345, qemu_pid=1,
                         qemu_start=12345)
    for f in Path("/tmp").glob(f"localsbx-*-{sid}.ctl"):
        f.unlink()
    cli("resume", sid)  # another process
    after = describe(sid)
    assert after["status"] == "running"
    # suspended time did not count: well above what 12 s of wall time would leave
    assert after["time_left_secs"] > before["time_left_secs"] - 10
    assert out("exec", sid, "--", "cat", "/root/file") == "kept"
    assert out("exec", sid, "--", "sh", "-c", "kill -0 $(cat /tmp/ticker.pid) && echo alive") \
        == "alive"
    assert after["ports"]["8000"] > 0
    # the background process is found again by the new supervisor, and can be killed
    sb = Sandbox.connect(sid)
    [bg] = [p for p in sb.list_processes() if p["name"] == "bg"]
    assert bg["pid"] == web["pid"] and bg["status"] == "running"
    killed = sb.kill_process("bg")
    if has_agent_spawn(sb):
        # its exit status is a guest file (agent spawn): the new supervisor sees the SIGKILL
        assert (killed["status"], killed["signal"], killed["exit_code"]) == ("signaled", 9, None)
    else:  # an agent from before spawn: the status went with the old supervisor's channel
        assert (killed["status"], killed["signal"]) == ("exited", None)
    # the timeout still fires, on running time
    wait_until(lambda: sid not in out("ls"), 60, "the sandbox stops at its timeout")
    assert not qemu_pids(f"localsbx-{sid}")


def test_names_are_unique_and_connect_finds_them(new_sandbox):
    name = f"web-{os.getpid()}"
    sid = new_sandbox("--name", name)
    res = cli("new", "--image", "t-main", "--name", name, check=False)
    assert res.returncode == 1 and b"already used" in res.stderr
    sb = Sandbox.connect(name)
    assert sb.sandbox_id == sid
    assert sb.run("echo $((6*7))").stdout == "42\n"
    sb.update(name=name + "-2")
    assert Sandbox.connect(name + "-2").sandbox_id == sid
    with pytest.raises(SandboxNotFound):
        Sandbox.connect(name)
    with pytest.raises(ConfigError):
        sb.update(name="bad name!")
    with pytest.raises(ConfigError, match="looks like a sandbox id"):
        sb.update(name="abcdefghijkl")


def test_supervisor_killed_the_sandbox_lives_on(new_sandbox):
    sid = new_sandbox()
    cli("exec", sid, "--", "sh", "-c", "echo before > /tmp/f")
    sup = describe(sid)["supervisor_pid"]
    os.kill(sup, signal.SIGKILL)
    wait_until(lambda: not store.load_sandbox(sid).supervisor_alive(), 10, "supervisor gone")
    assert qemu_pids(f"localsbx-{sid}"), "QEMU must survive its supervisor"
    # the next client attaches a new supervisor
    assert out("exec", sid, "--", "cat", "/tmp/f") == "before"
    assert describe(sid)["supervisor_pid"] != sup
    ck = out("checkpoint", sid)  # QMP works again after the re-attach
    cli("snapshot", "rm", ck)


def test_owner_sigkilled_its_sandbox_goes(main_image):
    code = (f"from localsbx import Sandbox\nsb = Sandbox.create({main_image!r})\n"
            "print(sb.sandbox_id, flush=True)\nimport time\ntime.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        sid = p.stdout.readline().decode().strip()
        assert sid and qemu_pids(f"localsbx-{sid}")
    finally:
        p.kill()
        p.wait()
    wait_until(lambda: not qemu_pids(f"localsbx-{sid}"), 20, "the owner's sandbox stops")
    with pytest.raises(SandboxNotFound):
        store.read_sandbox(sid)


@pytest.mark.parametrize("delay", [0.5, 1.5, 3.0])
def test_sigkill_of_new_leaks_nothing(main_image, delay):
    before = set(os.listdir(store.paths.sandboxes_dir()))
    p = subprocess.Popen([LSBX, "new", "--image", main_image], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    time.sleep(delay)
    p.kill()
    p.wait()
    new = set(os.listdir(store.paths.sandboxes_dir())) - before - {".names.lock"}
    for sid in new:
        # settles as either usable or cleanly gone
        def settled(sid=sid):
            try:
                rec = store.load_sandbox(sid)
            except SandboxNotFound:
                return "gone"
            return "running" if rec.state is store.SandboxState.RUNNING else None
        state = wait_until(settled, 120, f"sandbox {sid} settles")
        if state == "running":
            assert out("exec", sid, "--", "echo", "usable") == "usable"
            cli("terminate", sid)
        assert not qemu_pids(f"localsbx-{sid}")


def test_shape_the_guest_sees_and_no_internet(main_image):
    with Sandbox.create(main_image, cpus=2, memory_mb=1536,
                        allow_internet_access=False) as sb:
        assert sb.notice and "cold-booting" in sb.notice  # another shape than the snapshot's
        assert sb.run("nproc").stdout.strip() == "2"
        mem_kib = int(sb.run("awk '/MemTotal/ {print $2}' /proc/meminfo").stdout)
        assert 1300 * 1024 < mem_kib <= 1536 * 1024
        dns = sb.run("python3 -c \"import socket; socket.getaddrinfo('pypi.org', 443)\"",
                     timeout=60)
        assert dns.exit_code != 0 and "gaierror" in dns.stderr
        tcp = sb.run("python3 -c \"import socket; socket.create_connection(('151.101.0.223', "
                     "443), timeout=5)\"", timeout=60)
        assert tcp.exit_code != 0


def test_operations_on_a_terminated_or_suspended_sandbox_are_clear(main_image):
    sb = Sandbox.create(main_image)
    sid = sb.sandbox_id
    sb.suspend()
    assert sb.status is store.SandboxState.SUSPENDED
    with pytest.raises(SandboxStateError, match="suspended"):
        sb.run("true")
    other = Sandbox.connect(sid)  # a second handle terminates it while suspended
    other.terminate()
    assert not store.sandbox_dir(sid).exists()
    with pytest.raises((SandboxStateError, SandboxNotFound)):
        sb.run("true")
    sb.terminate()  # idempotent


def test_background_processes_from_several_processes(new_sandbox):
    sid = new_sandbox()
    pid = int(out("exec", "--detach", "--name", "ticker", sid, "--", "sh", "-c",
                  "for i in 1 2 3; do echo tick $i; echo warn $i >&2; sleep 0.3; done"))
    assert pid > 1
    sb = Sandbox.connect(sid)  # this process, not the one that started it
    lines = []
    final = sb.follow_output("ticker", lambda st, line: lines.append((st, line)))
    assert final["status"] == "exited" and final["exit_code"] == 0
    assert [x for x in lines if x[0] == "stdout"] == [("stdout", f"tick {i}") for i in (1, 2, 3)]
    assert ("stderr", "warn 2") in lines
    res = cli("logs", sid, str(pid))
    assert res.stdout.decode().split("\n")[:3] == ["tick 1", "tick 2", "tick 3"]
    assert b"warn 1" in res.stderr
    ps = json.loads(out("ps", sid, "--json"))
    assert [(p["pid"], p["name"], p["status"]) for p in ps] == [(pid, "ticker", "exited")]

    cat = sb.start_process("cat", [], stdin_mode="pipe")
    sb.write_stdin(cat["pid"], b"hello\n")
    sb.write_stdin(cat["pid"], "world\n")
    sb.close_stdin(cat["pid"])
    wait_until(lambda: sb.get_process(cat["pid"])["status"] == "exited", 20, "cat ends")
    assert sb.get_output(cat["pid"], "stdout")["lines"] == ["hello", "world"]

    sleeper = sb.start_process("sleep 300")
    assert sb.get_process(sleeper["pid"])["status"] == "running"
    sb.send_signal(sleeper["pid"], signal.SIGTERM)
    wait_until(lambda: sb.get_process(sleeper["pid"])["status"] != "running", 20, "signalled")
    info = sb.get_process(sleeper["pid"])
    assert info["status"] == "signaled" and info["signal"] == signal.SIGTERM
    sb.kill_process(sleeper["pid"])  # the `sleep` its shell left behind goes too
    tree = sb.start_process("sh -c 'sleep 300 & sleep 300'")
    cli("kill", sid, str(tree["pid"]))
    assert sb.get_process(tree["pid"])["status"] != "running"
    assert sb.run("cat /proc/[0-9]*/comm 2>/dev/null | grep -c '^sleep$'").stdout.strip() == "0"  # its whole tree went
    with pytest.raises(SandboxNotFound):
        sb.get_process(99999)


def test_a_process_keeps_its_whole_output_stdin_and_exit_code_across_resume_and_reattach(
        new_sandbox):
    """Issue 6: output, stdin and exit status of a background process are guest files, so
    neither a suspend/resume nor a SIGKILLed supervisor (and a re-attach) loses any of it:
    its output so far is complete, with no gap and no duplicate."""
    sid = new_sandbox()
    sb = Sandbox.connect(sid)
    if not has_agent_spawn(sb):
        pytest.skip("this store's base has a guest agent from before `agent spawn` (its "
                    "processes keep today's SSH-channel path): rebuild it with "
                    "`localsbx base build debian-minimal --force`")
    p = sb.start_process("sh", ["-c", "i=0; while [ ! -e /tmp/stop ]; do echo $i; i=$((i+1)); "
                                      "sleep 0.1; done; echo done >&2; read x; echo got $x; exit 7"],
                         stdin_mode="pipe")
    pid = p["pid"]

    def counted(at_least: int):
        lines = Sandbox.connect(sid).get_output(pid, "stdout")["lines"]
        assert lines == [str(i) for i in range(len(lines))], lines  # no gap, no duplicate
        return len(lines) >= at_least and lines

    n = len(wait_until(lambda: counted(3), 60, "three lines"))
    cli("suspend", sid)
    cli("resume", sid)  # a new supervisor
    n = len(wait_until(lambda: counted(n + 3), 60, "more lines after the resume"))
    sup = describe(sid)["supervisor_pid"]
    os.kill(sup, signal.SIGKILL)
    wait_until(lambda: not store.load_sandbox(sid).supervisor_alive(), 10, "supervisor gone")
    n = len(wait_until(lambda: counted(n + 3), 60, "more lines after the re-attach"))
    assert describe(sid)["supervisor_pid"] != sup
    sb = Sandbox.connect(sid)
    assert sb.get_process(pid)["status"] == "running"
    sb.run("touch /tmp/stop")
    sb.write_stdin(pid, b"bye\n")  # through the guest FIFO, across supervisors
    sb.close_stdin(pid)
    wait_until(lambda: sb.get_process(pid)["status"] == "exited", 30, "it ends")
    info = sb.get_process(pid)
    assert info["exit_code"] == 7 and info["signal"] is None
    lines = sb.get_output(pid, "stdout")["lines"]
    assert lines[-1] == "got bye" and lines[:-1] == [str(i) for i in range(len(lines) - 1)]
    assert len(lines) - 1 >= n
    assert sb.get_output(pid, "stderr")["lines"] == ["done"]
    # and yet another supervisor still knows all of it
    os.kill(describe(sid)["supervisor_pid"], signal.SIGKILL)
    wait_until(lambda: not store.load_sandbox(sid).supervisor_alive(), 10, "supervisor gone")
    sb = Sandbox.connect(sid)
    wait_until(lambda: sb.get_process(pid)["status"] == "exited", 30, "status re-read")
    assert sb.get_process(pid)["exit_code"] == 7
    assert sb.get_output(pid, "stdout")["lines"] == lines


def test_files_list_delete_and_cp_both_ways(new_sandbox, tmp_path):
    sid = new_sandbox()
    sb = Sandbox.connect(sid)
    sb.write_file("/srv/d/a.txt", b"12345", mode=0o600)
    sb.run("mkdir -p /srv/d/sub && ln -s /etc/hostname /srv/d/link")
    entries = {e["name"]: e for e in sb.list_directory("/srv/d")}
    assert set(entries) == {"a.txt", "sub", "link"}
    assert entries["a.txt"]["size"] == 5 and not entries["a.txt"]["is_dir"]
    assert entries["sub"]["is_dir"] and abs(entries["a.txt"]["modified_at"] - time.time()) < 60
    # cp out: folders recursively, modes kept, absolute symlinks copied as links
    cli("cp", f"{sid}:/srv/d", str(tmp_path))
    assert (tmp_path / "d" / "a.txt").read_bytes() == b"12345"
    assert (tmp_path / "d" / "a.txt").stat().st_mode & 0o777 == 0o600
    assert os.readlink(tmp_path / "d" / "link") == "/etc/hostname"
    # cp in
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "x.sh").write_text("echo up\n")
    (tmp_path / "up" / "x.sh").chmod(0o750)
    cli("cp", str(tmp_path / "up"), f"{sid}:/opt/up")
    assert sb.run("stat -c %a /opt/up/x.sh && sh /opt/up/x.sh").stdout == "750\nup\n"
    sb.delete_file("/srv/d/a.txt")
    sb.delete_file("/srv/d/sub")
    assert {e["name"] for e in sb.list_directory("/srv/d")} == {"link"}
    with pytest.raises(Exception, match="cannot delete"):
        sb.delete_file("/srv/nope")
    res = cli("cp", f"{sid}:/etc/hostname", str(tmp_path / "no" / "such" / "dir"), check=False)
    assert res.returncode == 1 and b"does not exist" in res.stderr


def test_filesystem_checkpoint_clone_boots_the_disk(new_sandbox):
    sid = new_sandbox()
    cli("exec", sid, "--", "sh", "-c", "echo on-disk > /root/state; sleep 300 >/dev/null 2>&1 &")
    ck = out("checkpoint", sid, "--type", "filesystem")
    try:
        info = json.loads(out("snapshot", "ls", "--json"))
        [c] = [c for c in info if c["id"] == ck]
        assert c["kind"] == "filesystem" and c["sandbox_id"] == sid
        clone = out("new", "--snapshot", ck)
        try:
            assert out("exec", clone, "--", "cat", "/root/state") == "on-disk"
            # a cold boot of the disk: no process of the source runs in it
            res = cli("exec", clone, "--", "sh", "-c",
                      "cat /proc/[0-9]*/comm | grep -c '^sleep$'", check=False)
            assert res.stdout.decode().strip() == "0"
        finally:
            cli("terminate", clone)
        assert out("exec", sid, "--", "cat", "/root/state") == "on-disk"  # source runs on
    finally:
        cli("snapshot", "rm", ck)


def test_interactive_shell_on_a_pty(new_sandbox):
    import pty
    import select

    sid = new_sandbox()
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(LSBX, [LSBX, "ssh", sid])
    buf, sent = b"", False
    status = None
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                buf += chunk
            if not sent and b"# " in buf:  # the guest shell's prompt: type
                os.write(fd, b"tty; exit 5\r")
                sent = True
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                break
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert status is not None, buf
    assert os.waitstatus_to_exitcode(status) == 5, buf
    assert b"/dev/pts/" in buf  # a real terminal in the guest


def test_guest_kernel_panic_ends_the_sandbox_not_a_hang(main_image):
    sb = Sandbox.create(main_image)
    sid = sb.sandbox_id
    try:
        t = time.monotonic()
        with pytest.raises(SandboxNotFound, match="gone"):
            sb.run("echo c > /proc/sysrq-trigger; sleep 30", timeout=120)
        assert time.monotonic() - t < 60  # the client is told, it does not hang
        wait_until(lambda: not qemu_pids(f"localsbx-{sid}"), 20, "QEMU exits (-no-reboot)")
        assert sid not in out("ls")
    finally:
        sb.terminate()
    assert not store.sandbox_dir(sid).exists()


def test_disk_mb_grows_the_root_disk_the_guest_sees(main_image):
    """``disk_mb`` bigger than the image's: the guest's ``/`` is that big (QMP
    block_resize, then an online ext4 resize), and it survives a checkpoint clone."""
    with pytest.raises(ConfigError, match="grow, not shrink"):
        Sandbox.create(main_image, disk_mb=1024)
    sb = Sandbox.create(main_image, disk_mb=12288)
    try:
        out = sb.run("df -B1M --output=size / | tail -1").stdout.strip()
        assert 11600 <= int(out) <= 12288, out  # ext4 keeps some for itself
        assert sb.refresh().disk_mb == 12288 and not sb.refresh().error
        sb.run("head -c 1M /dev/zero > /grown.bin")
        cp = sb.checkpoint("filesystem")
        clone = Sandbox.create(snapshot_id=cp.id)
        try:
            size = int(clone.run("df -B1M --output=size / | tail -1").stdout.strip())
            assert size >= 11600 and clone.run("test -f /grown.bin").exit_code == 0
        finally:
            clone.terminate()
    finally:
        sb.terminate()


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


def test_cp_of_a_big_file_is_streamed_in_bounded_memory(new_sandbox, tmp_path):
    """``localsbx cp`` both ways of a file much bigger than the memory any process may use:
    the CLI's peak RSS and the supervisor's peak RSS stay far below the file's size, and the
    bytes arrive unchanged (sha256 on both sides)."""
    import hashlib

    size_mib = 192
    sid = new_sandbox()  # an 8 GiB disk
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:  # incompressible, so nothing shortcuts the transfer
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    want = hashlib.sha256(big.read_bytes()).hexdigest()
    sup = describe(sid)["supervisor_pid"]
    sup_before = _peak_rss_kib(sup)

    def cp_peak(*args: str) -> int:
        code = ("import resource, subprocess, sys\n"
                "r = subprocess.run(sys.argv[1:])\n"
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
                "sys.exit(r.returncode)\n")
        res = subprocess.run([sys.executable, "-c", code, LSBX, "cp", *args],
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr
        return int(res.stdout.split()[-1])  # KiB

    up = cp_peak(str(big), f"{sid}:/var/tmp/big.bin")
    got = out("exec", sid, "--", "sha256sum", "/var/tmp/big.bin").split()[0]
    assert got == want
    back = tmp_path / "back.bin"
    down = cp_peak(f"{sid}:/var/tmp/big.bin", str(back))
    assert hashlib.sha256(back.read_bytes()).hexdigest() == want
    sup_after = _peak_rss_kib(sup)
    limit = 96 * 1024  # KiB: half the file
    print(f"\ncp {size_mib} MiB: CLI peak RSS up {up // 1024} MiB, down {down // 1024} MiB; "
          f"supervisor peak {sup_before // 1024} -> {sup_after // 1024} MiB")
    assert up < limit and down < limit, (up, down)
    assert sup_after - sup_before < 96 * 1024, (sup_before, sup_after)
