"""The spare supervisor a process keeps after its first create (``supervisor.Launch``):
a real ``python -m localsbx.supervisor spare`` process, told its sandbox by the go pipe.
The sandbox here has no record, so the supervisor fails at once: what it logs and where
shows which sandbox it took and that it ran as that sandbox's supervisor."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from localsbx import errors, store, supervisor
from localsbx.supervisor import Launch


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALSBX_HOME", str(tmp_path / "store"))
    monkeypatch.delenv(supervisor.SPARE_ENV, raising=False)
    yield
    with Launch._spare_lock:
        spare, Launch._spare = Launch._spare, None
    if spare is not None:
        spare.abort()


def new_dir(sid: str):
    d = store.sandbox_dir(sid)
    d.mkdir(parents=True)
    return d


def gone(pid: int, within: float = 15) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ")[1].startswith("Z"):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    return False


def test_a_create_takes_the_spare_which_becomes_that_sandboxs_supervisor():
    Launch.keep_spare()
    spare_pid = Launch._spare.proc.pid
    d = new_dir("aaaaaaaaaaa1")
    launch = Launch.start("aaaaaaaaaaa1", "create")
    assert launch.proc.pid == spare_pid and Launch._spare is None
    with pytest.raises(errors.VMLaunchError, match="exited during create") as exc:
        asyncio.run(launch.wait(60))
    # it logged into the sandbox's own supervisor.log, about that sandbox
    assert "aaaaaaaaaaa1" in (d / "supervisor.log").read_text()
    assert "[supervisor.log]" in exc.value.log_tail


def test_a_spare_is_not_used_after_the_environment_changed_and_then_exits(monkeypatch):
    Launch.keep_spare()
    spare_pid = Launch._spare.proc.pid
    monkeypatch.setenv("LOCALSBX_HOME", os.environ["LOCALSBX_HOME"] + "-other")
    new_dir("aaaaaaaaaaa2")
    launch = Launch.start("aaaaaaaaaaa2", "create")
    try:
        assert launch.proc.pid != spare_pid
    finally:
        launch.abort()
    assert gone(spare_pid), "an unused spare exits when its go pipe closes"


def test_a_spare_that_died_idle_is_replaced_by_a_fresh_supervisor():
    Launch.keep_spare()
    spare = Launch._spare
    os.kill(spare.proc.pid, signal.SIGKILL)
    spare.proc.wait(10)
    d = new_dir("aaaaaaaaaaa3")
    launch = Launch.start("aaaaaaaaaaa3", "create")
    assert launch.proc.pid != spare.proc.pid
    with pytest.raises(errors.VMLaunchError, match="exited during create"):
        asyncio.run(launch.wait(60))
    assert "aaaaaaaaaaa3" in (d / "supervisor.log").read_text()


def test_no_spare_when_turned_off(monkeypatch):
    monkeypatch.setenv(supervisor.SPARE_ENV, "0")
    Launch.keep_spare()
    assert Launch._spare is None
