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
* ``passt`` *filtered* (``allow_out``/``deny_out``, Tensorlake's egress lists; semantics in
  :func:`egress_ruleset`): the same passt, run in its own user + network namespace whose
  only way out is a ``pasta`` attached to it, with an nftables rule set there filtering
  passt's outgoing sockets by destination (:data:`EGRESS_LAUNCHER`). Host names are
  resolved on the host when the sandbox is created (:func:`resolve_egress`). Host-side:
  the guest can neither see nor change the rules.

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
import ipaddress
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from localsbx.errors import ConfigError, VMLaunchError

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


def check_guest_port(port) -> int:
    """A guest TCP port that may be exposed (forwarded to the host): 1-65535 and not
    :data:`GUEST_SSH_PORT` (a forward to it would hand the host's users the sandbox's
    control channel; the server's tunnels refuse it too).

    :raises ConfigError: otherwise (says which rule).
    """
    try:
        p = int(port)
    except (TypeError, ValueError):
        raise ConfigError(f"port {port!r}: not a number") from None
    if not 1 <= p <= 65535 or isinstance(port, bool):
        raise ConfigError(f"port {port}: must be 1-65535")
    if p == GUEST_SSH_PORT:
        raise ConfigError(f"port {p}: the sandbox's management SSH port cannot be exposed",
                          hint="serve on another guest port")
    return p

#: Seconds to wait for passt's socket and port forward.
START_TIMEOUT = 10.0

BACKENDS = ("auto", "passt", "slirp")


@dataclass(frozen=True)
class NetSpec:
    """What network a guest gets (host side only: the guest's view is always the same).

    :param internet: ``True``: outbound connections and DNS work (Tensorlake's
        ``allow_internet_access=True``); ``False``: all egress is cut, DNS included, and
        only the host reaches the guest's management port.
    :param backend: ``"auto"`` (passt with internet or a filter, restricted QEMU user networking
        without), ``"passt"`` or ``"slirp"``. ``"slirp"`` with ``internet=True`` is refused:
        it maps ``10.0.2.2`` to the host's loopback. ``"passt"`` with ``internet=False`` is
        refused (unless filtered): this passt cannot cut egress.
    :param allow_out: Tensorlake's ``network.allow_out`` *resolved* to IPv4 networks
        (:func:`resolve_egress`); semantics in :func:`egress_ruleset`.
    :param deny_out: ``network.deny_out``, resolved the same way.
    :raises ValueError: an unknown backend, a list entry that is not an IPv4 network, or one
        of the refused combinations.
    """

    internet: bool = True
    backend: str = "auto"
    allow_out: tuple[str, ...] = ()
    deny_out: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown network backend {self.backend!r} (one of {BACKENDS})")
        for n in (*self.allow_out, *self.deny_out):
            ipaddress.IPv4Network(n)  # resolved networks only (see resolve_egress)
        if self.backend == "slirp" and (self.internet or self.filtered):
            raise ValueError("QEMU user networking (slirp) with internet maps 10.0.2.2 to the "
                             "host's loopback; use the passt backend")
        if self.backend == "passt" and not self.internet and not self.filtered:
            raise ValueError("passt cannot cut egress; no-internet VMs use the slirp backend")

    @property
    def filtered(self) -> bool:
        """Whether an egress filter applies (passt in its own namespace, see
        :func:`egress_ruleset`): a non-empty ``allow_out``, or a ``deny_out`` with internet
        (without internet and without ``allow_out`` nothing gets out anyway)."""
        return bool(self.allow_out) or (self.internet and bool(self.deny_out))

    @property
    def kind(self) -> str:
        """The backend actually used: ``"passt"`` or ``"slirp"``."""
        if self.backend != "auto":
            return self.backend
        return "passt" if self.internet or self.filtered else "slirp"


# ---- egress lists (Tensorlake's network.allow_out / deny_out) -----------------------------

