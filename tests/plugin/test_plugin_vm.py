"""The plugin on real QEMU: inner pytest runs (pytester, as child processes) using the
fixtures, then checks from outside that sandboxes were fresh, reported, kept or gone.

All inner runs use the ``plugintest`` image (tests/plugin/images/small, built once per session)
except the xdist test, which builds a fresh definition to show it is built exactly once."""

from __future__ import annotations

import signal
import time
import uuid

import pytest
from plugin_helpers import (
    IMAGE,
    PROJECT,
    assert_gone,
    read_ids,
    sandbox_dir,
    sandbox_procs,
    start_inner,
    wait_for,
)

pytestmark = pytest.mark.vm

RECORD = '''
import os, pathlib

def record(label, sb):
    with open(pathlib.Path(os.getcwd()) / "ids.txt", "a") as f:
        f.write(f"{label} {sb.sandbox_id}\\n")
'''


def test_fresh_sandbox_per_test_and_the_other_fixtures(inner):
    inner.makeconftest(RECORD)
    inner.makepyfile(test_iso=f'''
        import asyncio, pytest
        from conftest import record

        pytestmark = pytest.mark.sandbox(image="{IMAGE}")

        def test_a_writes(sandbox):
            record("a", sandbox)
            sandbox.write_file("/root/marker", "from a")
            assert sandbox.run("cat /root/marker; cat /etc/plugin-test").stdout == \\
                "from aplugin-test\\n"

        def test_b_does_not_see_it(sandbox):
            record("b", sandbox)
            assert sandbox.run("test -e /root/marker").exit_code == 1
            assert sandbox.read_file("/etc/plugin-test") == b"plugin-test\\n"

        def test_factory_makes_independent_sandboxes(sandbox_factory):
            one, two = sandbox_factory(), sandbox_factory(timeout_secs=120)
            record("f1", one); record("f2", two)
            assert one.sandbox_id != two.sandbox_id
            one.run("touch /tmp/only-one")
            assert two.run("test -e /tmp/only-one").exit_code == 1
            assert sandbox_factory.sandboxes == [one, two]

        def test_module_sandbox_1(module_sandbox):
            record("m", module_sandbox)
            module_sandbox.run("echo shared > /tmp/shared")

        def test_module_sandbox_2(module_sandbox):
            assert module_sandbox.run("cat /tmp/shared").stdout == "shared\\n"

        @pytest.mark.asyncio
        async def test_async(async_sandbox):
            record("async", async_sandbox)
            res = await async_sandbox.run("echo async-ok")
            assert res.stdout == "async-ok\\n"
    ''')
    t0 = time.monotonic()
    res = inner.runpytest_subprocess("-p", "no:cacheprovider")
    elapsed = time.monotonic() - t0
    res.assert_outcomes(passed=6)
    ids = read_ids(inner.path)
    assert len(ids) == 6 and len(set(ids)) == 6, ids
    for sid in ids:
        assert_gone(sid)
    print(f"6 tests, 6 sandboxes: {elapsed:.1f} s")


def test_marker_fixture_ini_precedence_on_real_sandboxes(inner):
    from localsbx import store

    digest = store.lookup_image(IMAGE, project=PROJECT).digest
    for alias in ("pt-ini", "pt-fixture", "pt-marker"):
        store.register_image(PROJECT, alias, digest)
    inner.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n"
                  "sandbox_image = pt-ini\n")
    inner.makepyfile(test_ini='''
        def test_ini(sandbox):
            assert sandbox.record.image == "pt-ini"
    ''')
    sub = inner.mkpydir("sub")
    (sub / "conftest.py").write_text(
        "import pytest\n\n@pytest.fixture\ndef sandbox_image():\n    return 'pt-fixture'\n")
    (sub / "test_sub.py").write_text(
        "import pytest\n\n"
        "def test_fixture(sandbox):\n    assert sandbox.record.image == 'pt-fixture'\n\n"
        "@pytest.mark.sandbox(image='pt-marker')\n"
        "def test_marker(sandbox):\n    assert sandbox.record.image == 'pt-marker'\n")
    res = inner.runpytest_subprocess("-p", "no:cacheprovider")
    res.assert_outcomes(passed=3)


