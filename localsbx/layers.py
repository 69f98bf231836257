"""The build step cache: one immutable qcow2 layer per finished build step (``layers/``).

This module alone reads and writes ``layers/<id>/layer.json`` (:class:`LayerRecord`).

Layout::

    <data>/layers/<id>/           id = the step's cache key (64 hex), or key~<nonce> for a
        disk.qcow2                   second copy made while the key was taken (--no-cache,
                                     two builds of one step at once); only <key> is a cache
                                     entry, a copy is kept only while an image uses it
        layer.json                the record; written last: a folder without it is a step
                                  in progress (``owner`` = pid and start time of the build)
        output.log                the step's output (at most OUTPUT_MAX bytes, the tail)
    <data>/layers/.lock           builds hold it shared; prune takes it exclusive

A step's key (:func:`step_key`) is the SHA-256 of its parent's key, the step as canonical
JSON after substitution (build-argument values included, so a changed ``--build-arg``
reruns the steps that see it; only the hash is stored), and the digest of the build-context
files (or stages) it reads. The first parent is :func:`root_key` (base digest, the parent
image, the build VM shape). A step that does not touch the disk (``ENV``, ``USER``) has a
record but no disk: ``disk`` names the layer holding the file system after it.

A disk layer's ``disk.qcow2`` is backed (absolute path) by the disk of the step before
(``below``) or by the chain's root (the base rootfs, or an image built before this cache,
whose digest is then in ``pins_image``). Layers are never written once committed (mode
0400). :func:`prune` keeps every layer an image folder names (its steps) and every layer
under those on the disk chain; image folders are kept by :mod:`localsbx.store` while a
project names them or a sandbox or checkpoint uses them, so whatever a running sandbox
reads stays.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from localsbx import paths
from localsbx.errors import ConfigError

#: Bumped when what a step's result depends on changes (old entries are then not found).
CACHE_FORMAT = 1
#: Schema of ``layer.json``.
LAYER_SCHEMA = 1
#: Bytes of a step's output kept in ``output.log`` (the tail).
OUTPUT_MAX = 1 << 20
#: A finished image's top layer deeper than this (disk layers on its chain) is flattened.
MAX_DEPTH = 16


def layers_dir() -> Path:
    """``<data>/layers``: one folder per cached build step."""
    return paths.data_dir() / "layers"


def layer_dir(layer_id: str) -> Path:
    return layers_dir() / layer_id


def disk_path(layer_id: str) -> Path:
    """The ``disk.qcow2`` of layer ``layer_id`` (absolute)."""
    return layer_dir(layer_id) / "disk.qcow2"


# --------------------------------------------------------------------------- keys

def _sha(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def root_key(*, base_digest: str, parent_image: str = "", build_cpus: int,
             build_memory_mb: int) -> str:
    """The key the first step's key is derived from: what the build starts on.

    :param base_digest: ``BaseInfo.digest`` of the base rootfs.
    :param parent_image: digest of the image the definition is ``FROM`` ("" for a base).
    :param build_cpus: vCPUs of the build VM; ``build_memory_mb``: its RAM in MiB (a step
        may read either, e.g. ``nproc``).
    :returns: 64 hex digits.
    """
    return _sha({"cache": CACHE_FORMAT, "base": base_digest, "from": parent_image,
                 "build": [build_cpus, build_memory_mb]})


def step_key(parent_key: str, op_json: dict, reads_digest: str = "") -> str:
    """The cache key of one step.

    :param parent_key: the previous step's key (or :func:`root_key`).
    :param op_json: the op as in ``ImageDefinition.to_json()["ops"]`` (values substituted,
        ``build_env`` holding the build arguments the step sees).
    :param reads_digest: digest of what the step reads besides the guest: build-context
        files (``BuildContext.digest``), stages (``COPY --from``); ``""`` for none.
    :returns: 64 hex digits.
    """
    return _sha({"parent": parent_key, "op": op_json, "reads": reads_digest})


# --------------------------------------------------------------------------- records

@dataclass(frozen=True)
class LayerRecord:
    """``layers/<id>/layer.json``: one finished build step.

    :param id: the folder name (the key, or ``key~nonce`` for a copy).
    :param key: the step's cache key.
    :param parent: id of the previous step's record (``None`` for the first step).
    :param disk: id of the layer whose ``disk.qcow2`` holds the file system after this step
        (``id`` itself for a disk step; ``None``: the chain's root, nothing written yet).
    :param below: for a disk step, the layer its disk is backed by (``None``: the root).
    :param root: absolute path of the chain's root disk (a base ``rootfs.qcow2``, or an
        image's ``build.qcow2`` when ``pins_image`` is set).
    :param depth: disk layers on this step's chain (its own included).
    :param step: the step as shown (``line N: RUN ...``).
    :param env: ``workdir``, ``user``: the build state after the step.
    :param seconds: how long the step ran; ``size``: bytes allocated by its disk (0 for no
        disk); ``created_at``: UNIX seconds.
    """

    id: str
    key: str
    parent: str | None
    disk: str | None
    below: str | None
    root: str
    depth: int
    step: str
    env: dict
    workdir: str
    user: str | None
    seconds: float = 0.0
    size: int = 0
    created_at: float = 0.0
    pins_image: str = ""
    schema: int = LAYER_SCHEMA
    extra: dict = field(default_factory=dict)

    @property
    def has_disk(self) -> bool:
        return self.disk == self.id

    def to_json(self) -> dict:
        d = asdict(self)
        return {**d.pop("extra"), **d}

    @classmethod
    def from_json(cls, data: dict) -> LayerRecord:
        """:raises ValueError: not a layer record, or one of a newer schema."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if int(data.get("schema", 0)) > LAYER_SCHEMA:
            raise ValueError(f"layer schema {data.get('schema')} is newer than this localsbx's "
                             f"({LAYER_SCHEMA})")
        known = {f.name for f in fields(cls)} - {"extra"}
        try:
            return cls(**{k: v for k, v in data.items() if k in known},
                       extra={k: v for k, v in data.items() if k not in known})
        except TypeError as exc:
            raise ValueError(f"incomplete layer record: {exc}") from exc


def read(layer_id: str) -> LayerRecord | None:
    """The committed record of ``layer_id``, or ``None`` (absent, in progress, damaged)."""
    try:
        with open(layer_dir(layer_id) / "layer.json") as f:
            rec = LayerRecord.from_json(json.load(f))
    except (OSError, ValueError):
        return None
    return rec if rec.id == layer_id else None


def output(layer_id: str) -> bytes:
    """The recorded output of a step (``b""`` when none was kept)."""
    try:
        return (layer_dir(layer_id) / "output.log").read_bytes()
    except OSError:
        return b""


def lookup(key: str) -> LayerRecord | None:
    """The cache entry for ``key``: its record when committed and its disk (and the disks
    below it) are present, else ``None``."""
    rec = read(key)
    if rec is None or rec.key != key:
        return None
    for lid in disk_chain(rec):
        if not disk_path(lid).is_file():
            return None
    if rec.pins_image and not Path(rec.root).is_file():
        return None
    return rec


def longest_prefix(keys: Iterable[str]) -> list[LayerRecord]:
    """The records of the longest run of leading ``keys`` that are all cached (in order)."""
    out: list[LayerRecord] = []
    for k in keys:
        rec = lookup(k)
        if rec is None:
            break
        out.append(rec)
    return out


def disk_chain(rec: LayerRecord) -> list[str]:
    """Ids of the disk layers under ``rec`` (``rec``'s disk first, then ``below``...)."""
    out: list[str] = []
    lid = rec.disk
    while lid is not None and lid not in out:
        out.append(lid)
        r = read(lid)
        lid = r.below if r is not None else None
    return out


# --------------------------------------------------------------------------- writing

@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """Held (shared) by a build while it makes and uses layers, so :func:`prune` never
    deletes a layer a build in progress has made but not registered yet."""
    fd = _lock_fd()
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _lock_fd() -> int:
    root = layers_dir()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _owner_alive(d: Path) -> bool:
    from localsbx.vm.qemu import pid_alive

    try:
        pid, start = (int(x) for x in (d / "owner").read_text().split())
    except (OSError, ValueError):
        # between mkdir and writing `owner`: young folders are someone's
        with contextlib.suppress(OSError):
            return time.time() - d.stat().st_mtime < 60
        return False
    return pid_alive(pid, start)


def begin(key: str) -> str:
    """Reserve the folder of a step about to run; returns its id (``key``, or
    ``key~nonce`` when ``key`` is committed or being made by a live build). A folder left
    by a dead build is replaced.

    :raises OSError: the store is not writable.
    """
    from localsbx.vm.qemu import proc_start_time

    root = layers_dir()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    d = root / key
    if d.exists() and not (d / "layer.json").exists() and not _owner_alive(d):
        _rmtree(d)
    try:
        d.mkdir(mode=0o700)
    except FileExistsError:
        d = root / f"{key}~{secrets.token_hex(4)}"
        d.mkdir(mode=0o700)
    _write_private(d / "owner", f"{os.getpid()} {proc_start_time(os.getpid())}".encode())
    return d.name


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file of mode 0600 (the store's rule for metadata: a step's
    output may hold whatever the step printed)."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600),
              "wb") as f:
        f.write(data)


