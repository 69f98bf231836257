"""localsbx._proc: the host-command wrapper (real short-lived processes, no VM)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from localsbx import _proc
from localsbx.errors import ConfigError, HostCommandError, LocalsbxError

# A shell that records its own pid and a background grandchild's pid, then waits:
# killing only the direct child would leave the grandchild (and the pipes) alive.
FAMILY = 'sleep 60 & echo $! > "$1/grandchild"; echo $$ > "$1/child"; echo started >&2; wait'


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is dead for our purpose
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def gone(pid: int, within: float = 3.0) -> bool:
    """Dead within ``within`` s: a SIGKILLed grandchild (not ours to reap) may still be in
    the middle of exiting (pipes closed, not yet a zombie) when the wrapper returns."""
    deadline = time.monotonic() + within
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def pids(d: Path) -> list[int]:
    return [int((d / n).read_text()) for n in ("child", "grandchild")]


async def wait_for(path: Path) -> None:
    for _ in range(200):
        if path.exists() and path.read_text().strip():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never written")


async def test_output_input_env_cwd(tmp_path):
    res = await _proc.run(["sh", "-c", 'cat; echo "$FOO" >&2; pwd'], timeout=10,
                          input=b"in-data\n", env={"FOO": "bar", "PATH": os.environ["PATH"]},
                          cwd=tmp_path)
    assert res.returncode == 0
    assert res.stdout == b"in-data\n" + str(tmp_path).encode() + b"\n"
    assert res.stderr == b"bar\n"
    assert res.argv == ["sh", "-c", 'cat; echo "$FOO" >&2; pwd']


async def test_stdin_is_dev_null_without_input():
    res = await _proc.run(["cat"], timeout=10)
    assert res.stdout == b""


async def test_nonzero_exit_raises_with_stderr_tail():
    script = "for i in $(seq 1 40); do echo line$i >&2; done; exit 3"
    with pytest.raises(HostCommandError) as ei:
        await _proc.run(["sh", "-c", script], timeout=10)
    err = ei.value
    assert isinstance(err, LocalsbxError)
    assert err.returncode == 3 and not err.timed_out
    assert err.argv == ["sh", "-c", script]
    assert err.stderr_tail.splitlines() == [f"line{i}" for i in range(21, 41)]
    assert "exit status 3" in err.message and "line40" in err.message
    assert str(err).endswith("line40")


async def test_check_false_returns_the_failure():
    res = await _proc.run(["sh", "-c", "echo x; exit 5"], timeout=10, check=False)
    assert (res.returncode, res.stdout) == (5, b"x\n")


async def test_timeout_kills_the_process_group(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(HostCommandError) as ei:
        await _proc.run(["sh", "-c", FAMILY, "sh", str(tmp_path)], timeout=0.5)
    assert time.monotonic() - t0 < 5
    err = ei.value
    assert err.timed_out and err.returncode is None and err.timeout == 0.5
    assert "0.5 s timeout" in err.message
    assert err.stderr_tail == "started"  # output so far survives the kill
    child, grandchild = pids(tmp_path)
    assert not alive(child)  # the direct child is reaped before run() returns
    assert gone(grandchild)


async def test_cancellation_kills_and_propagates(tmp_path):
    task = asyncio.create_task(_proc.run(["sh", "-c", FAMILY, "sh", str(tmp_path)], timeout=60))
    await wait_for(tmp_path / "child")
    child, grandchild = pids(tmp_path)
    assert alive(child) and alive(grandchild)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(child)  # the direct child is reaped before run() returns
    assert gone(grandchild)


async def test_loop_is_not_blocked():
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    t = asyncio.create_task(ticker())
    try:
        await _proc.run(["sleep", "0.6"], timeout=10)
    finally:
        t.cancel()
    assert ticks >= 5


async def test_missing_program_is_a_config_error():
    with pytest.raises(ConfigError) as ei:
        await _proc.run(["/nonexistent/qemu-img-xyz", "info"], timeout=5)
    assert "qemu-img-xyz" in str(ei.value)


def test_sync_twin(tmp_path):
    res = _proc.run_sync_cmd(["sh", "-c", "cat; echo err >&2"], input=b"abc", timeout=10)
    assert (res.returncode, res.stdout, res.stderr) == (0, b"abc", b"err\n")
    with pytest.raises(HostCommandError) as ei:
        _proc.run_sync_cmd(["sh", "-c", "echo bad >&2; exit 2"], timeout=10)
    assert (ei.value.returncode, ei.value.stderr_tail) == (2, "bad")
    t0 = time.monotonic()
    with pytest.raises(HostCommandError) as ei:
        _proc.run_sync_cmd(["sh", "-c", FAMILY, "sh", str(tmp_path)], timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert ei.value.timed_out and ei.value.stderr_tail == "started"
    child, grandchild = pids(tmp_path)
    assert not alive(child) and gone(grandchild)
    with pytest.raises(ConfigError):
        _proc.run_sync_cmd(["/nonexistent/tool"], timeout=5)
