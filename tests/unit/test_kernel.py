"""localsbx.vm.kernel without a real kernel: synthetic bzImages, cpio round trips, keys."""

from __future__ import annotations

import base64
import gzip
import lzma
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import asyncssh
import pytest

from localsbx.errors import BaseImageError
from localsbx.vm import kernel
from localsbx.vm.kernel import (
    CpioEntry,
    dropbear_ed25519_key,
    extract_vmlinux,
    has_pvh_note,
    make_identity_cpio,
    make_initramfs,
    read_newc,
    resolve_modules,
    write_newc,
)


def fake_elf(*, pvh: bool = True, size: int = 64 * 1024) -> bytes:
    """A minimal ELF64 with one PT_NOTE segment holding Xen notes (PVH entry when ``pvh``)."""

    def note(name: bytes, ntype: int, desc: bytes) -> bytes:
        name += b"\0"
        return (struct.pack("<III", len(name), len(desc), ntype) + name + b"\0" * (-len(name) % 4)
                + desc + b"\0" * (-len(desc) % 4))

    notes = note(b"Xen", 6, b"linux\0") + note(b"Xen", 18 if pvh else 17, b"\x00" * 8)
    ehdr_size, phdr_size = 64, 56
    notes_off = ehdr_size + phdr_size
    ehdr = (b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
            + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, ehdr_size, 0, 0, ehdr_size,
                          phdr_size, 1, 64, 0, 0))
    phdr = struct.pack("<IIQQQQQQ", 4, 4, notes_off, 0, 0, len(notes), len(notes), 4)
    body = ehdr + phdr + notes
    return body + bytes(range(256)) * ((size - len(body)) // 256)


def fake_bzimage(payload: bytes) -> bytes:
    """Setup code + a compressed payload + trailing bytes, like arch/x86/boot."""
    return b"MZ" + b"\x90" * 20000 + payload + struct.pack("<I", 12345) + b"\0" * 300


def test_pvh_note_detection():
    assert has_pvh_note(fake_elf(pvh=True))
    assert not has_pvh_note(fake_elf(pvh=False))
    assert not has_pvh_note(b"not an elf at all" * 10)


@pytest.mark.parametrize("compress", ["gzip", "xz", "zstd", "lz4"])
def test_extract_vmlinux(tmp_path, compress):
    elf = fake_elf()
    if compress == "gzip":
        payload = gzip.compress(elf)
    elif compress == "xz":
        payload = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    else:
        if shutil.which(compress) is None:
            pytest.skip(f"{compress} CLI not installed")
        flags = ["-l"] if compress == "lz4" else []  # the kernel uses lz4's legacy frame
        payload = subprocess.run([compress, "-c", *flags], input=elf, capture_output=True,
                                 check=True).stdout
    src = tmp_path / "vmlinuz"
    src.write_bytes(fake_bzimage(payload))
    out = tmp_path / "vmlinux"
    assert extract_vmlinux(src, out) == compress
    assert out.read_bytes() == elf


def test_extract_vmlinux_skips_false_magic(tmp_path):
    """A gzip magic inside the setup code that is not a stream must not stop the search."""
    elf = fake_elf()
    src = tmp_path / "vmlinuz"
    src.write_bytes(b"\x1f\x8b\x08garbage" + fake_bzimage(lzma.compress(elf)))
    assert extract_vmlinux(src, tmp_path / "vmlinux") == "xz"
    assert (tmp_path / "vmlinux").read_bytes() == elf


def test_extract_vmlinux_plain_elf_and_errors(tmp_path):
    elf = tmp_path / "elf"
    elf.write_bytes(fake_elf())
    assert extract_vmlinux(elf, tmp_path / "out") == "elf"
    nopvh = tmp_path / "nopvh"
    nopvh.write_bytes(fake_bzimage(gzip.compress(fake_elf(pvh=False))))
    with pytest.raises(BaseImageError, match="PVH"):
        extract_vmlinux(nopvh, tmp_path / "out2")
    junk = tmp_path / "junk"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(BaseImageError, match="no compressed ELF"):
        extract_vmlinux(junk, tmp_path / "out3")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_newc_round_trip_and_format():
    entries = [
        CpioEntry("d", stat.S_IFDIR | 0o700),
        CpioEntry("d/f", stat.S_IFREG | 0o600, b"abc", uid=1, gid=2),
        CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        CpioEntry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
    ]
    data = write_newc(entries, align=512)
    assert len(data) % 512 == 0
    assert data.startswith(b"070701")
    assert b"TRAILER!!!" in data
    assert read_newc(data) == entries
    # concatenated archives parse as one (the kernel unpacks both)
    assert read_newc(data + write_newc([CpioEntry("x", stat.S_IFREG | 0o644, b"1")])) == [
        *entries, CpioEntry("x", stat.S_IFREG | 0o644, b"1")]


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio tool not installed")
def test_newc_readable_by_gnu_cpio(tmp_path):
    data = write_newc([CpioEntry("a", stat.S_IFDIR | 0o755),
                       CpioEntry("a/b.txt", stat.S_IFREG | 0o644, b"hello\n")])
    listing = subprocess.run(["cpio", "-itv"], input=data, capture_output=True, check=True)
    assert b"a/b.txt" in listing.stdout


def test_make_identity_cpio():
    key = asyncssh.generate_private_key("ssh-ed25519")
    client = asyncssh.generate_private_key("ssh-ed25519")
    data = make_identity_cpio(
        host_key_openssh=key.export_private_key("openssh"),
        authorized_keys=client.export_public_key("openssh"),
        machine_id="0123456789abcdef0123456789abcdef",
        hostname="sbx-1",
    )
    assert len(data) % 512 == 0
    files = {e.name: e for e in read_newc(data)}
    assert set(files) == {"localsbx", "localsbx/dropbear_ed25519_host_key",
                          "localsbx/authorized_keys", "localsbx/machine-id", "localsbx/hostname"}
    assert stat.S_ISDIR(files["localsbx"].mode)
    hk = files["localsbx/dropbear_ed25519_host_key"]
    assert stat.S_IMODE(hk.mode) == 0o600 and hk.uid == 0
    assert files["localsbx/machine-id"].data == b"0123456789abcdef0123456789abcdef\n"
    assert files["localsbx/hostname"].data == b"sbx-1\n"
    assert files["localsbx/authorized_keys"].data == client.export_public_key("openssh")

    # dropbear format: string "ssh-ed25519", string(seed || public key)
    blob = hk.data
    (n,) = struct.unpack_from(">I", blob, 0)
    assert blob[4:4 + n] == b"ssh-ed25519"
    (m,) = struct.unpack_from(">I", blob, 4 + n)
    secret = blob[8 + n:]
    assert m == 64 == len(secret)
    pub = key.export_public_key("openssh").split()[1]
    assert secret[32:] == base64.b64decode(pub)[-32:]


@pytest.mark.skipif(shutil.which("dropbearconvert") is None, reason="dropbear-bin not installed")
def test_dropbear_key_matches_dropbearconvert(tmp_path):
    key = asyncssh.generate_private_key("ssh-ed25519")
    src = tmp_path / "k"
    src.write_bytes(key.export_private_key("openssh"))
    subprocess.run(["dropbearconvert", "openssh", "dropbear", str(src), str(tmp_path / "d")],
                   check=True, capture_output=True)
    assert dropbear_ed25519_key(src.read_bytes()) == (tmp_path / "d").read_bytes()


def test_identity_rejects_bad_input():
    key = asyncssh.generate_private_key("ssh-ed25519").export_private_key("openssh")
    ok = {"host_key_openssh": key, "authorized_keys": b"ssh-ed25519 AAAA x",
          "machine_id": "0" * 32, "hostname": "h"}
    make_identity_cpio(**ok)
    for bad in ({"machine_id": "XYZ"}, {"hostname": "a b"}, {"hostname": "-x"},
                {"authorized_keys": b" \n"}):
        with pytest.raises(ValueError):
            make_identity_cpio(**{**ok, **bad})
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=1024).export_private_key("openssh")
    with pytest.raises(ValueError, match="ssh-ed25519"):
        make_identity_cpio(**{**ok, "host_key_openssh": rsa})
    # an encrypted key has a cipher name other than "none" (bcrypt may not be installed)
    body = base64.b64decode(b"".join(key.splitlines()[1:-1]))
    body = body.replace(b"\0\0\0\x04none", b"\0\0\0\x0aaes256-ctr", 1)
    enc = (b"-----BEGIN OPENSSH PRIVATE KEY-----\n" + base64.b64encode(body)
           + b"\n-----END OPENSSH PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="encrypted"):
        make_identity_cpio(**{**ok, "host_key_openssh": enc})


def fake_modules(root: Path) -> Path:
    mods = root / "6.12.0-test"
    for rel in ("kernel/drivers/virtio/virtio_mmio.ko.xz", "kernel/drivers/net/virtio_net.ko.xz",
                "kernel/net/core/failover.ko.xz", "kernel/drivers/net/net_failover.ko.xz",
                "kernel/drivers/char/hw_random/virtio-rng.ko"):
        p = mods / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        body = b"\x7fELF module " + p.name.encode()
        p.write_bytes(lzma.compress(body) if rel.endswith(".xz") else body)
    (mods / "modules.dep").write_text(
        "kernel/drivers/virtio/virtio_mmio.ko.xz:\n"
        "kernel/net/core/failover.ko.xz:\n"
        "kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz\n"
        "kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz "
        "kernel/net/core/failover.ko.xz\n"
        "kernel/drivers/char/hw_random/virtio-rng.ko:\n")
    (mods / "modules.builtin").write_text(
        "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n")
    return mods


def test_resolve_modules_order_and_builtins(tmp_path):
    mods = fake_modules(tmp_path)
    got = [p.name for p in resolve_modules(mods, ["virtio", "virtio_net", "virtio_rng"])]
    assert got == ["failover.ko.xz", "net_failover.ko.xz", "virtio_net.ko.xz", "virtio-rng.ko"]
    with pytest.raises(BaseImageError, match="nosuch"):
        resolve_modules(mods, ["nosuch"])


def test_make_initramfs(tmp_path, monkeypatch):
    mods = fake_modules(tmp_path)
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 9
                        + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 0, 64, 0, 0))
    out = tmp_path / "initramfs.cpio"
    kit = fake_kit(tmp_path, busybox)
    names = make_initramfs(busybox, mods, out, "6.12.0-test", kit=kit,
                           modules=["virtio_ring", "virtio_mmio", "virtio_net", "virtio-rng"])
    assert names == ["virtio_mmio", "failover", "net_failover", "virtio_net", "virtio_rng"]
    files = {e.name: e for e in read_newc(out.read_bytes())}
    init = files["init"].data.decode()
    assert "for m in virtio_mmio failover net_failover virtio_net virtio_rng; do" in init
    assert "@MODULES@" not in init and "LOCALSBX-PROBE-OK" in init
    assert stat.S_IMODE(files["init"].mode) == 0o755
    assert files["lib/modules/virtio_net.ko"].data == b"\x7fELF module virtio_net.ko.xz"
    assert files["dev/console"].rdev == (5, 1) and stat.S_ISCHR(files["dev/console"].mode)
    for applet in kernel.INIT_APPLETS:
        assert files[f"bin/{applet}"].data == b"busybox"
    # the boot kit travels in the initramfs: /init mounts it at /usr/lib/localsbx
    assert stat.S_IMODE(files["kit/agent"].mode) == 0o755
    assert stat.S_ISLNK(files["kit/sshd"].mode) and files["kit/sshd"].data == b"agent"
    assert files["kit/dropbear/dropbear"].data == b"dropbear"
    assert "mount -t tmpfs" in init and "/usr/lib/localsbx" in init
    (kit / "dropbear" / "ld.so").unlink()
    with pytest.raises(BaseImageError, match="ld.so"):
        make_initramfs(busybox, mods, out, "6.12.0-test", kit=kit, modules=["virtio_mmio"])
    (kit / "dropbear" / "ld.so").write_bytes(b"ld")
    # a dynamically linked busybox is refused
    dyn = bytearray(busybox.read_bytes())
    struct.pack_into("<H", dyn, 0x38, 1)
    dyn += struct.pack("<IIQQQQQQ", 3, 4, 0, 0, 0, 0, 0, 1)
    struct.pack_into("<Q", dyn, 0x20, 64)
    busybox.write_bytes(bytes(dyn))
    with pytest.raises(BaseImageError, match="static"):
        make_initramfs(busybox, mods, out, "6.12.0-test", kit=kit, modules=["virtio_mmio"])
    (kit / "agent").write_bytes(bytes(dyn))
    with pytest.raises(BaseImageError, match="agent must be static"):
        kernel.kit_entries(kit)


def fake_kit(tmp_path, static_elf):
    kit = tmp_path / "kit"
    (kit / "dropbear").mkdir(parents=True)
    (kit / "agent").write_bytes(static_elf.read_bytes())
    (kit / "agent").chmod(0o755)
    (kit / "sshd").symlink_to("agent")
    (kit / "dropbear" / "ld.so").write_bytes(b"ld")
    (kit / "dropbear" / "dropbear").write_bytes(b"dropbear")
    return kit