def commit(rec: LayerRecord, out: bytes = b"") -> LayerRecord:
    """Finish the folder :func:`begin` reserved: freeze its disk (a disk step), keep the
    output tail and write the record (atomically, last). Returns the record with the disk's
    allocated size filled in.

    :raises OSError: the disk of a disk step is missing.
    """
    from localsbx import store

    d = layer_dir(rec.id)
    size = 0
    if rec.has_disk:
        p = disk_path(rec.id)
        os.chmod(p, 0o400)
        size = p.stat().st_blocks * 512
    _write_private(d / "output.log", out[-OUTPUT_MAX:])
    import dataclasses

    rec = dataclasses.replace(rec, size=size, created_at=rec.created_at or time.time())
    store.write_json_atomic(d / "layer.json", rec.to_json())
    (d / "owner").unlink(missing_ok=True)
    return rec


def replace_disk(rec: LayerRecord, new_disk: Path, *, root: str) -> LayerRecord:
    """Put a flattened copy ``new_disk`` (same content, backed by ``root`` only) in place of
    ``rec``'s disk (a rename: QEMUs that have the old file open keep reading it) and record
    that it has nothing below it."""
    import dataclasses

    from localsbx import store

    os.chmod(new_disk, 0o400)
    os.replace(new_disk, disk_path(rec.id))
    rec = dataclasses.replace(rec, below=None, root=root, pins_image="", depth=1,
                              size=disk_path(rec.id).stat().st_blocks * 512)
    store.write_json_atomic(layer_dir(rec.id) / "layer.json", rec.to_json())
    return rec


