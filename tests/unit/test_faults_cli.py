"""Issue 10, options: bad values are refused with a clear message before any QEMU starts
(no VM: the store is empty, so reaching QEMU would fail differently)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "localsbx")


def run_cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOCALSBX_HOME": str(tmp_path / "store"), "LOCALSBX_PROJECT": "t"}
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=60,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(("args", "says"), [
    (["new", "--cpus", "0"], "cpus 0"),
    (["new", "--memory", "0"], "memory 0 MiB"),
    (["new", "--memory", "100000000"], "at most the host's"),
    (["new", "--timeout", "-5"], "timeout -5"),
    (["new", "--name", ""], "--name is empty"),
    (["exec", "--timeout", "-1", "abcdefabcdef", "--", "true"], "--timeout must be positive"),
])
def test_bad_options_are_refused_clearly(tmp_path, args, says):
    res = run_cli(tmp_path, *args)
    assert res.returncode != 0
    assert says in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "QEMU" not in res.stderr


def test_empty_image_name_is_refused(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM debian-minimal\n")
    res = run_cli(tmp_path, "image", "build", str(tmp_path / "Dockerfile"), "-n", "")
    assert res.returncode != 0 and "--name is empty" in res.stderr, res.stderr
