"""Guests reach package indexes through QEMU user networking (B17 Dockerfile.fixed).
Costs about a minute under TCG: pip is slow there."""

import pytest

from localsbx import Sandbox, store

from .conftest import IMAGES, build

pytestmark = pytest.mark.vm


def test_pip_install_with_break_system_packages(base_ready):
    build(IMAGES / "net" / "Dockerfile", "t-net")
    try:
        with Sandbox.create("t-net") as sb:
            r = sb.run("python3", ["-c", "import six; print('six', six.__version__)"])
            assert r.exit_code == 0, r.stderr
            assert r.stdout.startswith("six 1.")
            assert sb.run("ls /usr/lib/python3*/EXTERNALLY-MANAGED").exit_code == 0
    finally:
        store.remove_image("t-net")


# ---- host-side isolation (localsbx/vm/net.py) ---------------------------------------------

HTTP_PROBE = r"""
import sys, urllib.request
for url in sys.argv[1:]:
    try:
        body = urllib.request.urlopen(url, timeout=5).read().decode(errors="replace")
        print(url, "BODY", body[:200])
    except Exception as exc:
        print(url, "ERROR", type(exc).__name__, exc)
"""
PYPI = "https://pypi.org/simple/six/"


@pytest.fixture
def loopback_service(tmp_path):
    """``python3 -m http.server --bind 127.0.0.1 PORT`` on the host serving a secret token;
    yields ``(port, token, log_path)``."""
    import secrets
    import socket
    import subprocess
    import time

    token = secrets.token_hex(16)
    root = tmp_path / "www"
    root.mkdir()
    (root / "token").write_text(token)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "http.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["python3", "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                                cwd=root, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 10
        while True:  # up, and really serving the token to the host itself
            try:
                import urllib.request
                assert urllib.request.urlopen(f"http://127.0.0.1:{port}/token",
                                              timeout=2).read().decode() == token
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield port, token, log
    finally:
        proc.kill()
        proc.wait()


def _boot(base, workdir, net, client_key):
    """Cold-boot the base with ``net`` (Machine.cold_boot has no ``net=`` yet: its VMSpec is
    given the NetSpec)."""
    from localsbx.vm import disk as vmdisk
    from localsbx.vm import machine
    from localsbx.vm.accel import choose_accel

    async def go():
        accel = await choose_accel(base.kernel, base.initrd)
        workdir.mkdir(parents=True, exist_ok=True)
        disk = workdir / "overlay.qcow2"
        await vmdisk.create_overlay(disk, base.rootfs)
        return await machine.Machine.cold_boot(
            kernel=base.kernel, initrd=base.initrd, disk=disk, workdir=workdir, accel=accel,
            client_key=client_key, cpus=1, memory_mib=1024, name="localsbx-nettest", net=net)
    return go()


def _run(m, script, *args, timeout=60):
    async def go():
        r = await m.guest.exec(["python3", "-c", script, *args], timeout=timeout)
        return r.exit_status, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    return go()


def test_guest_cannot_reach_host_loopback_but_reaches_pypi(base_ready, tmp_path, loopback_service):
    import asyncio

    import asyncssh

    from localsbx.vm.net import NetSpec

    port, token, log = loopback_service

    async def go():
        m = await _boot(base_ready, tmp_path / "vm", NetSpec(), asyncssh.generate_private_key("ssh-ed25519"))
        try:
            assert m.qemu.spec.net.kind == "passt"
            rc, out, err = await _run(m, HTTP_PROBE, f"http://10.0.2.2:{port}/token",
                                      f"http://127.0.0.1:{port}/token", PYPI)
            assert rc == 0, err
            # /dev/tcp as well (bash is not in the base; python's raw socket connect instead)
            raw = await _run(m, "import socket,sys\n"
                                      "try:\n socket.create_connection(('10.0.2.2', int(sys.argv[1])),"
                                      " 3).sendall(b'GET /token HTTP/1.0\\r\\n\\r\\n'); print('sent')\n"
                                      "except OSError as e: print('refused', e)", str(port))
            return out, raw
        finally:
            await m.stop()
    out, raw = asyncio.run(go())
    assert raw[0] == 0, raw
    assert token not in out, out
    lines = {ln.split(" ", 1)[0]: ln for ln in out.splitlines()}
    assert "BODY" in lines[PYPI], out  # the default guest still has the internet
    assert "ERROR" in lines[f"http://127.0.0.1:{port}/token"], out
    # the host's loopback service never saw a request from the guest (only our own probe)
    hits = [ln for ln in log.read_text().splitlines() if "GET /token" in ln]
    assert len(hits) == 1, hits