def test_failing_test_report_shows_commands_and_serial_log(inner):
    inner.makeconftest(RECORD)
    inner.makepyfile(test_fail=f'''
        import pytest
        from conftest import record

        pytestmark = pytest.mark.sandbox(image="{IMAGE}")

        def test_command_fails(sandbox):
            record("cmd", sandbox)
            sandbox.run("echo first-command")
            res = sandbox.run("echo out-marker; echo err-marker >&2; exit 3")
            assert res.exit_code == 0

        def test_vm_dies(sandbox):
            record("dead", sandbox)
            sandbox.run("echo before-death")
            sandbox.run("echo o > /proc/sysrq-trigger", timeout=30)  # power off now
            sandbox.run("echo after")
    ''')
    res = inner.runpytest_subprocess("-p", "no:cacheprovider")
    res.assert_outcomes(failed=2)
    cmd_id, dead_id = read_ids(inner.path)
    out = res.stdout.str()
    res.stdout.fnmatch_lines([
        f"*- localsbx sandbox {cmd_id} (call) -*",
        f"sandbox {cmd_id} (image {IMAGE}): running",
        "last 2 command(s), oldest first:",
        "  $ echo first-command",
        "    -> exit 0 in *",
        "  $ echo out-marker; echo err-marker >&2; exit 3",
        "    -> exit 3 in *",
        "    stdout:",
        "      | out-marker",
        "    stderr:",
        "      | err-marker",
    ])
    res.stdout.fnmatch_lines([
        f"*- localsbx sandbox {dead_id} (call) -*",
        f"sandbox {dead_id} (image {IMAGE}): its VM is gone (QEMU exited)",
        "  $ echo before-death",
        "serial log tail (*serial.log):",
    ])
    # the command fails with the connection (GuestError), or SandboxNotFound when QEMU had
    # already exited by then
    assert "SandboxNotFound" in out or "GuestError" in out
    for sid in (cmd_id, dead_id):
        assert_gone(sid)


def test_keep_failed_keeps_only_the_failing_sandbox(inner):
    from localsbx.sandbox import Sandbox

    inner.makeconftest(RECORD)
    inner.makepyfile(test_keep=f'''
        import pytest
        from conftest import record

        pytestmark = pytest.mark.sandbox(image="{IMAGE}", timeout_secs=300)

        def test_passes(sandbox):
            record("pass", sandbox)

        def test_fails(sandbox):
            record("fail", sandbox)
            sandbox.run("echo state-to-inspect > /root/state")
            assert False, "boom"
    ''')
    res = inner.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox-keep=failed")
    res.assert_outcomes(passed=1, failed=1)
    pass_id, fail_id = read_ids(inner.path)
    try:
        res.stdout.fnmatch_lines([
            f"kept running: localsbx exec -it {fail_id} -- sh   (stop it: localsbx terminate {fail_id})",
            "*localsbx: kept sandboxes*",
            f"test_keep.py::test_fails: localsbx exec -it {fail_id} -- sh*",
        ])
        assert_gone(pass_id)
        # the inner pytest has exited; the kept sandbox still runs and has the test's state
        assert sandbox_procs(fail_id)
        kept = Sandbox.connect(fail_id)
        assert kept.record.owner_pid is None
        assert kept.run("cat /root/state").stdout == "state-to-inspect\n"
        kept.terminate()
    finally:
        if sandbox_dir(fail_id).exists():
            from localsbx import store

            store.cleanup_sandbox(store.read_sandbox(fail_id))
    assert_gone(fail_id)


def test_keep_always_keeps_function_and_module_sandboxes(inner):
    from localsbx import store

    inner.makeconftest(RECORD)
    inner.makepyfile(test_always=f'''
        import pytest
        from conftest import record

        pytestmark = pytest.mark.sandbox(image="{IMAGE}", timeout_secs=300)

        def test_fn(sandbox):
            record("fn", sandbox)

        def test_mod(module_sandbox):
            record("mod", module_sandbox)
    ''')
    res = inner.runpytest_subprocess("-p", "no:cacheprovider", "--sandbox-keep=always")
    res.assert_outcomes(passed=2)
    ids = read_ids(inner.path)
    try:
        assert len(ids) == 2
        res.stdout.fnmatch_lines([
            "*localsbx: kept sandboxes*",
            f"test_always.py::test_fn: localsbx exec -it {ids[0]} -- sh*",
            f"test_always.py::test_mod: localsbx exec -it {ids[1]} -- sh*",
        ])
        for sid in ids:
            assert sandbox_procs(sid)
            assert store.read_sandbox(sid).owner_pid is None
    finally:
        for sid in ids:
            if sandbox_dir(sid).exists():
                store.cleanup_sandbox(store.read_sandbox(sid))
    for sid in ids:
        assert_gone(sid)


