"""VM templates without a VM: the hold file in the identity, which bases can have a
template, and which template folders are taken as valid (localsbx/vm/template.py)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from localsbx.vm import kernel, snapshot, template
from localsbx.vm.qemu import Accel


def _identity(**kw) -> list[str]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    data = kernel.make_identity_cpio(
        host_key_openssh=key.export_private_key("openssh"),
        authorized_keys=key.export_public_key("openssh"), machine_id="0" * 32,
        hostname="h", **kw)
    return [e.name for e in kernel.read_newc(data)]


def test_the_hold_file_is_in_a_template_identity_only():
    assert "localsbx/hold" in _identity(hold=True)
    assert "localsbx/hold" not in _identity()


def test_init_holds_before_it_mounts_the_root_and_has_its_applets():
    init = kernel.INIT_SCRIPT.read_text()
    hold, mount = init.index("/localsbx/hold"), init.index("mount -t ext4")
    assert hold < mount
    assert "LOCALSBX-HOLD" in init[hold:mount] and "blockdev --flushbufs /dev/vda" in init[hold:mount]
    assert "hwclock -s -u" in init[hold:mount]  # the RTC's time before anything is written
    assert {"blockdev", "arping", "usleep", "hwclock"} <= set(kernel.INIT_APPLETS)


@dataclass
class _Base:
    path: Path
    name: str = "b"
    digest: str = "base-digest"
    kernel_digest: str = "kernel-digest"

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinux"

    @property
    def initrd(self) -> Path:
        return self.path / "initramfs.cpio"


TCG = Accel("tcg", "test")
HOST_KEY = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


def _made(tmp_path, **meta_changes) -> tuple[_Base, Path]:
    """A template folder as :func:`template.ensure` leaves it (files of the right sizes)."""
    base = _Base(tmp_path)
    base.initrd.write_bytes(b"...LOCALSBX-HOLD...")
    folder = template.template_dir(base.path, 1, 64, TCG)
    folder.mkdir(parents=True)
    (folder / "state.mig").write_bytes(b"s" * 100)
    (folder / "initrd.cpio").write_bytes(b"i" * 50)
    with open(folder / "ram", "wb") as f:
        f.truncate(64 << 20)
    key = snapshot.snapshot_key(template._spec(folder, kernel=base.kernel, accel=TCG, cpus=1,
                                               memory_mib=64),
                                kernel_digest=base.kernel_digest)
    meta = {"format": template.TEMPLATE_FORMAT, "base_digest": base.digest, "key": key,
            "host_key": HOST_KEY, "made_at": 1.5,
            "digests": {f: snapshot.file_digest(folder / f) for f in template._FILES}}
    meta.update(meta_changes)
    (folder / template.META).write_text(json.dumps(meta))
    return base, folder


def test_a_complete_template_loads(tmp_path):
    base, folder = _made(tmp_path)
    t = template.load(base, cpus=1, memory_mib=64, accel=TCG)
    assert t is not None and t.folder == folder and (t.cpus, t.memory_mib) == (1, 64)
    assert t.state == folder / "state.mig" and t.host_key == HOST_KEY and t.made_at == 1.5
    assert template.supports_templates(base)


@pytest.mark.parametrize("change", [
    {"format": 0},                                    # made by another localsbx
    {"base_digest": "another"},                       # the base was rebuilt
    {"key": {"qemu": "QEMU emulator version 1.0"}},   # another QEMU (or kernel, shape)
    {"key": "not a dict"},
    {"host_key": "ssh-ed25519 garbage"},              # would fail every restore
    {"host_key": None},
    {"digests": {}},
    {"made_at": "yesterday"},
])
def test_a_stale_template_is_not_used(tmp_path, change):
    base, _ = _made(tmp_path, **change)
    assert template.load(base, cpus=1, memory_mib=64, accel=TCG) is None


@pytest.mark.parametrize("damage", ["state.mig", "ram", "initrd.cpio", "template.json"])
def test_a_damaged_template_is_not_used(tmp_path, damage):
    base, folder = _made(tmp_path)
    f = folder / damage
    if damage == "template.json":
        f.write_text("{not json")
    else:
        os.truncate(f, f.stat().st_size // 2)
    assert template.load(base, cpus=1, memory_mib=64, accel=TCG) is None


@pytest.mark.parametrize("text", ["[]", "null", "3", '"x"', "{}"])
def test_a_template_json_of_another_shape_is_not_used(tmp_path, text):
    base, folder = _made(tmp_path)
    (folder / template.META).write_text(text)
    assert template.load(base, cpus=1, memory_mib=64, accel=TCG) is None


@pytest.mark.parametrize("name", ["ram", "state.mig"])
def test_a_template_file_damaged_in_place_is_not_used(tmp_path, name):
    """Same size, other bytes (the sizes alone passed such a file: every restore failed)."""
    base, folder = _made(tmp_path)
    with open(folder / name, "r+b") as f:
        f.write(b"\xff" * 64)
    assert template.load(base, cpus=1, memory_mib=64, accel=TCG) is None


def test_other_shapes_and_accelerators_have_their_own_template(tmp_path):
    base, _ = _made(tmp_path)
    assert template.load(base, cpus=2, memory_mib=64, accel=TCG) is None
    assert template.load(base, cpus=1, memory_mib=64, accel=Accel("kvm", "test")) is None


def test_a_base_whose_init_cannot_hold_has_no_template(tmp_path, monkeypatch):
    import asyncio

    base, _ = _made(tmp_path)
    base.initrd.write_bytes(b"an /init from before templates")
    assert not template.supports_templates(base)
    # and nothing is booted for it: the caller cold-boots
    assert asyncio.run(template.try_ensure(base, cpus=1, memory_mib=64, accel=TCG,
                                           client_key=None)) is None


def test_templates_can_be_turned_off(tmp_path, monkeypatch):
    import asyncio

    base, _ = _made(tmp_path)
    monkeypatch.setenv("LOCALSBX_VM_TEMPLATES", "0")
    assert asyncio.run(template.try_ensure(base, cpus=1, memory_mib=64, accel=TCG,
                                           client_key=None)) is None


def test_a_template_that_fails_to_restore_is_discarded(tmp_path):
    base, folder = _made(tmp_path)
    t = template.load(base, cpus=1, memory_mib=64, accel=TCG)
    template.discard(t)
    assert not folder.exists() and not list(folder.parent.glob(".bad-*"))
    assert template.load(base, cpus=1, memory_mib=64, accel=TCG) is None


def test_discard_spares_a_template_made_anew_since(tmp_path):
    import dataclasses

    base, folder = _made(tmp_path)
    t = template.load(base, cpus=1, memory_mib=64, accel=TCG)
    stale = dataclasses.replace(t, made_at=0.5)  # loaded before another process remade it
    template.discard(stale)
    assert template.load(base, cpus=1, memory_mib=64, accel=TCG) is not None


def test_the_next_maker_removes_what_a_killed_one_left(tmp_path):
    import asyncio

    base, folder = _made(tmp_path)
    net = tmp_path / "lsbx-net-123-abc"
    net.mkdir()
    stale = folder.parent / ".tmp-1x64-tcg-dead"
    stale.mkdir()
    (stale / "passt.dir").write_text(f"{net}\n")
    (stale / "ram").write_bytes(b"x")
    # the template is valid, so ensure() returns it without making one and sweeps nothing
    t = asyncio.run(template.ensure(base, cpus=1, memory_mib=64, accel=TCG, client_key=None))
    assert t.folder == folder and stale.exists()
    (folder / template.META).write_text("{}")  # now it must be made: the sweep runs first

    async def boom(*a, **kw):
        raise OSError("no QEMU in a unit test")

    import localsbx._proc as proc
    orig, proc.run = proc.run, boom
    try:
        with pytest.raises(OSError):
            asyncio.run(template.ensure(base, cpus=1, memory_mib=64, accel=TCG,
                                        client_key=asyncssh.generate_private_key("ssh-ed25519")))
    finally:
        proc.run = orig
    assert not stale.exists() and not net.exists()
    assert not list(folder.parent.glob(".tmp-*"))