def test_no_internet_guest_has_no_egress_nor_dns(base_ready, tmp_path, loopback_service):
    import asyncio

    import asyncssh

    from localsbx.vm.net import NetSpec

    port, _token, log = loopback_service

    async def go():
        m = await _boot(base_ready, tmp_path / "vm", NetSpec(internet=False),
                        asyncssh.generate_private_key("ssh-ed25519"))
        try:
            assert m.qemu.spec.net.kind == "slirp"
            r = await m.guest.exec(["/bin/sh", "-c", "echo managed; uname -s"], timeout=30)
            assert (r.exit_status, r.stdout) == (0, b"managed\nLinux\n")  # the management port works
            web = await _run(m, HTTP_PROBE, PYPI, "http://151.101.0.223/",
                             f"http://10.0.2.2:{port}/token")
            dns = await _run(m, "import socket\ntry:\n print(socket.gethostbyname('pypi.org'))\n"
                             "except OSError as e:\n print('NODNS', e)")
            udp = await _run(m, "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                             "s.settimeout(3)\nq=bytes.fromhex('12340100000100000000000004707970"
                             "69036f72670000010001')\ns.sendto(q,('10.0.2.3',53))\n"
                             "try:\n s.recv(512); print('ANSWER')\nexcept OSError as e:\n print('NOANSWER', e)")
            return web, dns, udp
        finally:
            await m.stop()
    web, dns, udp = asyncio.run(go())
    assert web[0] == 0, web
    assert web[1].count("ERROR") == 3 and "BODY" not in web[1], web[1]
    assert "NODNS" in dns[1], dns
    assert "NOANSWER" in udp[1], udp  # a raw query to the guest's resolver gets nothing back
    assert len([ln for ln in log.read_text().splitlines() if "GET /token" in ln]) == 1


def test_no_helper_left_after_vms(base_ready, tmp_path):
    """Every passt this test started is gone once its VM stops (and after a failed start)."""
    import asyncio

    import asyncssh

    from localsbx.vm.net import NetSpec
    from localsbx.vm.qemu import pid_alive

    async def go():
        m = await _boot(base_ready, tmp_path / "vm", NetSpec(), asyncssh.generate_private_key("ssh-ed25519"))
        h = m.qemu.net
        assert h is not None and pid_alive(h.proc.pid)
        await m.stop()
        return h
    h = asyncio.run(go())
    assert not pid_alive(h.proc.pid)
    assert not h.own_dir.exists()


# ---- egress lists: allow_out / deny_out (passt in its own filtered namespace) --------------

def _host_addr() -> str | None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
            a = s.getsockname()[0]
        except OSError:
            return None
    return None if a.startswith("127.") else a


@pytest.fixture
def host_service(tmp_path):
    """An HTTP server on the host's own non-loopback address (which a passt guest reaches):
    a second destination next to the package mirror, at another address."""
    import secrets
    import socket
    import subprocess
    import time
    import urllib.request

    host = _host_addr()
    if host is None:
        pytest.skip("no non-loopback IPv4 address on this host")
    root = tmp_path / "www"
    root.mkdir()
    token = secrets.token_hex(8)
    (root / "token").write_text(token)
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["python3", "-m", "http.server", "--bind", host, str(port)],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert urllib.request.urlopen(f"http://{host}:{port}/token", timeout=2) \
                    .read().decode() == token
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield host, f"http://{host}:{port}/token", token
    finally:
        proc.kill()
        proc.wait()


def _probe(sb, *urls):
    r = sb.run("python3", ["-c", HTTP_PROBE, *urls], timeout=60)
    assert r.exit_code == 0, r.stderr
    return {ln.split(" ", 1)[0]: ln for ln in r.stdout.splitlines()}


def _dns(sb, name="pypi.org"):
    r = sb.run("python3", ["-c", "import socket,sys\ntry:\n print(socket.gethostbyname(sys.argv[1]))"
                                 "\nexcept OSError as e:\n print('NODNS', e)", name], timeout=60)
    return r.stdout.strip()


def test_allow_out_lets_only_listed_destinations_out_also_after_resume(base_ready, host_service):
    import time
    import urllib.request

    host, url, token = host_service
    sb = Sandbox.create("debian-minimal", allow_out=[host], timeout_secs=300,
                        exposed_ports=[8000])
    try:
        rec = store.read_sandbox(sb.sandbox_id)
        assert (rec.allow_out, rec.allow_nets, rec.deny_out) == ([host], [f"{host}/32"], [])
        sb.run("sh", ["-c", "echo exposed > /tmp/x; (setsid python3 -m http.server 8000 -d /tmp "
                            ">/dev/null 2>&1 &)"])
        for phase in ("fresh", "resumed"):
            got = _probe(sb, url, PYPI)
            assert token in got[url], (phase, got)  # the listed address gets through
            assert "ERROR" in got[PYPI] and "BODY" not in got[PYPI], (phase, got)  # not listed
            assert _dns(sb)[0].isdigit(), phase  # the resolver is implicitly allowed
            deadline = time.monotonic() + 20
            while True:  # an exposed port works whatever the filter
                try:
                    body = urllib.request.urlopen(f"http://127.0.0.1:{sb.ports[8000]}/x",
                                                  timeout=5).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.3)
            assert body == b"exposed\n", phase
            if phase == "fresh":
                sb.suspend()
                sb.resume()
    finally:
        sb.terminate()


def test_deny_out_blocks_a_name_while_others_work_and_outlives_its_supervisor(base_ready,
                                                                             host_service):
    """Also: SIGKILL of the supervisor keeps the filter (the guest runs on, the next client
    attaches), and terminating leaves no pasta/passt (nor their namespace) behind."""
    import os
    import signal
    import time

    from localsbx.vm import net
    from localsbx.vm.qemu import pid_alive

    host, url, token = host_service
    sb = Sandbox.create("debian-minimal", deny_out=["pypi.org"], timeout_secs=300)
    try:
        got = _probe(sb, PYPI, url)
        assert "ERROR" in got[PYPI] and "BODY" not in got[PYPI], got
        assert token in got[url], got
        rec = store.read_sandbox(sb.sandbox_id)
        launcher = int((rec.dir / "passt.pid").read_text().split()[0])
        helpers = [launcher, *net._children(launcher)]
        assert sorted(net._children(launcher).values()) == ["passt", "pasta"]
        os.kill(rec.supervisor_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid_alive(rec.supervisor_pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # the kill is asynchronous
        again = Sandbox.connect(sb.sandbox_id)  # a new supervisor attaches
        got = _probe(again, url, PYPI)
        assert token in got[url] and "ERROR" in got[PYPI], got
    finally:
        sb.terminate()
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(p) for p in helpers)
