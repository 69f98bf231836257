"""Kernel-side boot artefacts: PVH ``vmlinux``, busybox initramfs, per-VM identity cpio.

* :func:`extract_vmlinux` turns a distribution ``vmlinuz`` (bzImage) into the
  uncompressed ELF that QEMU boots through the Xen PVH entry point (no real-mode
  setup, no self-decompression: 0.5-1.5 s less under TCG).
* :func:`make_initramfs` writes the small initramfs: static busybox, the virtio
  modules, and ``/init`` (``localsbx/guest/init.sh``).
* :func:`make_identity_cpio` writes the per-VM identity archive that the host appends
  to the initramfs on every cold boot (SSH host key, authorized_keys, machine-id,
  hostname).  ``/init`` copies it to ``/run/localsbx/``.

All archives are newc cpio written here in pure Python (no ``cpio`` tool, no root:
device nodes are just header fields), with mtime 0 so equal inputs give equal bytes.
The guest side of all this is specified in docs/ARCHITECTURE.md, "The guest contract".
"""

from __future__ import annotations

import base64
import bz2
import logging
import lzma
import os
import re
import shutil
import stat
import struct
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from localsbx._proc import run_sync_cmd
from localsbx.errors import BaseImageError

__all__ = [
    "INIT_SCRIPT",
    "CpioEntry",
    "dropbear_ed25519_key",
    "extract_vmlinux",
    "has_pvh_note",
    "make_identity_cpio",
    "make_initramfs",
    "read_newc",
    "resolve_modules",
    "write_newc",
]

logger = logging.getLogger(__name__)

#: ``/init`` template; ``@MODULES@`` becomes the ordered module list.
INIT_SCRIPT = Path(__file__).resolve().parent.parent / "guest" / "init.sh"

#: busybox applets ``/init`` uses; each becomes a ``/bin/<applet>`` symlink.
INIT_APPLETS = (
    "sh", "mount", "insmod", "mkdir", "usleep", "ln", "ip", "cp", "chmod",
    "hostname", "sync", "poweroff", "switch_root", "cat", "arping", "blockdev",
    "hwclock",
)  # fmt: skip

#: Where the identity files live inside the identity cpio (and so in the initramfs).
IDENTITY_DIR = "localsbx"

# --------------------------------------------------------------------------- cpio


@dataclass(frozen=True)
class CpioEntry:
    """One newc archive member.

    :param name: path inside the archive, without a leading ``/``.
    :param mode: full ``st_mode`` (type bits and permissions).
    :param data: file contents, or the target of a symlink.
    :param rdev: ``(major, minor)`` for device nodes.
    """

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def write_newc(entries: Iterable[CpioEntry], *, align: int = 4) -> bytes:
    """Serialize ``entries`` as a newc (``070701``) cpio archive, trailer included.

    :param align: pad the whole archive with NULs to a multiple of this many bytes
        (the kernel accepts concatenated archives at any 4-byte boundary).
    :returns: the archive bytes.
    """
    out = bytearray()
    for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        is_trailer = entry.name == "TRAILER!!!"
        fields = (
            0 if is_trailer else ino, entry.mode, entry.uid, entry.gid, 1 if is_trailer else nlink,
            0, len(entry.data), 0, 0, entry.rdev[0], entry.rdev[1], len(name), 0,
        )  # fmt: skip
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += header + name + _pad4(len(header) + len(name))
        out += entry.data + _pad4(len(entry.data))
    out += b"\0" * (-len(out) % align)
    return bytes(out)


