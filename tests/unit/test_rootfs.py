"""base import / base export without a VM: host tools (tar, mkfs.ext4, qemu-img) and a
fake kit base (its kernel and initramfs are only copied, never booted here)."""

import json
import subprocess
import tarfile

import pytest

from localsbx import base, rootfs
from localsbx.errors import BaseImageError


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALSBX_HOME", str(tmp_path / "store"))
    kit = tmp_path / "store" / "bases" / "kitbase"
    kit.mkdir(parents=True)
    for f, data in ((base.ROOTFS, b"r"), (base.VMLINUX, b"kernel"), (base.INITRAMFS, b"initrd")):
        (kit / f).write_bytes(data)
    files = {f: {"sha256": base._sha256(kit / f), "size": 1}
             for f in (base.ROOTFS, base.VMLINUX, base.INITRAMFS)}
    (kit / base.METADATA).write_text(json.dumps({
        "format": base._FORMAT, "name": "kitbase", "kernel_version": "6.12-test",
        "initramfs_modules": ["virtio_blk"], "files": files}))
    return tmp_path


def rootfs_tar(tmp_path, name="rootfs.tar.gz", *, shell=True):
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text('ID=testos\nVERSION_ID="1"\n')
    (tree / "app").mkdir()
    (tree / "app" / "hello").write_bytes(b"#!static\n")
    (tree / "app" / "hello").chmod(0o4755)
    (tree / "dev").mkdir()
    if shell:
        (tree / "bin").mkdir()
        (tree / "bin" / "sh").symlink_to("/bin/busybox")
        (tree / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    out = tmp_path / name
    with tarfile.open(out, "w:gz") as t:
        for p in sorted(tree.rglob("*")):
            info = t.gettarinfo(str(p), arcname=str(p.relative_to(tree)))
            info.uid, info.gid = (1000, 1000) if p.name == "hello" else (0, 0)
            t.addfile(info, open(p, "rb") if p.is_file() and not p.is_symlink() else None)
        info = tarfile.TarInfo("dev/console")
        info.type = tarfile.CHRTYPE
        info.devmajor, info.devminor = 5, 1
        t.addfile(info)  # skipped on import (/dev is a devtmpfs at boot)
    return out


def debugfs(image, cmd):
    raw = image.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    out = subprocess.run(["debugfs", "-R", cmd, str(raw)], capture_output=True, text=True)
    raw.unlink()
    return out.stdout


def test_import_rootfs_then_export_and_import_again(store):
    src = rootfs_tar(store)
    notes = []
    info = rootfs.import_base("mine", src, kit="kitbase", progress=notes.append)
    assert info.built and info.meta["kind"] == "imported"
    assert info.meta["distro"] == "testos" and info.meta["kit_from"] == "kitbase"
    assert (info.path / base.VMLINUX).read_bytes() == b"kernel"
    assert info.meta["rootfs_virtual_size"] == 8 * 2**30
    assert "mine" in base.known_base_names()
    assert base.get_base("mine").digest == info.digest
    listing = debugfs(info.rootfs, "stat /app/hello")
    assert "User:  1000" in listing and "Mode:  04755" in listing
    assert "usr" in debugfs(info.rootfs, "ls -l /") and "localsbx" in debugfs(info.rootfs, "ls /usr/lib")
    assert "console" not in debugfs(info.rootfs, "ls /dev")

    with pytest.raises(BaseImageError, match="already exists"):
        rootfs.import_base("mine", src, kit="kitbase")

    archive = rootfs.export_base("mine", store / "mine.base.tar.zst")
    with_manifest = subprocess.run(["tar", "-tf", str(archive)], capture_output=True, text=True)
    assert with_manifest.stdout.splitlines()[0] == rootfs.ARCHIVE_MANIFEST
    copy = rootfs.import_base("copy", archive)
    assert copy.digest == info.digest and copy.meta["name"] == "copy"
    assert copy.meta["imported_from"]["name"] == "mine"
    assert (copy.rootfs.stat().st_mode & 0o777) == 0o444


def test_import_shell_less_rootfs_says_what_is_missing(store):
    notes = []
    info = rootfs.import_base("noshell", rootfs_tar(store, shell=False), kit="kitbase",
                              progress=notes.append)
    assert any("no /bin/sh" in n for n in notes) and any("/etc/passwd" in n for n in notes)
    assert len(info.meta["notes"]) == 2


def test_import_refuses_bad_input(store):
    junk = store / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BaseImageError, match="not a readable tar"):
        rootfs.import_base("junk", junk, kit="kitbase")
    with pytest.raises(BaseImageError, match="invalid base name"):
        rootfs.import_base("Bad/Name", junk)
    with pytest.raises(BaseImageError, match="not built|unknown"):
        rootfs.import_base("nokit", rootfs_tar(store), kit="nosuchkit")
    assert not [p for p in (store / "store" / "bases").iterdir() if p.name.startswith(".tmp")]