def abandon(layer_id: str) -> None:
    """Remove a folder :func:`begin` reserved (a step that failed or was interrupted)."""
    d = layer_dir(layer_id)
    if not (d / "layer.json").exists():
        _rmtree(d)


def _rmtree(path: Path) -> None:
    from localsbx import store

    store._rmtree(path)


# --------------------------------------------------------------------------- prune

@dataclass
class PruneReport:
    """What :func:`prune` freed: ids of the layers and digests of the image folders
    removed, and the bytes they held on disk (allocated)."""

    layers: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_layers: int = 0


def _allocated(path: Path) -> int:
    total = 0
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        with contextlib.suppress(OSError):
            total += p.lstat().st_blocks * 512
    return total


def used_layers() -> set[str]:
    """Ids of every layer an image folder (named, used by a sandbox or a checkpoint, or
    not yet collected) depends on: its steps' records and their disk chains."""
    from localsbx import store

    keep: set[str] = set()
    root = paths.images_dir()
    if not root.exists():
        return keep
    for d in root.iterdir():
        if d.name.startswith(".") and not d.name.startswith(".tmp-"):
            continue
        try:
            meta = store.ImageMeta.from_json(store.read_json(d / "image.json"))
        except (OSError, ValueError):
            continue
        ids = [s.layer for s in meta.steps if s.layer] + ([meta.layer] if meta.layer else [])
        for lid in ids:
            keep.add(lid)
            rec = read(lid)
            if rec is not None:
                keep.update(disk_chain(rec))
    return keep


def pinned_images() -> set[str]:
    """Digests of images whose ``build.qcow2`` is the root of some layer's chain."""
    out: set[str] = set()
    root = layers_dir()
    if root.exists():
        for d in root.iterdir():
            rec = read(d.name) if not d.name.startswith(".") else None
            if rec is not None and rec.pins_image:
                out.add(rec.pins_image)
    return out


def prune() -> PruneReport:
    """Delete what no image needs: image folders no project names and no sandbox or
    checkpoint uses (:func:`localsbx.store.gc_images`), then every layer that no remaining
    image folder depends on, and folders of steps whose build died.

    Waits for no build: when one is in progress the call fails, since its finished steps
    belong to no image yet.

    :raises ConfigError: a build is in progress (try again when it ends).
    """
    from localsbx import store

    store.reap()
    rep = PruneReport()
    fd = _lock_fd()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError("prune: an image build is in progress; its finished steps "
                              "are not registered yet", hint="run prune when it ends") from None
        sizes = {}
        if paths.images_dir().exists():
            sizes = {d.name: _allocated(d) for d in paths.images_dir().iterdir()
                     if not d.name.startswith(".")}
        rep.images = store.gc_images()
        rep.freed_bytes += sum(sizes.get(g, 0) for g in rep.images)
        keep = used_layers()
        root = layers_dir()
        for d in sorted(root.iterdir()) if root.exists() else []:
            if d.name.startswith(".") or d.name in keep:
                rep.kept_layers += not d.name.startswith(".")
                continue
            if not (d / "layer.json").exists() and _owner_alive(d):
                continue
            rep.freed_bytes += _allocated(d)
            _rmtree(d)
            rep.layers.append(d.name)
        if rep.layers:  # images only those layers pinned may go now
            again = store.gc_images()
            rep.images += again
            rep.freed_bytes += sum(sizes.get(g, 0) for g in again)
    finally:
        os.close(fd)
    return rep
