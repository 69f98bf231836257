"""Bases from any root filesystem: ``base import`` and ``base export``.

A base is a root filesystem plus a *boot kit* (the PVH ``vmlinux`` and the initramfs that
carries busybox, the virtio modules, the guest agent and the dropbear bundle; see
``localsbx/guest/init.sh``).  The kit never lives in the rootfs, so any Linux tree can be
a base: a ``docker export``, a cloud image's root tarball, a busybox-only tree with no libc,
or a static binary with its files and no shell at all. Usage::

    import_base("py", Path("python.tar.zst"))          # rootfs tarball + the kit of debian-minimal
    export_base("py", Path("py.localsbx-base.tar"))     # portable: files + metadata + sha256
    import_base("py", Path("py.localsbx-base.tar"))     # on another machine: the same base

``import_base`` tells the two kinds of archive apart by content: an archive written by
:func:`export_base` has ``localsbx-base.json`` at its top; anything else is a rootfs.
Archives may be plain, gzip, xz or zstd tar (GNU tar detects the compression).

A rootfs import (as root, or under ``fakeroot`` otherwise, so owners and modes survive):

1. ``tar -x`` into a temporary folder (``/dev``, ``/proc``, ``/sys`` contents skipped: they
   are mounted at boot);
2. ``mkfs.ext4 -d`` into a sparse image (label ``root``, ``size_gib`` or 8 GiB, more when
   the tree needs it), ``qemu-img convert`` to ``rootfs.qcow2``;
3. ``vmlinux`` and ``initramfs.cpio`` copied from the kit base (default ``debian-minimal``);
4. ``base.json`` (``kind: imported``) with the source's sha256 and the kit's origin.

An exported base is re-created byte for byte (its ``digest`` is unchanged, so images key
the same); only its name is the one given to ``import``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from localsbx import base as _base
from localsbx.errors import BaseImageError

__all__ = ["ARCHIVE_MANIFEST", "base_from_tree", "export_base", "import_base"]

#: The first member of an archive written by :func:`export_base`.
ARCHIVE_MANIFEST = "localsbx-base.json"
_ARCHIVE_KIND = "localsbx-base"
_ARCHIVE_FORMAT = 1
_FILES = (_base.ROOTFS, _base.VMLINUX, _base.INITRAMFS)
_NAME_RE = r"[a-z0-9][a-z0-9._-]*"
DEFAULT_KIT = "debian-minimal"
_SKIP = ("dev/*", "./dev/*", "proc/*", "./proc/*", "sys/*", "./sys/*")


def _check_name(name: str) -> None:
    if not re.fullmatch(_NAME_RE, name) or len(name) > 64:
        raise BaseImageError(f"invalid base name {name!r}",
                             hint="use lower-case letters, digits, '.', '_' and '-'")


def _sha256(path: Path) -> str:
    return _base._sha256(path)


def _os_release(tree: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for rel in ("etc/os-release", "usr/lib/os-release"):
        p = tree / rel
        if p.is_symlink():  # an absolute link points into the tree, not the host
            target = os.readlink(p)
            p = tree / target.lstrip("/") if target.startswith("/") else p.parent / target
        try:
            text = p.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                out[k.strip()] = v.strip().strip('"')
        break
    return out


def _lacks(tree: Path) -> list[str]:
    """What a booted rootfs will lack, in words (the same notes ``/init`` prints)."""
    notes = []
    sh = tree / "bin" / "sh"
    if not sh.exists() and not sh.is_symlink():
        notes.append("no /bin/sh: shell-form RUN and `sh -c` commands fail; exec form works")
    if not (tree / "etc" / "passwd").is_file():
        notes.append("no /etc/passwd: USER and --user take numeric ids only")
    return notes


def import_base(name: str, source: Path, *, kit: str = DEFAULT_KIT, size_gib: int | None = None,
                force: bool = False, progress: _base.Progress | None = None) -> _base.BaseInfo:
    """Make the base ``name`` from ``source``: a rootfs tarball, or an archive written by
    :func:`export_base` (told apart by content).

    :param kit: for a rootfs: the built base whose kernel and initramfs (the boot kit) it
        boots with.
    :param size_gib: for a rootfs: virtual size of its ext4 filesystem (GiB); default 8, or
        more when the tree needs it.
    :param force: replace an existing base of that name (images built on it become invalid).
    :returns: the new base.
    :raises BaseImageError: bad name, the base exists (without ``force``), an unreadable or
        empty archive, a corrupt exported archive, or the kit base is not built.
    :raises localsbx.errors.ConfigError: a host tool is missing.
    """
    _check_name(name)
    source = Path(source)
    if not source.is_file():
        raise BaseImageError(f"{source}: no such file")
    say = progress or (lambda _text: None)
    tools = ["tar", "mkfs.ext4", "qemu-img"] + ([] if os.geteuid() == 0 else ["fakeroot"])
    _base._require_tools(*tools)
    bases = _base._bases_dir()
    bases.mkdir(parents=True, exist_ok=True)
    with _base._locked(name):
        final = bases / name
        if (final / _base.METADATA).exists() and not force:
            raise BaseImageError(f"base {name!r} already exists",
                                 hint="pass --force to replace it, or choose another name")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=bases))
        work = Path(tempfile.mkdtemp(prefix=f"localsbx-import-{name}-"))
        try:
            tree = work / "tree"
            tree.mkdir()
            say(f"unpacking {source.name}")
            _untar(source, tree, work)
            if (tree / ARCHIVE_MANIFEST).is_file():
                _from_archive(name, tree, tmp, say)
            else:
                src = {"file": source.name, "sha256": _sha256(source)}
                _from_tree(name, tree, tmp, work, source=src, kit=kit, size_gib=size_gib,
                           say=say)
            _install(tmp, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    info = _base._info(name)
    say(f"base {name}: {info.size_bytes / 2**20:.0f} MiB ({info.meta.get('kind', 'built')})")
    return info


def _install(tmp: Path, final: Path) -> None:
    tmp.chmod(0o755)
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}-{int(time.time())}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def base_from_tree(name: str, tree: Path, *, source: dict[str, Any], kit: str = DEFAULT_KIT,
                   extra: dict[str, Any] | None = None,
                   progress: _base.Progress | None = None) -> _base.BaseInfo:
    """Make (or replace) the base ``name`` from an unpacked root tree (consumed: files may be
    moved or changed). ``source`` and ``extra`` go into ``base.json`` (an OCI image's
    reference, digest and config, see :mod:`localsbx.oci`)."""
    _check_name(name)
    say = progress or (lambda _text: None)
    _base._require_tools("mkfs.ext4", "qemu-img")
    bases = _base._bases_dir()
    bases.mkdir(parents=True, exist_ok=True)
    with _base._locked(name):
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=bases))
        work = Path(tempfile.mkdtemp(prefix=f"localsbx-import-{name}-"))
        try:
            _from_tree(name, tree, tmp, work, source=source, kit=kit, size_gib=None, say=say,
                       extra=extra)
            _install(tmp, bases / name)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return _base._info(name)


def _fakeroot(argv: list[str], work: Path) -> list[str]:
    """Run ``argv`` as (fake) root, sharing one fakeroot database across the import."""
    if os.geteuid() == 0:
        return argv
    db = work / "fakeroot.db"
    keep = ["-s", str(db)] + (["-i", str(db)] if db.exists() else [])
    return ["fakeroot", *keep, "--", *argv]


def _untar(source: Path, tree: Path, work: Path) -> None:
    log = work / "import.log"
    argv = ["tar", "-C", str(tree), "--numeric-owner", "-xpf", str(source),
            *(f"--exclude={p}" for p in _SKIP)]
    try:
        _base._run_logged(_fakeroot(argv, work), log, None, step=f"unpacking {source}")
    except BaseImageError as exc:
        raise BaseImageError(f"{source}: not a readable tar archive (plain, gzip, xz or zstd)\n"
                             f"{exc.message}") from exc
    if not any(tree.iterdir()):
        raise BaseImageError(f"{source}: the archive is empty")


def _from_tree(name: str, tree: Path, tmp: Path, work: Path, *, source: dict[str, Any],
               kit: str, size_gib: int | None, say: _base.Progress,
               extra: dict[str, Any] | None = None) -> None:
    t0 = time.monotonic()
    kit_info = _base.get_base(kit)
    used = sum(p.lstat().st_size for p in tree.rglob("*") if not p.is_symlink())
    need = math.ceil(used * 1.3 / 2**30) + 1
    size = size_gib or max(8, need)
    if size < need:
        raise BaseImageError(f"{source.get('file')}: {used / 2**30:.1f} GiB of files do not fit in "
                             f"{size} GiB", hint=f"pass --size-gib {need} or more")
    for note in _lacks(tree):
        say(f"note: {note}")
    # the mount points /init needs, and the one the boot kit is mounted on
    for d in ("dev", "proc", "sys", "run", "tmp", "etc", "usr/lib/localsbx"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "tmp").chmod(0o1777)
    ext4 = work / "rootfs.ext4"
    with open(ext4, "wb") as f:
        f.truncate(size * 2**30)
    log = tmp / _base.BUILD_LOG
    say(f"mkfs.ext4 -d ({used / 2**20:.0f} MiB of files, {size} GiB filesystem)")
    _base._run_logged(_fakeroot(["mkfs.ext4", "-q", "-F", "-L", "root", "-m", "0", "-E",
                                 "lazy_itable_init=0,lazy_journal_init=0", "-d", str(tree),
                                 str(ext4)], work), log, None, step="mkfs.ext4")
    say("qemu-img convert -> rootfs.qcow2")
    _base._run_logged(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(ext4),
                       str(tmp / _base.ROOTFS)], log, None, step="qemu-img convert")
    (tmp / _base.ROOTFS).chmod(0o444)
    for f in (_base.VMLINUX, _base.INITRAMFS):
        shutil.copyfile(kit_info.path / f, tmp / f)
    osr = _os_release(tree)
    files = {f: {"sha256": _sha256(tmp / f), "size": (tmp / f).stat().st_size} for f in _FILES}
    meta: dict[str, Any] = {
        "format": _base._FORMAT,
        "name": name,
        "kind": "imported",
        "distro": osr.get("ID", "unknown"),
        "suite": osr.get("VERSION_CODENAME") or osr.get("VERSION_ID"),
        "source": source,
        "kit_from": kit,
        "kit_digest": kit_info.digest,
        "kernel_version": kit_info.kernel_version,
        "kernel_package": kit_info.meta.get("kernel_package"),
        "initramfs_modules": kit_info.meta.get("initramfs_modules"),
        "rootfs_virtual_size": size * 2**30,
        "rootfs_label": "root",
        "notes": _lacks(tree),
        "files": files,
        "build_seconds": round(time.monotonic() - t0, 1),
        "built_at": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **(extra or {}),
    }
    (tmp / _base.METADATA).write_text(json.dumps(meta, indent=2) + "\n")


def _from_archive(name: str, tree: Path, tmp: Path, say: _base.Progress) -> None:
    try:
        manifest = json.loads((tree / ARCHIVE_MANIFEST).read_text())
        meta = json.loads((tree / _base.METADATA).read_text())
    except (OSError, ValueError) as exc:
        raise BaseImageError(f"exported base archive: unreadable metadata ({exc})") from exc
    if manifest.get("kind") != _ARCHIVE_KIND or manifest.get("format") != _ARCHIVE_FORMAT:
        raise BaseImageError("exported base archive: unknown manifest "
                             f"(kind {manifest.get('kind')!r}, format {manifest.get('format')!r})")
    if meta.get("format", 1) < _base._FORMAT:
        raise BaseImageError(f"exported base archive: base format {meta.get('format', 1)} is "
                             f"older than {_base._FORMAT}; export it again from a rebuilt base")
    say(f"checking {len(_FILES)} files of exported base {manifest.get('name')!r}")
    for f in _FILES:
        want = manifest.get("files", {}).get(f, {}).get("sha256")
        if not (tree / f).is_file() or _sha256(tree / f) != want:
            raise BaseImageError(f"exported base archive: {f} is missing or corrupt "
                                 "(sha256 differs from the manifest)")
        shutil.move(tree / f, tmp / f)
    (tmp / _base.ROOTFS).chmod(0o444)
    if (tree / _base.BUILD_LOG).is_file():
        shutil.move(tree / _base.BUILD_LOG, tmp / _base.BUILD_LOG)
    meta["imported_from"] = {"name": manifest.get("name"), "exported_at": manifest.get("exported_at")}
    meta["name"] = name
    (tmp / _base.METADATA).write_text(json.dumps(meta, indent=2) + "\n")


def export_base(name: str, dest: Path, *, progress: _base.Progress | None = None) -> Path:
    """Write the built base ``name`` to ``dest``: a tar (compressed by the suffix: ``.gz``,
    ``.xz``, ``.zst``) with ``localsbx-base.json`` (name, sha256 of each file) first, then
    ``base.json``, ``rootfs.qcow2``, ``vmlinux``, ``initramfs.cpio``. ``import_base`` on any
    machine turns it back into the same base (same digest).

    :returns: ``dest``.
    :raises BaseImageError: the base is not built, or writing failed.
    """
    info = _base.get_base(name)
    dest = Path(dest).absolute()
    say = progress or (lambda _text: None)
    _base._require_tools("tar")
    work = Path(tempfile.mkdtemp(prefix=f"localsbx-export-{name}-"))
    part = dest.with_name(f".{dest.name}.part")
    try:
        manifest = {
            "kind": _ARCHIVE_KIND,
            "format": _ARCHIVE_FORMAT,
            "name": name,
            "digest": info.digest,
            "files": {f: info.meta["files"][f] for f in _FILES},
            "exported_at": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        (work / ARCHIVE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        members = [_base.METADATA, *_FILES]
        if (info.path / _base.BUILD_LOG).is_file():
            members.append(_base.BUILD_LOG)
        comp = {".gz": "--gzip", ".tgz": "--gzip", ".xz": "--xz", ".zst": "--zstd"}
        flag = comp.get(dest.suffix)
        say(f"writing {dest}" + (f" ({flag.lstrip('-')})" if flag else ""))
        argv = ["tar", "--owner=0", "--group=0", "--numeric-owner", "-cf", str(part),
                *([flag] if flag else []), "-C", str(work), ARCHIVE_MANIFEST,
                "-C", str(info.path), *members]
        _base._run_logged(argv, work / "export.log", None, step=f"writing {dest}")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return dest