def test_xdist_workers_build_an_image_once(inner):
    from conftest_plugin.images import read_build_log

    token = uuid.uuid4().hex
    (inner.path / "img").mkdir()
    (inner.path / "img" / "Dockerfile").write_text(
        f"FROM debian-minimal\nRUN echo {token} > /etc/build-token\n")
    inner.makeconftest(RECORD)
    inner.makepyfile(test_x=f'''
        import pytest
        from conftest import record

        pytestmark = pytest.mark.sandbox(dockerfile="img/Dockerfile")

        @pytest.mark.parametrize("i", range(4))
        def test_token(sandbox, i):
            record(str(i), sandbox)
            assert sandbox.read_file("/etc/build-token") == b"{token}\\n"
    ''')
    t0 = time.monotonic()
    res = inner.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    first = time.monotonic() - t0
    res.assert_outcomes(passed=4)
    source = str((inner.path / "img" / "Dockerfile").resolve())
    builds = [e for e in read_build_log() if e.get("source") == source]
    assert len(builds) == 1, builds
    assert builds[0]["worker"] in ("gw0", "gw1")
    ids = read_ids(inner.path)
    assert len(set(ids)) == 4
    for sid in ids:
        assert_gone(sid)
    # a later run reuses the unchanged build
    t0 = time.monotonic()
    res = inner.runpytest_subprocess("-p", "no:cacheprovider", "-k", "test_token[0]")
    second = time.monotonic() - t0
    res.assert_outcomes(passed=1)
    assert len([e for e in read_build_log() if e.get("source") == source]) == 1
    print(f"-n 2 with one build: {first:.1f} s; later run reusing it: {second:.1f} s")


def test_the_shipped_example_suite_passes(inner):
    """images/examples/pytest, as the docs tell users to run it."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "images" / "examples" / "pytest"
    t0 = time.monotonic()
    res = inner.runpytest_subprocess(str(example), "-p", "no:cacheprovider", "-v")
    res.assert_outcomes(passed=5)
    print(f"example suite: {time.monotonic() - t0:.1f} s")


B30 = '''
import time

import pytest
from conftest import record

pytestmark = pytest.mark.sandbox(image="{image}")


def test_long_running(sandbox):
    sandbox.run("echo up")
    record("b30", sandbox)
    print("sandbox up", flush=True)
    time.sleep(120)
'''


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_b30_interrupt_runs_teardown(inner, sig):
    """B30: Ctrl-C and SIGTERM during a test: teardown terminates the sandbox; no QEMU, no
    sandbox folder left, without waiting for any later reap."""
    inner.makeconftest(RECORD)
    inner.makepyfile(test_b30=B30.format(image=IMAGE))
    proc = start_inner(inner.path, "test_b30.py")
    try:
        (sid,) = wait_for(lambda: read_ids(inner.path), 120, "the sandbox", proc,
                          inner.path / "inner.log")
        assert sandbox_procs(sid)
        t0 = time.monotonic()
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
        log = (inner.path / "inner.log").read_text(errors="replace")
        assert rc == pytest.ExitCode.INTERRUPTED, log
        assert "KeyboardInterrupt" in log
        if sig == signal.SIGTERM:
            assert "SIGTERM" in log
        assert_gone(sid)
        print(f"{sig.name}: pytest exited {time.monotonic() - t0:.1f} s after the signal")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_b30_sigkill_leaves_no_qemu_once_the_next_run_started(inner):
    """B30: SIGKILL of the pytest process: its sandbox's supervisor sees its owner die and
    terminates it (QEMU and folder), with no help from the next run."""
    inner.makeconftest(RECORD)
    inner.makepyfile(test_b30=B30.format(image=IMAGE))
    proc = start_inner(inner.path, "test_b30.py")
    try:
        (sid,) = wait_for(lambda: read_ids(inner.path), 120, "the sandbox", proc,
                          inner.path / "inner.log")
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_gone(sid, dir_too=False)
    deadline = time.monotonic() + 10
    while sandbox_dir(sid).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sandbox_dir(sid).exists()  # the supervisor removed it, not the next run
    (inner.path / "test_b30.py").unlink()
    inner.makepyfile(test_next="def test_next():\n    pass\n")
    inner.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert_gone(sid)


def test_b30_interrupted_setup_does_not_leak(inner):
    """B30 / pytest-dev/pytest#15067: Ctrl-C while the sandbox fixture is still setting up
    (QEMU up and connected, sandbox not handed over yet): the half-made sandbox is stopped and removed
    before pytest exits."""
    inner.makeconftest('''
        import asyncio, os, pathlib, signal
        from localsbx import sandbox

        real_wait = sandbox.supervisor.Launch.wait

        async def ready_then_interrupt(self, *a, **kw):
            await real_wait(self, *a, **kw)  # QEMU up, guest connected, supervisor serving
            (pathlib.Path(os.getcwd()) / "ids.txt").write_text(f"setup {self.sandbox_id}\\n")
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.sleep(60)

        sandbox.supervisor.Launch.wait = ready_then_interrupt
    ''')
    inner.makepyfile(test_setup=f'''
        import pytest

        @pytest.mark.sandbox(image="{IMAGE}")
        def test_never_runs(sandbox):
            raise AssertionError("setup should have been interrupted")
    ''')
    proc = start_inner(inner.path, "test_setup.py")
    try:
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (inner.path / "inner.log").read_text(errors="replace")
    assert rc == pytest.ExitCode.INTERRUPTED, log
    (sid,) = read_ids(inner.path)
    assert_gone(sid)