def read_newc(data: bytes) -> list[CpioEntry]:
    """Parse concatenated newc archives (the inverse of :func:`write_newc`).

    :raises ValueError: when the data is not newc cpio.
    """
    entries: list[CpioEntry] = []
    pos = 0
    while pos < len(data):
        if data[pos : pos + 1] == b"\0":  # padding between archives
            pos += 1
            continue
        if data[pos : pos + 6] != b"070701":
            raise ValueError(f"not a newc cpio header at offset {pos}")
        f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, uid, gid, size, rmaj, rmin, namesize = f[1], f[2], f[3], f[6], f[9], f[10], f[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name != "TRAILER!!!":
            entries.append(CpioEntry(name, mode, body, uid, gid, (rmaj, rmin)))
    return entries


def _dir(name: str, perm: int = 0o755) -> CpioEntry:
    return CpioEntry(name, stat.S_IFDIR | perm)


def _file(name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
    return CpioEntry(name, stat.S_IFREG | perm, data)


def _symlink(name: str, target: str) -> CpioEntry:
    return CpioEntry(name, stat.S_IFLNK | 0o777, target.encode())


# ------------------------------------------------------------------------ vmlinux

# (name, magic) in the order of the kernel's scripts/extract-vmlinux.
_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b\x08"),
    ("xz", b"\xfd7zXZ\x00"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00\x00"),
    ("lzo", b"\x89LZO"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
)

#: Seconds a decompressor CLI may take on one kernel or module (tens of MB at most).
DECOMPRESS_TIMEOUT = 120.0

_ELF_MAGIC = b"\x7fELF"
_PT_INTERP = 3
_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def _stream_decompress(decomp: object, blob: bytes) -> bytes | None:
    try:
        return decomp.decompress(blob)  # type: ignore[attr-defined]
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error):
        return None


def _cli_decompress(argv: list[str], blob: bytes) -> bytes | None:
    """Run a decompressor CLI; the kernel appends data after the stream, so a
    non-zero exit after a complete stream is expected and the output still counts.

    :returns: the decompressed bytes, or ``None`` when there are none.
    :raises BaseImageError: the tool is not installed.
    :raises HostCommandError: it ran past ``DECOMPRESS_TIMEOUT`` seconds (killed).
    """
    if shutil.which(argv[0]) is None:
        raise BaseImageError(
            f"the kernel is {argv[0]}-compressed but `{argv[0]}` is not installed",
            hint=f"install it (Debian: apt-get install {argv[0]})",
        )
    proc = run_sync_cmd(argv, input=blob, timeout=DECOMPRESS_TIMEOUT, check=False)
    return proc.stdout or None


def _decompress(kind: str, blob: bytes) -> bytes | None:
    if kind == "gzip":
        return _stream_decompress(zlib.decompressobj(16 + zlib.MAX_WBITS), blob)
    if kind == "xz":
        return _stream_decompress(lzma.LZMADecompressor(lzma.FORMAT_XZ), blob)
    if kind == "lzma":
        return _stream_decompress(lzma.LZMADecompressor(lzma.FORMAT_ALONE), blob)
    if kind == "bzip2":
        return _stream_decompress(bz2.BZ2Decompressor(), blob)
    if kind == "lz4":
        return _cli_decompress(["lz4", "-d", "-c"], blob)
    if kind == "zstd":
        return _cli_decompress(["zstd", "-d", "-c", "-q"], blob)
    if kind == "lzo":
        return _cli_decompress(["lzop", "-d", "-c"], blob)
    raise AssertionError(kind)


def has_pvh_note(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF has the Xen PVH entry note (``XEN_ELFNOTE_PHYS32_ENTRY``).

    That note is what lets QEMU ``-kernel`` boot an uncompressed ``vmlinux`` directly.
    """
    if elf[:4] != _ELF_MAGIC or elf[4] != 2 or elf[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != _PT_NOTE:
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz]
            if name.rstrip(b"\0") == b"Xen" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + namesz + (-namesz % 4) + descsz + (-descsz % 4)
    return False


def _elf_has_interp(elf: bytes) -> bool:
    """Whether an ELF64 has a PT_INTERP segment (is dynamically linked)."""
    if elf[:4] != _ELF_MAGIC or elf[4] != 2:
        raise BaseImageError("not a 64-bit ELF executable")
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(
        struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == _PT_INTERP for i in range(phnum)
    )


def extract_vmlinux(vmlinuz: Path, out: Path) -> str:
    """Write the uncompressed PVH ELF kernel contained in ``vmlinuz`` to ``out``.

    Like the kernel's ``scripts/extract-vmlinux``: look for every known compression
    magic (gzip, xz, bzip2, lzma, lzo, lz4, zstd), try to decompress from each match,
    and keep the first result that is an ELF.  An input that already is an ELF is
    copied.  lz4/zstd/lzo need their command-line tools; the others are stdlib.

    :param vmlinuz: the bzImage (or ELF) to read.
    :param out: where to write the ELF; written to a temporary name, then renamed.
    :returns: the compression found (``"elf"`` when the input was already an ELF).
    :raises BaseImageError: when no ELF can be extracted, or the ELF lacks the Xen PVH
        note (QEMU could not boot it as ``-kernel`` on ``-M microvm``).
    """
    data = Path(vmlinuz).read_bytes()
    found: tuple[str, bytes] | None = None
    if data[:4] == _ELF_MAGIC:
        found = ("elf", data)
    else:
        for kind, magic in _MAGICS:
            for match in re.finditer(re.escape(magic), data):
                elf = _decompress(kind, data[match.start() :])
                if elf and elf[:4] == _ELF_MAGIC:
                    found = (kind, elf)
                    break
            if found:
                break
    if found is None:
        raise BaseImageError(f"{vmlinuz}: no compressed ELF kernel found inside")
    kind, elf = found
    if not has_pvh_note(elf):
        raise BaseImageError(
            f"{vmlinuz}: the kernel has no Xen PVH ELF note (CONFIG_PVH is off)",
            hint="use a kernel built with CONFIG_PVH=y (Debian's cloud kernels are)",
        )
    _write_atomic(Path(out), elf, mode=0o644)
    logger.debug("extracted %s vmlinux (%d bytes) from %s", kind, len(elf), vmlinuz)
    return kind


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- initramfs

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def _module_name(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES[::-1]:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def resolve_modules(modules_dir: Path, wanted: Sequence[str]) -> list[Path]:
    """Module files to load, dependencies first, built-in modules left out.

    :param modules_dir: ``.../lib/modules/<version>`` with ``modules.dep`` (run depmod).
    :param wanted: module names (``-`` and ``_`` are equivalent, as for modprobe).
    :returns: absolute paths of the module files in load order.
    :raises BaseImageError: when a module is neither a file nor built in.
    """
    modules_dir = Path(modules_dir)
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[_module_name(path)] = (path, rest.split())
    builtin_file = modules_dir / "modules.builtin"
    builtin = (
        {_module_name(p) for p in builtin_file.read_text().split()} if builtin_file.exists() else set()
    )
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order or name in chain:
            return
        if name not in deps:
            if name in builtin:
                return
            raise BaseImageError(f"kernel module {name} not found in {modules_dir}")
        for dep in deps[name][1]:
            visit(_module_name(dep), (*chain, name))
        order.append(name)

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return [modules_dir / deps[name][0] for name in order]


def _read_module(path: Path) -> bytes:
    """Module bytes, decompressed (busybox insmod wants a plain ELF)."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return zlib.decompress(data, 16 + zlib.MAX_WBITS)
    if name.endswith(".ko.zst"):
        out = _cli_decompress(["zstd", "-d", "-c", "-q"], data)
        if not out:
            raise BaseImageError(f"{path}: zstd decompression failed")
        return out
    return data


#: Files the boot kit (``/kit`` in the initramfs, ``/usr/lib/localsbx`` in the guest) must hold.
KIT_FILES = ("agent", "sshd", "dropbear/ld.so", "dropbear/dropbear")


def kit_entries(kit_dir: Path, prefix: str = "kit") -> list[CpioEntry]:
    """The boot kit folder ``kit_dir`` as cpio members under ``prefix/`` (files, folders
    and symlinks; owners root, modes kept).

    :raises BaseImageError: a file of :data:`KIT_FILES` is missing, or the agent is not static.
    """
    kit_dir = Path(kit_dir)
    missing = [f for f in KIT_FILES if not (kit_dir / f).exists() and not (kit_dir / f).is_symlink()]
    if missing:
        raise BaseImageError(f"boot kit {kit_dir} lacks {', '.join(missing)}")
    if _elf_has_interp((kit_dir / "agent").read_bytes()):
        raise BaseImageError(f"{kit_dir / 'agent'} is dynamically linked; the agent must be static")
    entries = [_dir(prefix)]
    for p in sorted(kit_dir.rglob("*")):
        name = f"{prefix}/{p.relative_to(kit_dir).as_posix()}"
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            entries.append(_symlink(name, os.readlink(p)))
        elif stat.S_ISDIR(st.st_mode):
            entries.append(_dir(name, stat.S_IMODE(st.st_mode)))
        elif stat.S_ISREG(st.st_mode):
            entries.append(_file(name, p.read_bytes(), stat.S_IMODE(st.st_mode)))
    return entries


def make_initramfs(
    busybox: Path,
    modules_dir: Path,
    out: Path,
    kernel_version: str,
    *,
    modules: Sequence[str],
    kit: Path,
) -> list[str]:
    """Write the base's initramfs: static busybox, the listed modules, the boot kit
    and ``/init``.

    :param busybox: a *static* busybox binary (``busybox-static``).
    :param modules_dir: ``.../lib/modules/<kernel_version>`` of the kernel, after depmod.
    :param out: the cpio to write (uncompressed: gzip bought no boot time under TCG).
    :param kernel_version: the kernel release, recorded in ``/etc/localsbx-kernel``.
    :param modules: module names to load in ``/init``; their dependencies are added
        and built-in ones skipped (virtio and virtio_ring are built into 6.x cloud kernels).
    :param kit: the boot kit folder (:data:`KIT_FILES`: the static agent, the ``sshd``
        symlink, the dropbear bundle); ``/init`` mounts it at ``/usr/lib/localsbx``.
    :returns: the module names ``/init`` loads, in order.
    :raises BaseImageError: when a module is missing or busybox is not static.
    """
    bb = Path(busybox).read_bytes()
    if _elf_has_interp(bb):
        raise BaseImageError(
            f"{busybox} is dynamically linked; the initramfs needs a static busybox",
            hint="use the busybox-static package",
        )
    paths = resolve_modules(Path(modules_dir), modules)
    names = [_module_name(p.name) for p in paths]
    init = INIT_SCRIPT.read_text().replace("@MODULES@", " ".join(names) or "")
    entries = [
        _dir("bin"), _dir("dev"), _dir("etc"), _dir("lib"), _dir("lib/modules"), _dir("proc"),
        _dir("sys"), _dir("newroot"), _dir("run"), _dir("tmp", 0o1777),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        _file("bin/busybox", bb, 0o755),
        *(_symlink(f"bin/{applet}", "busybox") for applet in INIT_APPLETS),
        _file("etc/localsbx-kernel", f"{kernel_version}\n".encode()),
        *(_file(f"lib/modules/{n}.ko", _read_module(p)) for n, p in zip(names, paths)),
        _file("init", init.encode(), 0o755),
        *kit_entries(kit),
    ]  # fmt: skip
    _write_atomic(Path(out), write_newc(entries, align=512), mode=0o644)
    return names


# ----------------------------------------------------------------------- identity


def _ssh_string(buf: bytes, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from(">I", buf, pos)
    end = pos + 4 + n
    if end > len(buf):
        raise ValueError("truncated OpenSSH key")
    return buf[pos + 4 : end], end


def _pack_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def dropbear_ed25519_key(openssh_private_key: bytes) -> bytes:
    """Convert an unencrypted OpenSSH-format ed25519 private key to dropbear's format.

    Dropbear (2025.89, Debian trixie) reads only its own key format for ``-r``; for
    ed25519 that is ``string "ssh-ed25519" || string(seed32 || pub32)``, which is the
    same 64 bytes OpenSSH stores, so no cryptography is needed.

    :raises ValueError: when the key is not an unencrypted OpenSSH ed25519 key.
    """
    text = openssh_private_key.decode("ascii", "replace")
    m = re.search(
        r"-----BEGIN OPENSSH PRIVATE KEY-----(.*?)-----END OPENSSH PRIVATE KEY-----", text, re.DOTALL
    )
    if not m:
        raise ValueError("not an OpenSSH private key (-----BEGIN OPENSSH PRIVATE KEY-----)")
    blob = base64.b64decode("".join(m.group(1).split()))
    magic = b"openssh-key-v1\0"
    if not blob.startswith(magic):
        raise ValueError("not an openssh-key-v1 key")
    pos = len(magic)
    cipher, pos = _ssh_string(blob, pos)
    _kdf, pos = _ssh_string(blob, pos)
    _kdfopts, pos = _ssh_string(blob, pos)
    if cipher != b"none":
        raise ValueError("the host key must not be encrypted")
    (nkeys,) = struct.unpack_from(">I", blob, pos)
    pos += 4
    for _ in range(nkeys):
        _pub, pos = _ssh_string(blob, pos)
    private, _ = _ssh_string(blob, pos)
    check1, check2 = struct.unpack_from(">II", private, 0)
    if check1 != check2:
        raise ValueError("corrupt OpenSSH private key (check bytes differ)")
    keytype, p = _ssh_string(private, 8)
    if keytype != b"ssh-ed25519":
        raise ValueError(f"the host key must be ssh-ed25519, not {keytype.decode(errors='replace')}")
    pub, p = _ssh_string(private, p)
    secret, p = _ssh_string(private, p)
    if len(pub) != 32 or len(secret) != 64 or secret[32:] != pub:
        raise ValueError("malformed ed25519 key")
    return _pack_string(b"ssh-ed25519") + _pack_string(secret)


_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_MACHINE_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def make_identity_cpio(
    *, host_key_openssh: bytes, authorized_keys: bytes, machine_id: str, hostname: str,
    hold: bool = False,
) -> bytes:
    """The per-VM identity archive, appended to the initramfs on every cold boot.

    Members (all under ``localsbx/``, root-owned): ``dropbear_ed25519_host_key`` (0600,
    dropbear format, converted from ``host_key_openssh``), ``authorized_keys`` (0600),
    ``machine-id`` and ``hostname`` (0644, newline-terminated).  ``/init`` copies them
    to ``/run/localsbx/`` (``authorized_keys`` to ``/run/localsbx/ssh/``).

    :param host_key_openssh: unencrypted OpenSSH-format ed25519 private key; the host
        pins its public half when it connects.
    :param authorized_keys: the store's management public key(s), OpenSSH one-line format.
    :param machine_id: 32 lowercase hex digits (``uuid4().hex``).
    :param hostname: a single DNS label.
    :param hold: add ``localsbx/hold``: ``/init`` stops before it mounts the root file
        system and waits for the disk to change size (a VM template,
        :mod:`localsbx.vm.template`).
    :returns: a newc cpio, padded to 512 bytes, ready to concatenate after the initramfs.
    :raises ValueError: on a malformed key, machine id or hostname.
    """
    if not _MACHINE_ID_RE.match(machine_id):
        raise ValueError(f"machine_id must be 32 lowercase hex digits, got {machine_id!r}")
    if not _HOSTNAME_RE.match(hostname):
        raise ValueError(f"hostname must be one DNS label (letters, digits, -), got {hostname!r}")
    if not authorized_keys.strip():
        raise ValueError("authorized_keys is empty")
    if not authorized_keys.endswith(b"\n"):
        authorized_keys += b"\n"
    d = IDENTITY_DIR
    return write_newc(
        [
            _dir(d, 0o700),
            _file(f"{d}/dropbear_ed25519_host_key", dropbear_ed25519_key(host_key_openssh), 0o600),
            _file(f"{d}/authorized_keys", authorized_keys, 0o600),
            _file(f"{d}/machine-id", f"{machine_id}\n".encode()),
            _file(f"{d}/hostname", f"{hostname}\n".encode()),
            *([_file(f"{d}/hold", b"")] if hold else []),
        ],
        align=512,
    )
