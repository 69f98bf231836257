"""The host side of a guest's network: what runs next to QEMU, and what QEMU's argv needs.

The guest's view never changes (``localsbx/guest/init.sh``, baked into every base): eth0 is
``10.0.2.15/24``, the default gateway ``10.0.2.2``, the resolver ``10.0.2.3``, the guest MAC
:data:`GUEST_MAC`. Two host-side backends give it that view:

* ``passt`` (default, internet on): a ``passt`` process per VM, started before QEMU, in the
  foreground (``-f``) and one-off (``-1``: it exits when its QEMU disconnects), reached by
  QEMU through ``-netdev stream`` on a UNIX socket. ``--no-map-gw`` stops it from mapping the
  gateway address to the host's loopback (QEMU user networking maps ``10.0.2.2`` to
  ``127.0.0.1``: every service the host binds on loopback answered the guest). IPv4 only
  (``-4``: no router advertisements, so the guest never gets an IPv6 route to ``::1``), no
  DHCP (the guest is configured statically), DNS sent to ``10.0.2.3`` is forwarded to the
  host's resolver, no UDP port forwards, and one TCP forward ``127.0.0.1:PORT`` → guest
  port 10022 (the management SSH server). passt answers ARP with the fixed MAC
  :data:`GATEWAY_MAC` (QEMU user networking's MAC for ``10.0.2.2``), so the guest's ARP
  entry stays valid across snapshot and restore whichever backend took the snapshot.
* ``slirp`` with ``restrict=on`` (internet off): QEMU user networking isolated from the
  host: no guest-initiated connection, DNS included, leaves QEMU; the ``hostfwd`` to the
  management port still works. Nothing to start; the host port is read back from QEMU
  (``info usernet``), so there is no port race.

Known limit (measured, passt 0.0~git20230309 of Debian 12): a guest that crafts raw frames
(root with an ``AF_PACKET`` socket, or ``route_localnet``) addressed to ``127.0.0.1`` still
reaches the host's loopback through passt; only passt releases that refuse loopback
destinations close it (see ``tests/unit/test_net.py::test_raw_frame_to_loopback``). The
no-internet mode (slirp ``restrict=on``) drops such frames too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from localsbx.errors import VMLaunchError

log = logging.getLogger("localsbx.vm")

#: The guest's address, prefix, gateway and resolver (fixed by the guest init).
GUEST_ADDR = "10.0.2.15"
GUEST_PREFIX = 24
GATEWAY = "10.0.2.2"
DNS = "10.0.2.3"
#: The guest NIC's MAC (QEMU's default for the first NIC, now explicit on the device).
GUEST_MAC = "52:54:00:12:34:56"
#: The MAC the guest sees for the gateway: QEMU user networking's (52:55 + 10.0.2.2);
#: passt is told to use the same one (``-M``).
GATEWAY_MAC = "52:55:0a:00:02:02"
#: Guest TCP port of localsbx's own SSH server (same as ``qemu.GUEST_SSH_PORT``).
GUEST_SSH_PORT = 10022
PASST_BINARY = "passt"
#: Seconds to wait for passt's socket and port forward.
START_TIMEOUT = 10.0

BACKENDS = ("auto", "passt", "slirp")


@dataclass(frozen=True)
class NetSpec:
    """What network a guest gets (host side only: the guest's view is always the same).

    :param internet: ``True``: outbound connections and DNS work (Tensorlake's
        ``allow_internet_access=True``); ``False``: all egress is cut, DNS included, and
        only the host reaches the guest's management port.
    :param backend: ``"auto"`` (passt with internet, restricted QEMU user networking
        without), ``"passt"`` or ``"slirp"``. ``"slirp"`` with ``internet=True`` is refused:
        it maps ``10.0.2.2`` to the host's loopback. ``"passt"`` with ``internet=False`` is
        refused: this passt cannot cut egress.
    :raises ValueError: an unknown backend or one of the refused combinations.
    """

    internet: bool = True
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown network backend {self.backend!r} (one of {BACKENDS})")
        if self.backend == "slirp" and self.internet:
            raise ValueError("QEMU user networking (slirp) with internet maps 10.0.2.2 to the "
                             "host's loopback; use the passt backend")
        if self.backend == "passt" and not self.internet:
            raise ValueError("passt cannot cut egress; no-internet VMs use the slirp backend")

    @property
    def kind(self) -> str:
        """The backend actually used: ``"passt"`` or ``"slirp"``."""
        if self.backend != "auto":
            return self.backend
        return "passt" if self.internet else "slirp"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel's pick; may be taken before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def passt_argv(socket_path: Path, host_port: int, *, binary: str = PASST_BINARY) -> list[str]:
    """The passt command for one VM. Pure.

    :param socket_path: the UNIX socket passt listens on (QEMU connects to it).
    :param host_port: TCP port on 127.0.0.1 forwarded to guest port 10022.
    :returns: argv starting with ``binary``.
    """
    return [
        binary, "-f", "-e", "-1", "-4",
        "-s", str(socket_path),
        "-a", GUEST_ADDR, "-n", str(GUEST_PREFIX), "-g", GATEWAY,
        "-M", GATEWAY_MAC,
        "--no-map-gw", "--no-dhcp",
        "--dns-forward", DNS,
        "-t", f"127.0.0.1/{host_port}:{GUEST_SSH_PORT}",
        "-u", "none",
    ]  # fmt: skip


def netdev_arg(net: NetSpec, *, socket_path: Path | None) -> str:
    """QEMU's ``-netdev`` value (id ``n0``) for ``net``. Pure.

    :param socket_path: passt's socket (required for the passt backend).
    :raises ValueError: passt without a socket path (start the network first).
    """
    if net.kind == "passt":
        if socket_path is None:
            raise ValueError("the passt backend needs its socket path (start_network first)")
        return ",".join(["stream", "id=n0", "server=off", "addr.type=unix",
                         "addr.path=" + str(socket_path).replace(",", ",,")])
    # slirp: restrict=on cuts every guest-initiated connection (DNS too); hostfwd stays.
    return f"user,id=n0,restrict=on,ipv6=off,hostfwd=tcp:127.0.0.1:0-:{GUEST_SSH_PORT}"


def device_arg() -> str:
    """QEMU's ``-device`` value of the guest NIC (guest-visible, the same for every backend)."""
    return f"virtio-net-device,netdev=n0,mac={GUEST_MAC}"


@dataclass
class NetHandle:
    """The running host side of one VM's network (from :func:`start_network`).

    :param host_port: the host port (127.0.0.1) forwarded to the guest's port 10022, or 0
        when QEMU picks it (slirp: read it back with ``info usernet``).
    :param socket_path: passt's socket, ``None`` for slirp.
    """

    net: NetSpec
    host_port: int = 0
    socket_path: Path | None = None
    proc: asyncio.subprocess.Process | None = None
    argv: list[str] = field(default_factory=list)
    log_path: Path | None = None
    own_dir: Path | None = None  # the private /tmp folder holding the socket


_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:  # in the child between fork and exec
    _libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _socket_dir() -> Path:
    """A private folder for passt's socket, under /tmp: passt must reach it after dropping
    privileges (as root it runs as ``nobody``, which cannot traverse ``/root/...``), and the
    path must fit AF_UNIX's 108 bytes. Mode 0700, owned by the user passt runs as (root
    still connects)."""
    d = Path(tempfile.mkdtemp(prefix=f"lsbx-net-{os.getpid()}-", dir="/tmp"))
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError, OSError):
            pw = pwd.getpwnam("nobody")
            os.chown(d, pw.pw_uid, pw.pw_gid)
    return d