def test_corrupt_export_is_refused(store):
    info = rootfs.import_base("mine", rootfs_tar(store), kit="kitbase")
    archive = rootfs.export_base("mine", store / "mine.tar")
    work = store / "x"
    work.mkdir()
    subprocess.run(["tar", "-C", str(work), "-xf", str(archive)], check=True)
    (work / base.VMLINUX).write_bytes(b"tampered")
    bad = store / "bad.tar"
    subprocess.run(["tar", "-C", str(work), "-cf", str(bad), rootfs.ARCHIVE_MANIFEST,
                    base.METADATA, base.ROOTFS, base.VMLINUX, base.INITRAMFS], check=True)
    with pytest.raises(BaseImageError, match="vmlinux is missing or corrupt"):
        rootfs.import_base("bad", bad)
    assert info.built


def test_old_format_base_asks_for_a_rebuild(store):
    meta = store / "store" / "bases" / "kitbase" / base.METADATA
    data = json.loads(meta.read_text())
    data["format"] = 1
    meta.write_text(json.dumps(data))
    with pytest.raises(BaseImageError, match="older localsbx") as exc:
        base.get_base("kitbase")
    assert "import" in (exc.value.hint or "")
    assert [b.to_json()["state"] for b in base.list_bases() if b.name == "kitbase"] == [
        "rebuild needed"]


def test_ubuntu_recipe_renders_and_an_unreachable_archive_fails_at_once(tmp_path, monkeypatch):
    import time

    recipe = base.load_recipe("ubuntu-minimal")
    assert (recipe.distro, recipe.suite, recipe.kernel_package) == ("ubuntu", "noble",
                                                                  "linux-image-virtual")
    argv = base._mmdebstrap_argv(recipe, mode="unshare", stage=tmp_path, agent=tmp_path / "a",
                                 ext4=tmp_path / "e", mirror=recipe.mirror, security=None)
    assert f"--keyring={recipe.keyring}" in argv
    assert "deb http://archive.ubuntu.com/ubuntu noble main universe" in argv
    assert "deb http://archive.ubuntu.com/ubuntu noble-security main universe" in argv
    assert base._mirrors(recipe, None)[0] == recipe.mirror  # the host has no ubuntu source

    monkeypatch.setenv("LOCALSBX_HOME", str(tmp_path / "store"))
    monkeypatch.setenv("LOCALSBX_MIRROR", "http://127.0.0.1:9/ubuntu")
    t0 = time.monotonic()
    with pytest.raises(BaseImageError, match="cannot reach the ubuntu archive for noble") as exc:
        base.build_base("ubuntu-minimal")
    assert time.monotonic() - t0 < base.MIRROR_PROBE_TIMEOUT + 5
    assert "LOCALSBX_MIRROR" in exc.value.hint and "base import" in exc.value.hint
    assert not [p for p in (tmp_path / "store" / "bases").iterdir() if p.name.startswith(".tmp")]
