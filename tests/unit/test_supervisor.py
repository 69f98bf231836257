"""The supervisor's orchestration against a fake machine (no QEMU): the control protocol,
error transport, suspend's QMP choreography and time accounting, owner and timeout
watching, terminate. Seconds, not minutes; the real thing is in tests/vm/test_lifecycle.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localsbx import control, errors, store, supervisor
from localsbx.guest.ssh import ExecResult
from localsbx.store import SandboxState


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALSBX_HOME", str(tmp_path / "store"))
    monkeypatch.setattr(supervisor, "WATCH_INTERVAL", 0.05)
    return tmp_path


class FakeGuest:
    def __init__(self):
        self.calls = []
        self.files = {}
        self.fixup_pending = False
        self.spawned, self.follows, self.stdin = [], [], []

    async def exec(self, argv, *, env=None, cwd=None, user=None, stdin=None, timeout=None,
                   stdout_cb=None, stderr_cb=None, kill_tree=False, stdin_stream=None):
        self.calls.append(("exec", list(argv), env, cwd, user, stdin, timeout))
        if argv[0] == "head1":  # reads its first chunk of a streamed stdin, then ends
            async for chunk in stdin_stream:
                stdout_cb(chunk.split(b"\n")[0] + b"\n")
                break
            return ExecResult(0, None, b"", b"")
        if argv[0] == "cat":
            async for chunk in stdin_stream:
                stdout_cb(chunk)
            return ExecResult(0, None, b"", b"")
        if argv[0] == "echo":
            stdout_cb(" ".join(argv[1:]).encode() + b"\n")
            stderr_cb(b"to stderr\n")
            return ExecResult(0, None, b"", b"")
        if argv[0] == "sleep":
            await asyncio.sleep(float(argv[1]))
            return ExecResult(0, None, b"", b"")
        return ExecResult(None, 9, b"", b"", timed_out=True)

    async def put_file(self, path, data, *, mode=0o644):
        self.files[path] = (data, mode)

    async def put_file_stream(self, path, chunks, *, size, mode=0o644):
        data = bytearray()
        async for chunk in chunks:
            data.extend(chunk)
            self.peak_chunk = max(getattr(self, "peak_chunk", 0), len(chunk))
        if len(data) != size:  # the agent's put --size: a short stream writes nothing
            raise errors.GuestFileError(f"cannot write {path} in the sandbox: put {path}: "
                                        f"input ended after {len(data)} of {size} bytes")
        self.files[path] = (bytes(data), mode)

    async def stream_file(self, path, sink):
        data = (await self.get_file(path))
        for i in range(0, len(data), 65536):
            await sink(data[i:i + 65536])
        return len(data)

    async def get_file(self, path):
        if path not in self.files:
            raise errors.GuestFileError(f"cannot read {path} in the sandbox: No such file")
        return self.files[path][0]

    async def agent(self, verb, *args, stdin=None, **kw):
        self.calls.append(("agent", verb))
        if verb == "spawn":  # the guest agent's background process: files under args[0]
            d = args[0]
            for f in ("stdout", "stderr"):
                self.files[f"{d}/{f}"] = (b"", 0o600)
            self.spawned.append((d, list(args[1:])))
            return ExecResult(0, None, b"%d\n" % (4000 + len(self.spawned)), b"")
        if verb == "stdin":
            self.stdin.append((args[0], stdin if len(args) == 1 else "close"))
        return ExecResult(0, None, b"", b"")

    async def raw(self, command, *, stdout_cb=None, stderr_cb=None, timeout=None,
                  stdin=None, stdin_stream=None):
        """``agent follow DIR OUT ERR``: the files from those offsets until the exit file."""
        import shlex

        _, _, verb, d, *offsets = shlex.split(command)
        assert verb == "follow"
        self.follows.append((d, offsets))
        off = {"stdout": int(offsets[0]), "stderr": int(offsets[1])}
        while True:
            ended = f"{d}/exit" in self.files
            for name, cb in (("stdout", stdout_cb), ("stderr", stderr_cb)):
                data = self.files[f"{d}/{name}"][0]
                if len(data) > off[name]:
                    cb(data[off[name]:])
                    off[name] = len(data)
            if ended:
                return ExecResult(0, None, b"", b"")
            await asyncio.sleep(0.01)

    def append(self, path, data):
        self.files[path] = (self.files[path][0] + data, 0o600)

    async def fixup(self):
        self.calls.append(("fixup",))

    async def close(self):
        self.calls.append(("close",))


class FakeQemu:
    def __init__(self, pid):
        self.pid = pid
        self.qmp = object()
        self.proc = None
        self.qmp_log = []

    async def execute(self, cmd, args=None, *, timeout=30.0):
        self.qmp_log.append((cmd, args))
        if cmd == "migrate":
            Path(args["uri"].split("of=")[1]).write_bytes(b"x" * 1234)
        if cmd == "query-migrate":
            return {"status": "completed"}
        return {}

    async def shutdown(self, *, graceful=True, timeout=5.0):
        self.qmp_log.append(("shutdown", graceful))


class FakeMachine:
    def __init__(self, pid):
        self.guest = FakeGuest()
        self.qemu = FakeQemu(pid)
        self.ssh_port = 2222


@pytest.fixture
def vm_process():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


async def started(vm_process, **kw) -> supervisor.Supervisor:
    from localsbx.vm.qemu import proc_start_time

    fields = dict(
        id="abcdefabcdef", image="img", project="default", image_digest="d" * 32,
        state=SandboxState.RUNNING, created_at=time.time(), running_since=time.time(),
        timeout_secs=600, env={"A": "1"}, workdir="/work", qemu_pid=vm_process.pid,
        qemu_start=proc_start_time(vm_process.pid))
    rec = store.SandboxRecord(**{**fields, **kw})
    rec.dir.mkdir(parents=True)
    store.write_sandbox(rec)
    sup = supervisor.Supervisor(rec)
    sup.machine = FakeMachine(vm_process.pid)
    await sup.serve()
    return sup


async def test_exec_streams_output_and_applies_the_image_env(vm_process):
    sup = await started(vm_process)
    seen = []
    res = await control.request(sup.rec.control_socket, "exec",
                                {"argv": ["echo", "hi"], "env": {"B": "2"}, "stdin": True},
                                payload=b"in", on_data=lambda s, d: seen.append((s, d)))
    assert res == {"exit_status": 0, "signal": None, "timed_out": False}
    assert seen == [("stdout", b"hi\n"), ("stderr", b"to stderr\n")]
    _, argv, env, cwd, user, stdin, _ = sup.machine.guest.calls[-1]
    assert env == {"HOME": "/root", "A": "1", "B": "2"} and cwd == "/work" and stdin == b"in"
    res = await control.request(sup.rec.control_socket, "exec", {"argv": ["x"]}, on_data=print)
    assert res["timed_out"] and res["signal"] == 9


async def test_exec_stdin_is_streamed_not_read_first(vm_process, tmp_path):
    """Issue 10 item 5: ``(echo first; sleep 25) | exec -i ... head -1`` answers at once,
    and ``yes | ... head -1`` does not pile the input up anywhere."""
    sup = await started(vm_process)
    sent = 0

    async def first_then_wait(writer):
        writer.write(control.stdin_frame(b"first\n"))
        await writer.drain()
        await asyncio.sleep(25)

    async def yes(writer):
        nonlocal sent
        while True:
            writer.write(control.stdin_frame(b"y\n" * 32768))
            sent += 65536
            await writer.drain()

    for source in (first_then_wait, yes):
        seen = []
        t = time.monotonic()
        res = await asyncio.wait_for(control.request(
            sup.rec.control_socket, "exec", {"argv": ["head1"], "stdin": "stream"},
            payload_source=source, on_data=lambda s, d, seen=seen: seen.append(d),
            timeout=None), 10)
        assert time.monotonic() - t < 5 and res["exit_status"] == 0
        assert seen[0] in (b"first\n", b"y\n")
    assert sent < 16 << 20  # the producer was held back, not drained into memory

    # a whole stream, then EOF, reaches the command (library: a binary file object)
    (tmp_path / "in").write_bytes(b"a" * 300_000)
    seen = []
    with open(tmp_path / "in", "rb") as f:
        from localsbx.sandbox import _stdin_source

        res = await asyncio.wait_for(control.request(
            sup.rec.control_socket, "exec", {"argv": ["cat"], "stdin": "stream"},
            payload_source=_stdin_source(f), on_data=lambda s, d: seen.append(d),
            timeout=None), 10)
    assert b"".join(seen) == b"a" * 300_000


async def test_errors_keep_their_class_and_hint(vm_process):
    sup = await started(vm_process)
    with pytest.raises(errors.GuestFileError, match="No such file"):
        await control.request(sup.rec.control_socket, "get", {"path": "/nope"})
    with pytest.raises(errors.SandboxStateError, match="unknown control operation"):
        await control.request(sup.rec.control_socket, "frobnicate")
    await control.request(sup.rec.control_socket, "put", {"path": "/f", "mode": 0o600},
                          payload=b"data" * 100_000)
    got = await control.request(sup.rec.control_socket, "get", {"path": "/f"})
    assert got["data"]["file"] == b"data" * 100_000 and got["result"]["size"] == 400_000


async def test_files_stream_both_ways_in_frames(vm_process, tmp_path):
    """``upload_file``/``read_file_chunks``: the content crosses the control socket in
    frames (never one payload), a stream that ends short writes nothing, and a missing
    file is an error before any chunk."""
    from localsbx.sandbox import _aiter_source, _stdin_source

    sup = await started(vm_process)
    guest = sup.machine.guest
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 << 20))
    with open(big, "rb") as f:
        await control.request(sup.rec.control_socket, "put",
                              {"path": "/big", "mode": 0o600, "stream": True,
                               "length": 3 << 20},
                              payload_source=_stdin_source(f), timeout=10)
    assert guest.files["/big"] == (big.read_bytes(), 0o600)
    assert guest.peak_chunk <= control.CHUNK
    chunks = []
    res = await control.request(sup.rec.control_socket, "get", {"path": "/big", "stream": True},
                                on_data=lambda s, d: chunks.append(d), timeout=10)
    assert res == {"size": 3 << 20} and b"".join(chunks) == big.read_bytes()
    assert max(map(len, chunks)) <= 65536

    async def short():
        yield b"only this"
    with pytest.raises(errors.GuestFileError, match="input ended after 9 of 100"):
        await control.request(sup.rec.control_socket, "put",
                              {"path": "/short", "stream": True, "length": 100},
                              payload_source=_aiter_source(short()), timeout=10)
    assert "/short" not in guest.files
    with pytest.raises(errors.GuestFileError, match="No such file"):
        await control.request(sup.rec.control_socket, "get", {"path": "/nope", "stream": True},
                              on_data=lambda s, d: None, timeout=10)


async def test_a_client_that_goes_away_cancels_its_command(vm_process):
    sup = await started(vm_process)
    task = asyncio.create_task(control.request(sup.rec.control_socket, "exec",
                                               {"argv": ["sleep", "30"]}, on_data=print))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the supervisor notices the closed connection and cancels the guest call (no hang)
    await asyncio.sleep(0.2)
    res = await control.request(sup.rec.control_socket, "exec", {"argv": ["echo", "x"]},
                                on_data=lambda s, d: None, timeout=5)
    assert res["exit_status"] == 0


async def test_suspend_saves_state_then_stops_and_pauses_the_timeout(vm_process):
    sup = await started(vm_process, used_secs=5.0)
    store.update_sandbox(sup.rec.id, running_since=time.time() - 10)
    sup.rec.running_since = time.time() - 10
    res = await control.request(sup.rec.control_socket, "suspend")
    cmds = [c for c, _ in sup.machine.qemu.qmp_log]
    assert cmds[:4] == ["migrate-set-capabilities", "stop", "migrate", "query-migrate"]
    assert cmds[-1] == "shutdown"
    assert res["state_bytes"] == 1234
    rec = store.load_sandbox(sup.rec.id)
    assert rec.state is SandboxState.SUSPENDED and rec.running_since is None
    assert rec.used_secs == pytest.approx(15.0, abs=1.0)
    assert (rec.dir / "suspend.mig").exists() and rec.state_file == str(rec.dir / "suspend.mig")
    assert sup.done.is_set()


async def test_owner_death_terminates_and_removes_the_sandbox(vm_process):
    owner = subprocess.Popen([sys.executable, "-c", "pass"])
    owner.wait()
    sup = await started(vm_process, owner_pid=owner.pid, owner_start=1)
    await asyncio.wait_for(sup.watch(), 10)
    assert not store.sandbox_dir(sup.rec.id).exists()
    assert vm_process.wait(timeout=10) is not None  # its QEMU was stopped


async def test_timeout_counts_running_time_and_fires(vm_process):
    sup = await started(vm_process, timeout_secs=1)
    t = time.monotonic()
    await asyncio.wait_for(sup.watch(), 10)
    assert time.monotonic() - t < 5
    assert not store.sandbox_dir(sup.rec.id).exists()


async def test_control_socket_is_private(vm_process):
    sup = await started(vm_process)
    assert os.stat(sup.rec.control_socket).st_mode & 0o077 == 0


def test_frames_round_trip():
    async def go():
        r = asyncio.StreamReader()
        r.feed_data(control.encode_frame({"op": "x"}, b"\x00\xffdata"))
        r.feed_data(b'{"torn": 1, "size": 10}\nabc')
        r.feed_eof()
        assert await control.read_frame(r) == ({"op": "x", "size": 6}, b"\x00\xffdata")
        with pytest.raises(control.ProtocolError):
            await control.read_frame(r)
    asyncio.run(go())


async def test_a_dead_socket_is_sandbox_not_found(tmp_path):
    with pytest.raises(errors.SandboxNotFound):
        await control.request(str(tmp_path / "none.sock"), "info")


async def output(sup, pid, stream="output"):
    return (await control.request(sup.rec.control_socket, "process_output",
                                  {"pid": pid, "stream": stream}))["lines"]


async def test_a_process_keeps_its_output_stdin_and_exit_status_across_supervisors(vm_process):
    """Issue 6: a background process's output and exit status are guest files (agent
    spawn); a later supervisor (resume, re-attach) follows them again from the start, so
    its output so far is whole (no gap, no duplicate) and its real exit status is known."""
    sup = await started(vm_process)
    guest = sup.machine.guest
    info = await control.request(sup.rec.control_socket, "start_process",
                                 {"argv": ["counter"], "stdin_mode": "pipe"})
    pid = info["pid"]
    (d, args), = guest.spawned
    assert d.startswith(supervisor.GUEST_PROC_DIR + "/p") and args[:2] == ["--stdin", "--"]
    assert args[-2:] == ["--", "counter"] and "--cgroup" in args
    guest.append(f"{d}/stdout", b"1\n2\n3")
    guest.append(f"{d}/stderr", b"warn\n")
    for _ in range(100):
        if await output(sup, pid) == ["1", "2", "warn"]:
            break
        await asyncio.sleep(0.02)
    assert await output(sup, pid, "stdout") == ["1", "2"]
    await control.request(sup.rec.control_socket, "write_stdin", {"pid": pid}, payload=b"x\n")
    assert guest.stdin == [(d, b"x\n")]

    # the supervisor goes away; a new one adopts the process from processes.json
    sup.server.close()
    sup2 = supervisor.Supervisor(store.load_sandbox(sup.rec.id))
    sup2.machine = sup.machine
    sup2._adopt_processes()
    await sup2.serve()
    guest.append(f"{d}/stdout", b"\n4\n")
    for _ in range(100):
        if len(await output(sup2, pid, "stdout")) == 4:
            break
        await asyncio.sleep(0.02)
    assert await output(sup2, pid, "stdout") == ["1", "2", "3", "4"]
    assert await output(sup2, pid, "stderr") == ["warn"]
    assert guest.follows[-1] == (d, ["0", "0"])  # the new one read everything from the start
    info = await control.request(sup2.rec.control_socket, "get_process", {"pid": pid})
    assert info["status"] == "running" and info["stdin_open"]
    await control.request(sup2.rec.control_socket, "close_stdin", {"pid": pid})
    assert guest.stdin[-1] == (d, "close")
    guest.files[f"{d}/exit"] = (b"exit 3\n", 0o600)
    for _ in range(100):
        info = await control.request(sup2.rec.control_socket, "get_process", {"pid": pid})
        if info["status"] != "running":
            break
        await asyncio.sleep(0.02)
    assert (info["status"], info["exit_code"], info["signal"]) == ("exited", 3, None)
    guest.files[f"{d}/exit"] = (b"signal 9\n", 0o600)  # and a killed one
    sup3 = supervisor.Supervisor(store.load_sandbox(sup.rec.id))
    sup3.machine = sup.machine
    sup3._adopt_processes()
    p = sup3.processes[pid]
    await asyncio.wait_for(p.ended.wait(), 5)
    assert (p.info()["status"], p.info()["signal"]) == ("signaled", 9)
    assert [e[1] for e in p.lines if e[0] == "stdout"] == ["1", "2", "3", "4"]