def _listening(port: int, pid: int) -> bool:
    """Whether process ``pid`` holds a socket listening on 127.0.0.1:``port``."""
    want = f"0100007F:{port:04X}"
    inodes = set()
    try:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            f = line.split()
            if f[1] == want and f[3] == "0A":  # LISTEN
                inodes.add(f"socket:[{f[9]}]")
        if not inodes:
            return False
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return True
    except OSError:
        return False
    return False


def _tail(path: Path | None, lines: int = 15) -> str:
    if path is None:
        return ""
    try:
        text = path.read_bytes().decode(errors="replace").splitlines()
    except OSError:
        return ""
    text = [t for t in text if t.strip() and not t.startswith("Failed to send")]  # no syslog here
    return "\n".join(text[-lines:])


async def start_network(net: NetSpec, *, workdir: Path, detached: bool = False,
                        timeout: float = START_TIMEOUT, binary: str = PASST_BINARY,
                        attempts: int = 3) -> NetHandle:
    """Start the host side of a VM's network, before QEMU.

    For passt: pick a free port on 127.0.0.1, start passt (its stderr goes to
    ``workdir/passt.log``, its pid to ``workdir/passt.pid`` as ``"PID START_TIME"``), and wait
    until its socket exists and it listens on the port; a port taken in between is retried
    with another one (``attempts`` times). For slirp: nothing to start.

    :param workdir: the VM's folder (created if missing).
    :param detached: passt outlives this process (with a detached QEMU); otherwise it gets a
        parent-death SIGKILL. Either way it exits when its QEMU disconnects (``-1``).
    :param timeout: seconds per attempt to wait for the socket and the forward.
    :returns: a :class:`NetHandle`; give it to :func:`stop_network` when done.
    :raises VMLaunchError: passt is missing, exited, or was not ready in time (the message
        names the command, its return code and its stderr tail); nothing is left running.
    """
    if net.kind == "slirp":
        return NetHandle(net)
    if shutil.which(binary) is None:
        raise VMLaunchError(f"{binary} is not installed", hint="apt-get install passt (or `make setup`)")
    workdir.mkdir(parents=True, exist_ok=True)
    sock_dir = _socket_dir()
    # recorded, so whoever cleans up the VM's folder removes this one too
    (workdir / "passt.dir").write_text(f"{sock_dir}\n")
    h = NetHandle(net, socket_path=sock_dir / "passt.sock", log_path=workdir / "passt.log",
                  own_dir=sock_dir)
    try:
        for attempt in range(attempts):
            h.host_port = free_port()
            h.argv = passt_argv(h.socket_path, h.host_port, binary=binary)
            with contextlib.suppress(FileNotFoundError):
                h.socket_path.unlink()
            log.debug("+ %s", shlex.join(h.argv))
            err = os.open(h.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                h.proc = await asyncio.create_subprocess_exec(
                    *h.argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                    start_new_session=True, preexec_fn=None if detached else _die_with_parent)
            finally:
                os.close(err)
            with contextlib.suppress(OSError):
                from localsbx.vm.qemu import proc_start_time

                (workdir / "passt.pid").write_text(f"{h.proc.pid} {proc_start_time(h.proc.pid)}")
            why = await _wait_ready(h, timeout)
            if why is None:
                return h
            await _kill(h)
            if "port" not in why or attempt == attempts - 1:
                raise VMLaunchError(f"passt did not start: {why}\ncommand: {shlex.join(h.argv)}",
                                    argv=h.argv, log_tail=_tail(h.log_path))
            log.debug("passt: %s; retrying with another port", why)
    except BaseException:
        await stop_network(h)
        raise
    raise AssertionError("unreachable")


async def _wait_ready(h: NetHandle, timeout: float) -> str | None:
    """``None`` once passt's socket exists and it listens on the port; else why not."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    assert h.proc is not None and h.socket_path is not None
    while True:
        if h.proc.returncode is not None:
            return f"it exited with status {h.proc.returncode}"
        if h.socket_path.exists():
            if _listening(h.host_port, h.proc.pid):
                return None
            if "Failed to bind" in _tail(h.log_path, 50) or loop.time() > deadline:
                return f"it does not listen on 127.0.0.1:{h.host_port} (port taken?)"
        elif loop.time() > deadline:
            return f"its socket {h.socket_path} did not appear within {timeout:.0f} s"
        await asyncio.sleep(0.01)


async def _kill(h: NetHandle, timeout: float = 2.0) -> None:
    proc = h.proc
    if proc is None or proc.returncode is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
            return
        except TimeoutError:
            continue
    log.warning("passt pid %s did not exit after SIGKILL", proc.pid)


async def stop_network(h: NetHandle | None, *, timeout: float = 2.0) -> None:
    """Stop the host side of a VM's network for sure (after its QEMU). Idempotent.

    passt normally exits by itself when QEMU goes (``-1``); otherwise SIGTERM, then SIGKILL,
    each waiting at most ``timeout`` seconds. Its socket (and a private /tmp folder) is removed.
    """
    if h is None:
        return
    if h.proc is not None and h.proc.returncode is None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.2):  # QEMU just went: passt is exiting by itself
                await h.proc.wait()
    await _kill(h, timeout)
    if h.socket_path is not None:
        with contextlib.suppress(FileNotFoundError):
            h.socket_path.unlink()
    if h.own_dir is not None:
        shutil.rmtree(h.own_dir, ignore_errors=True)