_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*\.?$")
#: Where the filtered passt's namespace sits on pasta's side (RFC 2544 benchmarking range:
#: not routed anywhere, so no real destination is shadowed by it).
NS_ADDR, NS_PREFIX, NS_GATEWAY = "198.18.255.2", 24, "198.18.255.1"
PASTA_BINARY = "pasta"
NFT_BINARY = "nft"


@dataclass(frozen=True)
class EgressEntry:
    """One ``allow_out``/``deny_out`` entry, parsed: ``kind`` ``"net"`` (``value`` an IPv4
    network, a single address as ``/32``) or ``"host"`` (``value`` a lower-case host name)."""

    kind: str
    value: str


def parse_egress_entry(entry: str, what: str = "egress") -> EgressEntry:
    """Parse one entry the way Tensorlake documents it: an IPv4 address, an IPv4 CIDR or a
    DNS host name, with an optional ``:port`` suffix that is accepted and ignored (the rule
    is not port-specific). Pure.

    :raises ConfigError: anything else (IPv6, a wildcard, a URL, an empty string, a CIDR
        with host bits set, a bad port), with the entry in the message.
    """
    from localsbx.errors import ConfigError

    raw = entry
    if not isinstance(entry, str) or not entry.strip():
        raise ConfigError(f"{what} entry {entry!r}: empty",
                          hint="an IPv4 address, a CIDR (10.0.0.0/8) or a host name")
    s = entry.strip()
    if "://" in s or "@" in s or s.endswith("/"):
        raise ConfigError(f"{what} entry {raw!r}: a URL, not a destination",
                          hint="give the host name alone (api.example.com), an IPv4 address "
                               "or a CIDR")
    if s.count(":") == 1:  # host:port, 1.2.3.4:443, 10.0.0.0/8:443
        s, port = s.rsplit(":", 1)
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{what} entry {raw!r}: bad port {port!r}",
                              hint="the :port suffix must be 1-65535 (it is ignored anyway)")
    elif ":" in s:
        raise ConfigError(f"{what} entry {raw!r}: IPv6 is not supported",
                          hint="localsbx guests are IPv4-only; give IPv4 addresses, CIDRs "
                               "or host names")
    try:
        netw = ipaddress.IPv4Network(s, strict=True)
        return EgressEntry("net", str(netw))
    except ValueError as e:
        if "/" in s or s.replace(".", "").isdigit():
            raise ConfigError(f"{what} entry {raw!r}: not an IPv4 address or CIDR ({e})",
                              hint="e.g. 8.8.8.8, 10.0.0.0/8 (no host bits), api.example.com"
                              ) from None
    if not _HOSTNAME_RE.match(s) or len(s.rstrip(".")) > 253:
        raise ConfigError(f"{what} entry {raw!r}: not an IPv4 address, a CIDR or a host name",
                          hint="e.g. 8.8.8.8, 10.0.0.0/8, api.example.com (no scheme, path "
                               "or wildcard)")
    return EgressEntry("host", s.rstrip(".").lower())


def resolve_egress(entries, *, what: str = "egress", resolve=None) -> tuple[str, ...]:
    """Turn ``allow_out``/``deny_out`` entries into IPv4 networks, resolving host names on
    the host now (every A record of the name, as ``/32``). Sorted, without duplicates.

    :param what: the list's name in messages (``allow_out``, ``deny_out``).
    :param resolve: ``name -> list of IPv4 addresses`` (default: ``getaddrinfo``); tests
        pass their own.
    :raises ConfigError: a bad entry (:func:`parse_egress_entry`) or a name that does not
        resolve to any IPv4 address.
    """
    from localsbx.errors import ConfigError

    resolve = resolve or _resolve_host
    out: set[ipaddress.IPv4Network] = set()
    for entry in entries:
        e = parse_egress_entry(entry, what)
        if e.kind == "net":
            out.add(ipaddress.IPv4Network(e.value))
            continue
        try:
            addrs = resolve(e.value)
        except OSError as err:
            raise ConfigError(f"{what} entry {entry!r}: the host name does not resolve ({err})",
                              hint="host names are resolved on the host when the sandbox is "
                                   "created; check the name or give its addresses") from None
        if not addrs:
            raise ConfigError(f"{what} entry {entry!r}: the host name has no IPv4 address",
                              hint="localsbx guests are IPv4-only")
        out.update(ipaddress.IPv4Network(a) for a in addrs)
    return tuple(str(n) for n in sorted(out))


