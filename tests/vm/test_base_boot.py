"""Boot the debian-minimal base cold and exercise the guest contract end to end.

Self-contained on purpose: a minimal inline QEMU launcher (the recipe's "best" TCG
command), not localsbx.vm.qemu, so the base and the guest agent can be checked on their
own.  Run: ``.venv/bin/python -m pytest tests/vm/test_base_boot.py -m vm -s`` (prints
the cold-boot timings).  Builds the base first when it is missing (about a minute).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path

import asyncssh
import pytest
from qemu.qmp import ConnectError, QMPClient

from localsbx.base import build_base, get_base
from localsbx.errors import BaseImageError
from localsbx.vm.kernel import make_identity_cpio

pytestmark = pytest.mark.vm

AGENT = "/usr/lib/localsbx/agent"
PATH_ENV = "PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
CMDLINE = (
    "console=ttyS0 root=/dev/vda rw quiet loglevel=1 nokaslr mitigations=off "
    "cryptomgr.notests audit=0 apparmor=0 security=none ima_appraise=off i8042.noaux "
    "i8042.nomux i8042.nopnp i8042.dumbkbd tsc=reliable no_timer_check random.trust_cpu=on "
    "panic=-1"
)


def host_tsc_khz() -> int:
    m = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    assert m, "no cpu MHz in /proc/cpuinfo"
    return int(float(m.group(1)) * 1000)


def agent(verb: str, *args: str) -> str:
    return "exec " + shlex.join([AGENT, verb, *args])


def agent_exec(*argv: str, opts: tuple[str, ...] = ()) -> str:
    return agent("exec", "--env", PATH_ENV, *opts, "--", *argv)


class Guest:
    """One cold-booted QEMU (TCG, microvm) with the base, owned by the test."""

    def __init__(self, base, workdir: Path) -> None:
        self.base = base
        self.dir = workdir
        self.serial = workdir / "serial.log"
        self.qmp_path = workdir / "qmp.sock"
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.machine_id = secrets.token_hex(16)
        self.hostname = "smoke-" + secrets.token_hex(3)
        self.proc: asyncio.subprocess.Process | None = None
        self.conn: asyncssh.SSHClientConnection | None = None
        self.port: int | None = None
        self.t0 = 0.0

    def argv(self, initrd: Path, disk: Path) -> list[str]:
        return [
            "qemu-system-x86_64", "-M", "microvm", "-accel", "tcg,tb-size=64", "-cpu", "max",
            "-m", "1024M", "-smp", "1", "-nodefaults", "-no-user-config", "-no-reboot",
            "-display", "none", "-serial", f"file:{self.serial}",
            "-kernel", str(self.base.kernel), "-initrd", str(initrd),
            "-append", f"{CMDLINE} tsc_early_khz={host_tsc_khz()}",
            "-drive", f"id=root,file={disk},format=qcow2,if=none,discard=unmap",
            "-device", "virtio-blk-device,drive=root",
            "-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:0-:10022",
            "-device", "virtio-net-device,netdev=n0",
            "-device", "virtio-rng-device",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip

    async def start(self) -> None:
        disk = self.dir / "overlay.qcow2"
        img = await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.base.rootfs), "-F", "qcow2",
            str(disk))
        assert await img.wait() == 0
        ident = make_identity_cpio(
            host_key_openssh=self.host_key.export_private_key("openssh"),
            authorized_keys=self.client_key.export_public_key("openssh"),
            machine_id=self.machine_id,
            hostname=self.hostname,
        )
        initrd = self.dir / "initrd.cpio"
        initrd.write_bytes(self.base.initrd.read_bytes() + ident)
        self.t0 = time.monotonic()
        with (self.dir / "qemu.stderr").open("wb") as stderr:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv(initrd, disk), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr)
        self.port = await self._hostfwd_port()

    async def _hostfwd_port(self) -> int:
        qmp = QMPClient("smoke")
        async with asyncio.timeout(20):
            while True:  # the socket file appears before QEMU listens on it
                try:
                    await qmp.connect(str(self.qmp_path))
                    break
                except ConnectError:
                    assert self.proc and self.proc.returncode is None, "QEMU exited"
                    await asyncio.sleep(0.01)
        try:
            out = await qmp.execute("human-monitor-command", {"command-line": "info usernet"})
        finally:
            await qmp.disconnect()
        m = re.search(r"HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+10\.0\.2\.15\s+10022", out)
        assert m, out
        return int(m.group(1))

    def console(self) -> str:
        return self.serial.read_text(errors="replace") if self.serial.exists() else ""

    async def wait_ready(self, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while "LOCALSBX-READY" not in self.console():
            assert self.proc and self.proc.returncode is None, f"QEMU exited:\n{self.console()}"
            assert time.monotonic() < deadline, f"no LOCALSBX-READY:\n{self.console()}"
            await asyncio.sleep(0.02)
        return time.monotonic() - self.t0

    async def connect(self) -> float:
        known = asyncssh.import_known_hosts(
            f"[127.0.0.1]:{self.port} {self.host_key.export_public_key().decode().strip()}\n")
        last: Exception | None = None
        for _ in range(50):
            try:
                self.conn = await asyncssh.connect(
                    "127.0.0.1", self.port, username="root", client_keys=[self.client_key],
                    known_hosts=known, agent_path=None, config=None, connect_timeout=20)
                return time.monotonic() - self.t0
            except (OSError, asyncssh.Error) as exc:
                last = exc
                await asyncio.sleep(0.1)
        raise AssertionError(f"cannot connect: {last}\n{self.console()}")

    async def run(self, command: str, *, stdin: bytes | None = None, timeout: float = 120):
        assert self.conn is not None
        return await self.conn.run(command, input=stdin, check=False, encoding=None,
                                   timeout=timeout)

    async def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.conn.wait_closed(), 5)
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture(scope="module")
def base():
    try:
        return get_base("debian-minimal")
    except BaseImageError:
        return build_base("debian-minimal", progress=print)


async def test_cold_boot_and_contract(base, tmp_path):
    g = Guest(base, tmp_path)
    try:
        await g.start()
        t_ready = await g.wait_ready()
        t_conn = await g.connect()
        r = await g.run(agent_exec("/bin/sh", "-c", "echo hi; echo err >&2; exit 3"))
        t_first = time.monotonic() - g.t0
        print(f"\ncold boot: LOCALSBX-READY {t_ready:.2f} s, SSH connected {t_conn:.2f} s, "
              f"first command done {t_first:.2f} s")
        assert (r.stdout, r.stderr, r.exit_status) == (b"hi\n", b"err\n", 3)

        # a signal reaches the client as exit-signal (the agent execs in place)
        r = await g.run(agent_exec("/bin/sh", "-c", "kill -TERM $$"))
        assert r.exit_signal is not None and r.exit_signal[0] == "TERM", r

        # 126/127 conventions, messages prefixed localsbx:
        r = await g.run(agent_exec("no-such-command"))
        assert r.exit_status == 127 and r.stderr.startswith(b"localsbx: "), r
        r = await g.run(agent_exec("/etc/passwd"))
        assert r.exit_status == 126, r
        r = await g.run(agent_exec("pwd", opts=("--cwd", "/nonexistent")))
        assert r.exit_status == 126 and b"localsbx: " in r.stderr, r

        # environment is exactly what was given; --cwd, --user, stdin
        r = await g.run(agent_exec("env", opts=("--env", "A=b c", "--cwd", "/tmp")))
        assert sorted(r.stdout.decode().split("\n")) == sorted(["", PATH_ENV, "A=b c"]), r
        r = await g.run(agent_exec("sh", "-c", "id -un; pwd", opts=("--user", "nobody",
                                                                     "--cwd", "/")))
        assert r.stdout == b"nobody\n/\n", r
        r = await g.run(agent_exec("cat"), stdin=b"ignored")
        assert r.stdout == b"", r
        r = await g.run(agent_exec("cat", opts=("--stdin",)), stdin=b"piped")
        assert r.stdout == b"piped", r

        # identity from the appended cpio
        r = await g.run(agent_exec("sh", "-c", "hostname; cat /etc/machine-id /etc/hostname"))
        assert r.stdout.decode().split() == [g.hostname, g.machine_id, g.hostname], r

        # cgroups: a background process in a cgroup, killed with `agent kill`
        r = await g.run(agent_exec("sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!",
                                   opts=("--cgroup", "job1")))
        assert r.exit_status == 0, r
        pid = r.stdout.decode().strip()
        r = await g.run(agent_exec("cat", "/sys/fs/cgroup/localsbx/job1/cgroup.procs"))
        assert pid in r.stdout.decode().split(), r
        r = await g.run(agent("kill", "job1"))
        assert r.exit_status == 0, r
        r = await g.run(agent_exec("sh", "-c", f"test -e /proc/{pid} || "
                                   "test -e /sys/fs/cgroup/localsbx/job1 || echo gone"))
        assert r.stdout == b"gone\n", r
        # SIGTERM ignored (inherited SIG_IGN): --signal 15 escalates to SIGKILL after --timeout
        r = await g.run(agent_exec("sh", "-c", "trap '' TERM; sleep 1000 >/dev/null 2>&1 & echo $!",
                                   opts=("--cgroup", "job2")))
        pid = r.stdout.decode().strip()
        r = await g.run(agent("kill", "job2", "--signal", "15", "--timeout", "0.5"))
        assert r.exit_status == 0, r
        r = await g.run(agent_exec("sh", "-c", f"test -e /proc/{pid} || echo gone"))
        assert r.stdout == b"gone\n", r

        # PEP 668: pip refuses the system interpreter; a venv is the way
        r = await g.run(agent_exec("python3", "-m", "pip", "install", "six",
                                   opts=("--env", "HOME=/root")))
        assert r.exit_status != 0 and b"externally-managed-environment" in r.stderr, r
        # (a venv with pip works too, but ensurepip takes ~1.5 min under TCG: check the parts)
        r = await g.run(agent_exec("sh", "-c", "python3 -m venv --without-pip /tmp/v && "
                                   "/tmp/v/bin/python -c 'import ensurepip, sys; print(sys.prefix)'"))
        assert r.stdout == b"/tmp/v\n", r

        # kernel modules in the rootfs work
        r = await g.run(agent_exec("sh", "-c", "modprobe overlay && grep -w overlay "
                                   "/proc/filesystems"))
        assert r.exit_status == 0, r
        # no distribution sshd was left behind
        r = await g.run(agent_exec("sh", "-c", "dpkg -s dropbear-bin openssh-server 2>&1 | "
                                   "grep -c 'is not installed'"))
        assert r.stdout == b"2\n", r
        # apt as in Debian's container images: mmdebstrap's build-time options are gone
        r = await g.run(agent_exec("sh", "-c", "apt-config dump | grep -ci 'install-recommends \"\\(0\\|false\\)'; "
                                   "test -e /etc/apt/apt.conf.d/00mmdebstrap || echo ok"))
        assert r.stdout.split() == [b"0", b"ok"], r

        # put / get / sync
        r = await g.run(agent("put", "/root/dir/f.txt", "--mode", "600"), stdin=b"data\0\n")
        assert r.exit_status == 0, r
        r = await g.run(agent("get", "/root/dir/f.txt"))
        assert r.stdout == b"data\0\n", r
        r = await g.run(agent_exec("stat", "-c", "%a", "/root/dir/f.txt"))
        assert r.stdout == b"600\n", r
        r = await g.run(agent("get", "/nonexistent"))
        assert r.exit_status == 1 and r.stderr.startswith(b"localsbx: get"), r
        r = await g.run(agent("sync"))
        assert r.exit_status == 0, r

        # fixup: clock and CRNG reseed
        target = time.time_ns() + 3600 * 10**9
        r = await g.run(agent("fixup", "--time-ns", str(target), "--entropy",
                              secrets.token_hex(32)))
        assert r.exit_status == 0, r
        r = await g.run(agent_exec("date", "+%s"))
        assert abs(int(r.stdout) - target // 10**9) < 30, r

        # poweroff: QEMU exits by itself
        t = time.monotonic()
        r = await g.run(agent("poweroff"))
        assert r.exit_status == 0, r
        assert g.proc is not None
        async with asyncio.timeout(60):
            rc = await g.proc.wait()
        print(f"poweroff: QEMU exited {rc} after {time.monotonic() - t:.2f} s")
        assert rc == 0
        assert "localsbx-init:" not in g.console()
    finally:
        await g.stop()


async def test_probe_cmdline(base, tmp_path):
    """``localsbx.probe=1``: /init prints LOCALSBX-PROBE-OK and powers off at once."""
    serial = tmp_path / "serial.log"
    argv = [
        "qemu-system-x86_64", "-M", "microvm", "-accel", "tcg,tb-size=64", "-cpu", "max",
        "-m", "256M", "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
        "-serial", f"file:{serial}", "-kernel", str(base.kernel), "-initrd", str(base.initrd),
        "-append", f"{CMDLINE} tsc_early_khz={host_tsc_khz()} localsbx.probe=1",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.DEVNULL)
    try:
        t = time.monotonic()
        async with asyncio.timeout(60):
            rc = await proc.wait()
        print(f"\nprobe boot: {time.monotonic() - t:.2f} s")
        assert rc == 0
        assert "LOCALSBX-PROBE-OK" in serial.read_text(errors="replace")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-m", "vm", "-s", *sys.argv[1:]]))
