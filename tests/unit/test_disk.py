"""``localsbx.vm.disk.clone_overlay`` on real qcow2 files (qemu-img, no VM): every clone is
byte for byte what ``qemu-img create`` writes, whether it came from the template or not."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from localsbx.vm import disk


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True,
                           text=True).stdout


@pytest.fixture
def backing(tmp_path) -> Path:
    d = tmp_path / "image" / "snap"
    d.mkdir(parents=True)
    qemu_img("create", "-q", "-f", "qcow2", str(d / "disk.qcow2"), "64M")
    return d / "disk.qcow2"


def reference(tmp_path: Path, backing: Path) -> bytes:
    ref = tmp_path / "ref.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "qcow2", str(ref))
    return ref.read_bytes()


async def test_clones_equal_qemu_img_and_the_second_starts_no_qemu_img(tmp_path, backing,
                                                                        monkeypatch):
    await disk.clone_overlay(tmp_path / "a.qcow2", backing)
    template = backing.with_name("disk.qcow2" + disk.TEMPLATE_SUFFIX)
    assert template.exists() and (tmp_path / "a.qcow2").read_bytes() == reference(tmp_path,
                                                                                 backing)

    async def no_qemu_img(*a, **kw):
        raise AssertionError("qemu-img must not run for a second clone")

    monkeypatch.setattr(disk._proc, "run", no_qemu_img)
    await disk.clone_overlay(tmp_path / "b.qcow2", backing)
    monkeypatch.undo()
    assert (tmp_path / "b.qcow2").read_bytes() == reference(tmp_path, backing)
    info = json.loads(qemu_img("info", "--output=json", str(tmp_path / "b.qcow2")))
    assert (info["backing-filename"], info["virtual-size"]) == (str(backing), 64 << 20)
    qemu_img("check", str(tmp_path / "b.qcow2"))  # a valid image, not just equal bytes


async def test_a_template_that_no_longer_fits_its_backing_is_made_anew(tmp_path, backing):
    await disk.clone_overlay(tmp_path / "a.qcow2", backing)
    qemu_img("resize", "-q", str(backing), "128M")  # the virtual size is in the header
    await disk.clone_overlay(tmp_path / "b.qcow2", backing)
    assert (tmp_path / "b.qcow2").read_bytes() == reference(tmp_path, backing)
    assert json.loads(qemu_img("info", "--output=json", str(tmp_path / "b.qcow2"))
                      )["virtual-size"] == 128 << 20
    template = backing.with_name("disk.qcow2" + disk.TEMPLATE_SUFFIX)
    template.write_bytes(b"garbage")  # damaged: made anew, never copied
    await disk.clone_overlay(tmp_path / "c.qcow2", backing)
    assert (tmp_path / "c.qcow2").read_bytes() == reference(tmp_path, backing)


async def test_a_folder_that_cannot_keep_a_template_still_gets_its_overlay(tmp_path, backing,
                                                                           monkeypatch):
    def refuse(*a):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(disk.os, "replace", refuse)
    await disk.clone_overlay(tmp_path / "a.qcow2", backing)
    monkeypatch.undo()
    assert (tmp_path / "a.qcow2").read_bytes() == reference(tmp_path, backing)
    assert sorted(p.name for p in backing.parent.iterdir()) == ["disk.qcow2"]  # no tmp left