def _resolve_host(name: str) -> list[str]:
    infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    return sorted({i[4][0] for i in infos})


def host_resolvers(path: Path = Path("/etc/resolv.conf")) -> tuple[str, ...]:
    """The host's IPv4 name servers (what passt forwards the guest's ``10.0.2.3`` to)."""
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            f = line.split()
            if len(f) >= 2 and f[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    out.append(str(ipaddress.IPv4Address(f[1])))
    return tuple(dict.fromkeys(out))


def _covers(nets, addrs) -> bool:
    ns = [ipaddress.IPv4Network(n) for n in nets]
    return any(ipaddress.IPv4Address(a) in n for n in ns for a in addrs)


def _elements(nets) -> str:
    """An nft set's elements: overlapping networks merged (nft refuses overlaps)."""
    merged = ipaddress.collapse_addresses(ipaddress.IPv4Network(n) for n in nets)
    return ", ".join(str(n) for n in merged)


def egress_ruleset(net: NetSpec, resolvers: tuple[str, ...]) -> str:
    """The nftables rule set of a filtered VM, loaded in the network namespace of its passt
    (so it sees passt's own outgoing sockets; the guest cannot touch it). Pure.

    Tensorlake's semantics (``tensorlake`` 0.5.163, ``NetworkConfig`` docstring and
    ``Sandbox.create``'s ``allow_internet_access``/``allow_out``/``deny_out``):

    * ``deny_out`` wins over ``allow_out``; established and related traffic always passes
      (stateful).
    * ``allow_out`` empty: ``allow_internet_access=True`` lets everything out except
      ``deny_out``; ``False`` blocks all egress, DNS included (that is the slirp backend,
      never this rule set).
    * ``allow_out`` non-empty: default deny in both modes, only the listed destinations get
      out. ``allow_internet_access`` then only decides DNS: ``True`` implicitly allows the
      sandbox's resolver, ``False`` allows it only if ``allow_out`` lists it (the guest's
      ``10.0.2.3`` or the host's name server passt forwards to).
    * a ``deny_out`` covering the resolver disables DNS even if ``allow_out`` also covers it.

    Refused traffic gets a TCP reset or an ICMP "administratively prohibited", so a
    connection fails at once instead of hanging. IPv6 is dropped (passt runs ``-4``).
    """
    guest_dns = (DNS, *resolvers)
    if _covers(net.deny_out, guest_dns):
        dns = False
    elif net.allow_out:
        dns = net.internet or _covers(net.allow_out, guest_dns)
    else:
        dns = net.internet
    lines = [
        "table inet localsbx_egress {",
        "  chain out {",
        "    type filter hook output priority filter; policy drop;",
        '    oif "lo" accept',
        "    meta nfproto ipv6 drop",
        "    ct state established,related accept",
    ]
    refuse = ("meta l4proto tcp reject with tcp reset; "
              "reject with icmpx type admin-prohibited")
    if net.deny_out:
        lines.append(f"    ip daddr {{ {_elements(net.deny_out)} }} jump refuse")
    if dns and resolvers:
        lines.append(f"    ip daddr {{ {', '.join(resolvers)} }} meta l4proto {{ udp, tcp }} "
                     "th dport 53 accept")
    if net.allow_out:
        lines.append(f"    ip daddr {{ {_elements(net.allow_out)} }} accept")
    elif net.internet:
        lines.append("    accept")
    lines += ["    jump refuse", "  }", "  chain refuse {"]
    lines += [f"    {r.strip()}" for r in refuse.split(";")]
    lines += ["  }", "}", ""]
    return "\n".join(lines)


#: The filtered passt's launcher (``sh -c``; $1 rules file, $2 host port, then passt's argv).
#: It is the process group leader and the pid in ``passt.pid``; its two children die with
#: it (``setpriv --pdeathsig KILL``), and it exits (stopping pasta) once passt exits.
#: 1. ``unshare`` a user + network namespace (root mapped to itself: no privilege beyond
#:    the caller's), wait there until pasta has configured it, load the rules, exec passt;
#: 2. once that process is in its own namespace, attach ``pasta`` to it: pasta is the
#:    namespace's only way out (``--no-map-gw``: its gateway is not the host's loopback;
#:    ``-T none -U none``: nothing of the namespace's loopback is spliced to the host's;
#:    ``-t 127.0.0.1/PORT``: the management forward, host loopback → namespace loopback).
EGRESS_LAUNCHER = r"""
rules=$1; port=$2; shift 2
setpriv --pdeathsig KILL unshare --user --map-root-user --net -- sh -c '
i=0
until ip -4 route show default 2>/dev/null | grep -q .; do
  i=$((i+1)); [ "$i" -gt 1000 ] && { echo "localsbx: the namespace got no route" >&2; exit 96; }
  sleep 0.01
done
nft -f "$0" || { echo "localsbx: nft could not load $0" >&2; exit 97; }
exec "$@"' "$rules" "$@" &
inner=$!
trap 'kill "$inner" "$outer" 2>/dev/null' TERM INT HUP
me=$(readlink /proc/self/ns/net)
i=0
until [ "$(readlink /proc/$inner/ns/net 2>/dev/null)" != "$me" ]; do
  i=$((i+1)); [ "$i" -gt 1000 ] && { kill -9 "$inner"; echo "localsbx: no namespace" >&2; exit 95; }
  sleep 0.01
done
setpriv --pdeathsig KILL __PASTA__ __RUNAS__-f -e -q -4 --config-net --no-map-gw \
  -a __NS_ADDR__ -n __NS_PREFIX__ -g __NS_GATEWAY__ \
  -t "127.0.0.1/$port" -T none -u none -U none "$inner" &
outer=$!
wait "$inner"; rc=$?
kill "$outer" 2>/dev/null; wait "$outer"
exit "$rc"
"""


def egress_argv(passt: list[str], rules_file: Path, host_port: int, *,
                pasta: str = PASTA_BINARY, root: bool | None = None) -> list[str]:
    """The command that runs ``passt`` (its argv) in its own filtered namespace. Pure but
    for ``root`` (default: whether we run as root; pasta then needs ``--runas 0``, or it
    would switch to ``nobody``, who may not enter the namespace)."""
    if root is None:
        root = os.geteuid() == 0
    script = (EGRESS_LAUNCHER.replace("__PASTA__", shlex.quote(pasta))
              .replace("__RUNAS__", "--runas 0 " if root else "")
              .replace("__NS_ADDR__", NS_ADDR).replace("__NS_PREFIX__", str(NS_PREFIX))
              .replace("__NS_GATEWAY__", NS_GATEWAY))
    return ["sh", "-c", script, "localsbx-egress", str(rules_file), str(host_port), *passt]


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


def _socket_dir(*, for_nobody: bool = True) -> Path:
    """A private folder for passt's socket, under /tmp: passt must reach it after dropping
    privileges (as root it runs as ``nobody``, which cannot traverse ``/root/...``), and the
    path must fit AF_UNIX's 108 bytes. Mode 0700, owned by the user passt runs as (root
    still connects). A filtered passt (``for_nobody=False``) runs as the caller, mapped to
    itself in its user namespace, and keeps the folder as it is."""
    d = Path(tempfile.mkdtemp(prefix=f"lsbx-net-{os.getpid()}-", dir="/tmp"))
    if os.geteuid() == 0 and for_nobody:
        with contextlib.suppress(KeyError, OSError):
            pw = pwd.getpwnam("nobody")
            os.chown(d, pw.pw_uid, pw.pw_gid)
    return d


def _children(pid: int) -> dict[int, str]:
    """The direct children of ``pid``: ``{pid: basename of argv[0]}``."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (p / "stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                out[int(p.name)] = os.path.basename((p / "cmdline").read_bytes()
                                                    .split(b"\0")[0].decode(errors="replace"))
    return out


def _listening(port: int, pid: int, *, own_netns: bool = False) -> bool:
    """Whether process ``pid`` holds a socket listening on 127.0.0.1:``port`` (in the host's
    network namespace, or with ``own_netns`` in the one of ``pid``)."""
    want = f"0100007F:{port:04X}"
    inodes = set()
    tcp = Path(f"/proc/{pid}/net/tcp") if own_netns else Path("/proc/net/tcp")
    try:
        for line in tcp.read_text().splitlines()[1:]:
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
    rules = None
    if net.filtered:
        for tool, pkg in ((PASTA_BINARY, "passt"), (NFT_BINARY, "nftables"),
                          ("unshare", "util-linux"), ("setpriv", "util-linux"),
                          ("ip", "iproute2")):
            if shutil.which(tool) is None:
                raise VMLaunchError(f"{tool} is not installed (needed for allow_out/deny_out)",
                                    hint=f"apt-get install {pkg} (or `make setup`)")
    workdir.mkdir(parents=True, exist_ok=True)
    if net.filtered:
        resolvers = host_resolvers()
        if resolvers and all(r.startswith("127.") for r in resolvers):
            log.warning("the host's only name servers are on its loopback (%s): a filtered "
                        "VM's namespace cannot reach them, so its guest has no DNS",
                        ", ".join(resolvers))
        rules = workdir / "egress.nft"
        rules.write_text(egress_ruleset(net, resolvers))
    sock_dir = _socket_dir(for_nobody=not net.filtered)
    # recorded, so whoever cleans up the VM's folder removes this one too
    (workdir / "passt.dir").write_text(f"{sock_dir}\n")
    h = NetHandle(net, socket_path=sock_dir / "passt.sock", log_path=workdir / "passt.log",
                  own_dir=sock_dir)
    try:
        for attempt in range(attempts):
            h.host_port = free_port()
            h.argv = passt_argv(h.socket_path, h.host_port, binary=binary)
            if rules is not None:
                h.argv = egress_argv(h.argv, rules, h.host_port)
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
        # (a filtered VM's pasta binds the port before its passt makes the socket)
        bind_failed = "Failed to bind" in _tail(h.log_path, 50)
        if bind_failed and h.net.filtered:
            return f"it does not listen on 127.0.0.1:{h.host_port} (port taken?)"
        if h.socket_path.exists():
            if _forward_ready(h):
                return None
            if bind_failed or loop.time() > deadline:
                return f"it does not listen on 127.0.0.1:{h.host_port} (port taken?)"
        elif loop.time() > deadline:
            return f"its socket {h.socket_path} did not appear within {timeout:.0f} s"
        await asyncio.sleep(0.01)


def _forward_ready(h: NetHandle) -> bool:
    """Whether the management forward listens: passt itself, or for a filtered VM pasta on
    the host's loopback and passt on its namespace's."""
    assert h.proc is not None
    if not h.net.filtered:
        return _listening(h.host_port, h.proc.pid)
    kids = _children(h.proc.pid)
    return (any(n == PASTA_BINARY and _listening(h.host_port, p) for p, n in kids.items())
            and any(n != PASTA_BINARY and _listening(h.host_port, p, own_netns=True)
                    for p, n in kids.items()))


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
