"""Helpers for the plugin's VM tests (imported by test modules; conftest.py holds fixtures)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

#: Inner runs use this project, so they never clash with a user's or the core tests' images.
PROJECT = "pytest-localsbx-plugin"
#: The one image the VM tests share: debian-minimal + a RUN (tests/plugin/images/small).
IMAGE = "plugintest"


def sandbox_procs(sandbox_id: str) -> list[str]:
    """Processes (QEMU, its timeout wrapper) whose command line names the sandbox's folder."""
    from localsbx import paths

    needle = str(paths.sandboxes_dir() / sandbox_id)
    out = subprocess.run(["pgrep", "-af", "--", needle], capture_output=True, text=True,
                         check=False).stdout
    return [ln for ln in out.splitlines() if ln.strip() and "pgrep" not in ln]


def sandbox_dir(sandbox_id: str) -> Path:
    from localsbx import paths

    return paths.sandboxes_dir() / sandbox_id


def wait_no_procs(sandbox_id: str, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    procs = sandbox_procs(sandbox_id)
    while procs and time.monotonic() < deadline:
        time.sleep(0.1)
        procs = sandbox_procs(sandbox_id)
    return procs


def assert_gone(sandbox_id: str, *, dir_too: bool = True) -> None:
    """No QEMU (within 10 s) and, unless ``dir_too`` is false, no folder for the sandbox."""
    procs = wait_no_procs(sandbox_id)
    assert not procs, f"sandbox {sandbox_id} still has processes:\n" + "\n".join(procs)
    if dir_too:
        assert not sandbox_dir(sandbox_id).exists(), f"{sandbox_dir(sandbox_id)} left behind"


def read_ids(folder: Path, name: str = "ids.txt") -> list[str]:
    """Sandbox ids the inner tests wrote (one per line, ``label id``)."""
    try:
        return [ln.split()[-1] for ln in (folder / name).read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        return []


def start_inner(folder: Path, *args: str) -> subprocess.Popen:
    """An inner pytest as a child process we can signal (output in ``inner.log``)."""
    log = open(folder / "inner.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", *args],
        cwd=folder, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None,
             log: Path | None = None):
    """Poll ``pred`` until truthy; fail with the inner log's tail when it never is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n--- inner log ---\n{tail}")
