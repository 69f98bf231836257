"""The local project store: images by name per project, sandbox records, keys, locks.

Layout (under :func:`localsbx.paths.data_dir`) is drawn in docs/ARCHITECTURE.md. Rules:

* A built image is written to ``images/.tmp-*`` and renamed to ``images/<digest>`` only when
  complete; the name is then added to ``projects/<project>/images.json``, which is replaced
  atomically (temp file + ``os.replace``) under an exclusive ``flock``. A failed build leaves
  no name and no image folder.
* A sandbox has ``sandboxes/<id>/sandbox.json``. A record whose QEMU is gone is never shown
  as running: :func:`reap` removes it (and kills QEMUs whose owning process died).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import stat
import time
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from localsbx import paths
from localsbx.errors import (
    ConfigError,
    ImageNotFound,
    SandboxNotFound,
    SandboxStateError,
    SnapshotError,
)
from localsbx.vm.qemu import kill_pid, pid_alive, proc_start_time

log = logging.getLogger("localsbx.store")

DEFAULT_PROJECT = "default"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def check_name(kind: str, name: str) -> str:
    """Validate a project/image name: letters, digits, ``_ . -``, at most 128 characters.

    :raises ConfigError: with what is allowed.
    """
    if not _NAME_RE.match(name or ""):
        raise ConfigError(f"invalid {kind} name {name!r}: use letters, digits, '_', '.', '-' "
                          "(starting with a letter or digit, at most 128 characters)")
    return name


def current_project(explicit: str | None = None) -> str:
    """The project: ``explicit``, else ``$LOCALSBX_PROJECT``, else ``default``."""
    return check_name("project", explicit or os.environ.get("LOCALSBX_PROJECT") or DEFAULT_PROJECT)


@contextlib.contextmanager
def locked(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold an ``flock`` on ``path`` (created if needed) for the ``with`` block.

    Cross-process and cross-thread (each call opens its own file description).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON to ``path`` via a temp file in the same folder, fsync and ``os.replace``."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600),
              "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- keys

def management_key():
    """The store's management SSH key (ed25519, an ``asyncssh.SSHKey``), created on first
    use (mode 0600)."""
    import asyncssh  # lazy: keeps `localsbx ls` and the pytest plugin quick to start
    kdir = paths.keys_dir()
    key_path = kdir / "id_ed25519"
    with locked(kdir / ".lock"):
        if not key_path.exists():
            key = asyncssh.generate_private_key("ssh-ed25519", comment="localsbx management")
            tmp = key_path.with_suffix(".tmp")
            key.write_private_key(str(tmp))
            os.chmod(tmp, 0o600)
            key.write_public_key(str(key_path.with_suffix(".pub")))
            os.replace(tmp, key_path)
    try:
        return asyncssh.read_private_key(str(key_path))
    except (asyncssh.KeyImportError, OSError, ValueError) as exc:
        raise ConfigError(
            f"the store's management SSH key {key_path} is damaged or unreadable ({exc})",
            hint=f"restore it from a backup; or remove {kdir} (a new key is made) and rebuild "
                 "your images with --force (their snapshots trust the old key)") from None


# --------------------------------------------------------------------------- images

@dataclass(frozen=True)
class SnapshotMeta:
    """The memory snapshot of an image (``image.json`` ``snapshot``): compatibility ``key``
    (:func:`localsbx.vm.snapshot.snapshot_key`), the guest's SSH ``host_key`` (public,
    OpenSSH), the shape it was taken at, and the sizes of ``state.mig`` and ``ram`` in bytes
    (checked before a restore)."""

    key: dict
    host_key: str
    cpus: int
    memory_mib: int
    state_size: int
    ram_size: int
    format: int
    #: :func:`localsbx.vm.snapshot.file_digest` of ``state.mig`` and ``ram`` ("" for images
    #: built before digests were recorded: sizes only)
    state_digest: str = ""
    ram_digest: str = ""


@dataclass(frozen=True)
class StepMeta:
    """One build step of an image (``image.json`` ``steps``): its layer id in the step cache
    (:mod:`localsbx.layers`), the step as shown, whether this build took it from the cache,
    the seconds it ran (when it was made) and the bytes its disk layer holds."""

    layer: str
    step: str
    cached: bool
    seconds: float = 0.0
    size: int = 0


@dataclass(frozen=True)
class ImageMeta:
    """``images/<digest>/image.json``, written once by the builder; this module reads it.

    Times are UNIX seconds. ``definition`` is the IR's canonical JSON, ``source`` where it
    came from (a Dockerfile path or ``<dsl>``). Unknown keys from a newer localsbx are kept
    in ``extra``.
    """

    name: str
    digest: str
    base: str
    base_digest: str
    env: dict
    workdir: str
    snapshot: SnapshotMeta
    user: str | None = None
    source: str = ""
    definition: dict | list | None = None
    warnings: tuple = ()
    created_at: float = 0.0
    build_seconds: float = 0.0
    accel: str = ""
    #: the build steps (the step cache's layers) and the id of the disk layer
    #: ``build.qcow2`` is an overlay of ("": none, or an image built before the cache)
    steps: tuple[StepMeta, ...] = ()
    layer: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        d["steps"] = [asdict(s) for s in self.steps]
        extra = d.pop("extra")
        return {**extra, **d}

    @classmethod
    def from_json(cls, data: dict) -> ImageMeta:
        """:raises ValueError: not a complete image record."""
        try:
            known = {f.name for f in fields(cls)} - {"extra"}
            kw = {k: v for k, v in data.items() if k in known}
            snap = {f.name: data["snapshot"][f.name] for f in fields(SnapshotMeta)
                    if f.name in data["snapshot"] or f.default is MISSING}
            kw["snapshot"] = SnapshotMeta(**snap)
            kw["warnings"] = tuple(kw.get("warnings") or ())
            step_keys = {f.name for f in fields(StepMeta)}
            kw["steps"] = tuple(StepMeta(**{k: v for k, v in s.items() if k in step_keys})
                                for s in kw.get("steps") or ())
            return cls(**kw, extra={k: v for k, v in data.items() if k not in known})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"incomplete image record: {exc}") from exc


@dataclass
class ImageRecord:
    """A registered image.

    :param name: the registered name.
    :param project: the project it is registered in.
    :param digest: the image folder's name (definition + context digest).
    :param path: the image folder.
    :param meta: its ``image.json``.
    """

    name: str
    project: str
    digest: str
    path: Path
    meta: ImageMeta

    @property
    def env(self) -> dict[str, str]:
        return dict(self.meta.env)

    @property
    def workdir(self) -> str:
        return self.meta.workdir

    @property
    def user(self) -> str | None:
        return self.meta.user


def _project_file(project: str) -> Path:
    return paths.projects_dir() / check_name("project", project) / "images.json"


def _read_table(project: str) -> dict[str, dict]:
    p = _project_file(project)
    try:
        table = read_json(p).get("images", {})
    except FileNotFoundError:
        return {}
    except (ValueError, AttributeError, OSError) as exc:
        raise ConfigError(f"project {project!r}: its image table {p} is damaged ({exc})",
                          hint="fix or delete that file, then register the images again "
                               "(localsbx image build ...: unchanged builds are reused)") from None
    if not isinstance(table, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("digest"), str) for v in table.values()):
        raise ConfigError(f"project {project!r}: its image table {p} is damaged (not a "
                          "name -> {digest} table)",
                          hint="fix or delete that file, then register the images again")
    return table


def image_dir(digest: str) -> Path:
    return paths.images_dir() / digest


def register_image(project: str, name: str, digest: str) -> ImageRecord:
    """Point ``project/name`` at the complete image folder ``images/<digest>`` (atomic)."""
    check_name("image", name)
    target = image_dir(digest)
    if not (target / "image.json").exists():
        raise ImageNotFound(f"image folder {target} is incomplete; nothing registered")
    pf = _project_file(project)
    with locked(pf.with_name(".lock")):
        table = _read_table(project)
        table[name] = {"digest": digest, "registered_at": time.time()}
        write_json_atomic(pf, {"images": table})
    return lookup_image(name, project=project)


def lookup_image(name: str, *, project: str | None = None) -> ImageRecord:
    """The image registered as ``name`` in the project.

    :raises ImageNotFound: not registered, or its folder is gone; the message lists the
        project's images.
    """
    project = current_project(project)
    table = _read_table(project)
    entry = table.get(name)
    if entry is None:
        known = ", ".join(sorted(table)) or "none"
        raise ImageNotFound(f"no image named {name!r} in project {project!r} (images: {known})",
                            hint=f"build it: localsbx image build Dockerfile -n {name}")
    d = image_dir(entry["digest"])
    try:
        meta = ImageMeta.from_json(read_json(d / "image.json"))
    except FileNotFoundError as exc:
        raise ImageNotFound(f"image {name!r} is registered but its files are missing ({d})",
                            hint=f"rebuild it, or remove it: localsbx image rm {name}") from exc
    except (ValueError, AttributeError, OSError) as exc:
        raise ImageNotFound(f"image {name!r}: its metadata {d / 'image.json'} is damaged "
                            f"({exc})", hint=f"rebuild it (--force), or remove it: "
                                             f"localsbx image rm {name}") from exc
    return ImageRecord(name, project, entry["digest"], d, meta)


def list_images(project: str | None = None) -> list[ImageRecord]:
    """All images of a project, sorted by name (broken entries are skipped with a warning;
    :func:`broken_images` lists them)."""
    project = current_project(project)
    out = []
    for name in sorted(_read_table(project)):
        try:
            out.append(lookup_image(name, project=project))
        except ImageNotFound as exc:
            log.warning("%s", exc.message)
    return out


def broken_images(project: str | None = None) -> list[tuple[str, str]]:
    """``(name, why)`` for each image of a project whose files or metadata are damaged."""
    project = current_project(project)
    out = []
    for name in sorted(_read_table(project)):
        try:
            lookup_image(name, project=project)
        except ImageNotFound as exc:
            out.append((name, exc.message))
    return out


def remove_image(name: str, *, project: str | None = None) -> None:
    """Unregister ``name``; delete its folder when no project and no live sandbox uses it.

    :raises ImageNotFound: not registered.
    """
    project = current_project(project)
    pf = _project_file(project)
    with locked(pf.with_name(".lock")):
        table = _read_table(project)
        if name not in table:
            raise ImageNotFound(f"no image named {name!r} in project {project!r}")
        digest = table.pop(name)["digest"]
        write_json_atomic(pf, {"images": table})
    drop_image_if_unused(digest)


def gc_images(*, min_age: float = 60.0) -> list[str]:
    """Delete image folders that no project names and no live sandbox uses.

    :param min_age: seconds; younger folders are kept (a build registers its name just
        after renaming its folder into place).
    :returns: the digests deleted.
    """
    root = paths.images_dir()
    if not root.exists():
        return []
    named = set()
    if paths.projects_dir().exists():
        for proj in paths.projects_dir().iterdir():
            if proj.is_dir():
                named |= {e.get("digest") for e in _read_table(proj.name).values()}
    in_use = {s.image_digest for s in list_sandboxes(reap_dead=False)}
    in_use |= {c.image_digest for c in list_checkpoints()}
    in_use |= _layer_pins()
    gone = []
    now = time.time()
    for d in root.iterdir():
        if d.name.startswith(".") or d.name in named or d.name in in_use:
            continue
        try:
            age = now - (d / "image.json").stat().st_mtime
        except OSError:
            age = min_age
        if age >= min_age:
            _rmtree(d)
            gone.append(d.name)
    return gone


def _rmtree(path: Path) -> None:
    if not path.exists():
        return
    for p in [path, *path.rglob("*")]:  # frozen files are 0444; make them removable
        with contextlib.suppress(OSError):
            if not p.is_symlink():
                os.chmod(p, 0o755 if p.is_dir() else 0o644)
    shutil.rmtree(path, ignore_errors=True)


def new_image_tmpdir() -> Path:
    """A fresh ``images/.tmp-*`` folder for a build in progress."""
    root = paths.images_dir()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    d = root / f".tmp-{os.getpid()}-{time.time_ns()}"
    d.mkdir(mode=0o700)
    (d / "owner").write_text(str(os.getpid()))
    return d


def commit_image_dir(tmp: Path, digest: str) -> Path:
    """Rename a finished build folder to ``images/<digest>`` (replacing an older build of the
    same digest only when no sandbox still uses it)."""
    target = image_dir(digest)
    make_private(tmp)
    with locked(paths.images_dir() / ".lock"):
        if target.exists():
            if any(s.image_digest == digest for s in list_sandboxes()):
                # keep the old one; the new build is identical by digest
                _rmtree(tmp)
                return target
            _rmtree(target)
        (tmp / "owner").unlink(missing_ok=True)
        os.rename(tmp, target)
    return target


def make_private(tree: Path) -> None:
    """Drop group and other permissions from everything under ``tree`` (files written by
    QEMU or qemu-img under the caller's umask: logs, the snapshot initrd with the guest's
    SSH host key)."""
    for p in [tree, *tree.rglob("*")]:
        with contextlib.suppress(OSError):
            st = p.lstat()
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                os.chmod(p, stat.S_IMODE(st.st_mode) & 0o700)


def discard_tmpdir(tmp: Path) -> None:
    _rmtree(tmp)


# --------------------------------------------------------------------------- sandboxes

class SandboxState(enum.StrEnum):
    """A sandbox's status, with Tensorlake's names (``SandboxStatus``)."""

    PENDING = "pending"
    RUNNING = "running"
    SUSPENDED = "suspended"
    TERMINATED = "terminated"
    FAILED = "failed"


#: Version of ``sandbox.json``. 1: the first release (no ``schema`` key, ``pid`` = the QEMU or
#: its coreutils ``timeout`` wrapper, no state). 2: state, supervisor, ports, time accounting.
SANDBOX_SCHEMA = 2


@dataclass
class SandboxRecord:
    """What ``sandboxes/<id>/sandbox.json`` holds; this module alone reads and writes it.

    Times are UNIX seconds, sizes MiB. ``qemu_pid``/``qemu_start`` (``/proc`` start time,
    a guard against pid reuse) is the guest's QEMU, ``None`` while suspended;
    ``supervisor_pid``/``supervisor_start`` the process that owns it and serves
    ``control_socket`` (see :mod:`localsbx.supervisor`). ``owner_pid`` is set when the sandbox
    must die with that process (pytest, a library caller); ``None`` for sandboxes that
    outlive their creator (``localsbx new``). The timeout counts running time only:
    ``used_secs`` before the current run, which began at ``running_since``.

    Boot fields (``kernel``, ``initrd``, ``ram_file``, ``disk``) say how to start its QEMU
    again (resume); ``source`` is ``image``, ``checkpoint:<id>`` or ``legacy``. Unknown keys
    from a newer localsbx are kept in ``extra`` and written back. Egress lists:
    ``allow_out``/``deny_out`` as the caller gave them, ``allow_nets``/``deny_nets`` the
    same resolved at create (what every boot and resume enforces); a record without them
    (older localsbx) has no filter.
    """

    id: str
    image: str
    project: str
    image_digest: str
    state: SandboxState = SandboxState.PENDING
    name: str | None = None
    created_at: float = 0.0
    cpus: int = 1
    memory_mb: int = 1024
    disk_mb: int = 0
    timeout_secs: int = 0
    used_secs: float = 0.0
    running_since: float | None = None
    env: dict = field(default_factory=dict)
    workdir: str = "/"
    user: str | None = None
    restored: bool = False
    source: str = "image"
    kernel: str = ""
    initrd: str = ""
    base_initrd: str = ""
    ram_file: str | None = None
    state_file: str | None = None
    disk_backing: str = ""
    cold_boot: bool = False
    internet: bool = True
    allow_out: list[str] = field(default_factory=list)  # Tensorlake's entries, as given
    deny_out: list[str] = field(default_factory=list)
    allow_nets: list[str] = field(default_factory=list)  # the same, resolved at create
    deny_nets: list[str] = field(default_factory=list)
    host_key: str = ""
    ssh_port: int = 0
    qemu_pid: int | None = None
    qemu_start: int | None = None
    supervisor_pid: int | None = None
    supervisor_start: int | None = None
    control_socket: str = ""
    qmp_socket: str = ""
    owner_pid: int | None = None
    owner_start: int | None = None
    creator_pid: int | None = None
    creator_start: int | None = None
    ports: dict[str, int] = field(default_factory=dict)
    notice: str | None = None
    error: str | None = None
    schema: int = SANDBOX_SCHEMA
    extra: dict = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return paths.sandboxes_dir() / self.id

    @property
    def sandbox_id(self) -> str:
        return self.id

    def remaining_secs(self, now: float | None = None) -> float | None:
        """Seconds of running time left before the timeout, ``None`` = no timeout."""
        if not self.timeout_secs:
            return None
        used = self.used_secs
        if self.running_since is not None:
            used += (now or time.time()) - self.running_since
        return self.timeout_secs - used

    @property
    def deadline(self) -> float | None:
        """Wall time the timeout fires if the sandbox keeps running (``None``: never, or
        suspended)."""
        left = self.remaining_secs()
        if left is None or self.running_since is None:
            return None
        return time.time() + left

    def qemu_alive(self) -> bool:
        return self.qemu_pid is not None and pid_alive(self.qemu_pid, self.qemu_start)

    def supervisor_alive(self) -> bool:
        return (self.supervisor_pid is not None
                and pid_alive(self.supervisor_pid, self.supervisor_start))

    def owner_gone(self) -> bool:
        return self.owner_pid is not None and not pid_alive(self.owner_pid, self.owner_start)

    def alive(self) -> bool:
        """Whether the sandbox still exists: its QEMU runs, it is suspended (no QEMU by
        design), or it is being started by a live supervisor."""
        if self.state is SandboxState.SUSPENDED:
            return True
        if self.state is SandboxState.PENDING:
            return (self.supervisor_alive() or self.qemu_alive()
                    or (self.creator_pid is not None
                        and pid_alive(self.creator_pid, self.creator_start)))
        if self.state is SandboxState.RUNNING:
            return self.qemu_alive()
        return False

    def to_json(self) -> dict:
        d = asdict(self)
        d["state"] = self.state.value
        extra = d.pop("extra")
        return {**extra, **d}

    @classmethod
    def from_json(cls, data: dict) -> SandboxRecord:
        """Read a record of any schema (1 is migrated; unknown keys go to ``extra``).

        :raises ValueError: not a sandbox record (no ``id``).
        """
        data = dict(data)
        if not isinstance(data.get("id"), str) or not _ID_RE.match(data["id"]):
            # the id names a folder that cleanup deletes: never a path
            raise ValueError(f"not a sandbox record (bad id {data.get('id')!r})")
        if data.get("schema") is None:
            data = _migrate_v1(data)
        known = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        kw["state"] = SandboxState(kw.get("state", "running"))
        kw["ports"] = {str(k): int(v) for k, v in (kw.get("ports") or {}).items()}
        return cls(**kw, extra=extra)


def _migrate_v1(d: dict) -> dict:
    """Schema 1 → 2: a running sandbox whose ``pid`` is QEMU or its ``timeout`` wrapper; it
    has no supervisor yet (one attaches on first use)."""
    out = dict(d)
    pid, start = out.pop("pid", None), out.pop("pid_start", None)
    qpid = out.get("qemu_pid") or pid
    out["qemu_pid"] = qpid
    out["qemu_start"] = start if qpid == pid else proc_start_time(qpid) if qpid else None
    if pid is not None and pid != qpid:
        out["legacy_wrapper_pid"] = [pid, start]
    created = float(out.get("created_at") or time.time())
    out.update(schema=SANDBOX_SCHEMA, state="running", source="legacy", running_since=created,
               used_secs=0.0)
    return out


def sandbox_dir(sandbox_id: str) -> Path:
    return paths.sandboxes_dir() / sandbox_id


@contextlib.contextmanager
def sandbox_locked(sandbox_id: str) -> Iterator[None]:
    """The per-sandbox record lock (``sandboxes/<id>/.lock``): hold it for read-modify-write."""
    with locked(sandbox_dir(sandbox_id) / ".lock"):
        yield


def write_sandbox(rec: SandboxRecord) -> None:
    """Write the whole record (the supervisor, or a creator before it starts)."""
    with sandbox_locked(rec.id):
        write_json_atomic(rec.dir / "sandbox.json", rec.to_json())


def update_sandbox(sandbox_id: str, **changes) -> SandboxRecord:
    """Change some fields of a record under its lock and return the new record (the other
    fields keep what other processes wrote).

    :raises SandboxNotFound: no such record.
    """
    with sandbox_locked(sandbox_id):
        rec = load_sandbox(sandbox_id)
        for k, v in changes.items():
            if not hasattr(rec, k):
                raise AttributeError(f"SandboxRecord has no field {k!r}")
            setattr(rec, k, v)
        write_json_atomic(rec.dir / "sandbox.json", rec.to_json())
    return rec


def load_sandbox(sandbox_id: str) -> SandboxRecord:
    """The record as stored, whatever its state (no liveness check).

    :raises SandboxNotFound: no such record, or it cannot be read.
    """
    if not _ID_RE.match(sandbox_id or ""):
        raise SandboxNotFound(f"no sandbox {sandbox_id!r} (an id is 12 lowercase letters and "
                              "digits)", hint="`localsbx ls` lists the sandboxes")
    d = sandbox_dir(sandbox_id)
    try:
        rec = SandboxRecord.from_json(read_json(d / "sandbox.json"))
        if rec.id != sandbox_id:
            raise ValueError(f"it names sandbox {rec.id!r}")
        return rec
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise SandboxNotFound(f"no sandbox {sandbox_id!r}",
                              hint="`localsbx ls` lists the sandboxes") from exc
    except (ValueError, TypeError) as exc:
        raise SandboxNotFound(f"sandbox {sandbox_id!r}: its record {d / 'sandbox.json'} "
                              f"cannot be read ({exc})",
                              hint="`localsbx gc` removes it once its QEMU is gone") from exc


def read_sandbox(id_or_name: str, *, project: str | None = None) -> SandboxRecord:
    """The record of a live sandbox, by id or by name (names are unique per project;
    Tensorlake's ``connect(sandbox_id or name)``).

    :raises SandboxNotFound: no such id or name, or its QEMU is gone (the record is then
        removed).
    """
    try:
        rec = load_sandbox(id_or_name) if _ID_RE.match(id_or_name) else None
    except SandboxNotFound:
        rec = None
    if rec is None:
        proj = current_project(project)
        named = [r for r in list_sandboxes() if r.name == id_or_name and r.project == proj]
        if not named:
            raise SandboxNotFound(f"no sandbox {id_or_name!r} (no such id, and no sandbox of "
                                  f"that name in project {proj!r})",
                                  hint="`localsbx ls` lists the sandboxes")
        rec = named[0]
    if not rec.alive():
        cleanup_sandbox(rec)
        raise SandboxNotFound(f"sandbox {rec.id} is not running any more "
                              "(it was terminated, timed out or its QEMU died)")
    return rec


_ID_RE = re.compile(r"^[a-z0-9]{12}$")


def stop_pid(pid: int | None, start: int | None, *, grace: float = 5.0) -> None:
    """Stop a process we started, if it is still that process: SIGTERM, then SIGKILL after
    ``grace`` seconds. Bounded (at most ``grace`` + 1 s). The one way localsbx stops a
    QEMU or a supervisor from outside its owner."""
    if pid is None or not pid_alive(pid, start):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not pid_alive(pid, start):
            return
        time.sleep(0.02)
    kill_pid(pid, start_time=start)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and pid_alive(pid, start):
        time.sleep(0.02)


def cleanup_sandbox(rec: SandboxRecord, *, grace: float = 0.0) -> None:
    """Stop the sandbox's supervisor and QEMU if still there and remove its folder (and the
    image folder it used, if it was its last user). Synchronous: works without an event
    loop (last-chance cleanup)."""
    stop_pid(rec.supervisor_pid, rec.supervisor_start, grace=grace)
    stop_pid(rec.qemu_pid, rec.qemu_start, grace=grace)
    with contextlib.suppress(OSError):  # passt's private socket folder under /tmp
        net_dir = Path((rec.dir / "passt.dir").read_text().strip())
        if net_dir.name.startswith("lsbx-net-"):
            shutil.rmtree(net_dir, ignore_errors=True)
    wrapper = rec.extra.get("legacy_wrapper_pid")
    if wrapper:
        stop_pid(wrapper[0], wrapper[1], grace=grace)
    _kill_recorded_qemu(rec.dir)
    _rmtree(rec.dir)
    drop_image_if_unused(rec.image_digest)


def _kill_recorded_qemu(d: Path) -> None:
    """Kill the QEMU and its network helper recorded in ``<dir>/qemu.pid`` and
    ``passt.pid`` at spawn time (a creation cut short, a supervisor killed)."""
    for name in ("qemu.pid", "passt.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid, start = (int(x) for x in (d / name).read_text().split())
            kill_pid(pid, start_time=start)


def drop_image_if_unused(digest: str) -> bool:
    """Delete ``images/<digest>`` when no project names it and no live sandbox or
    checkpoint uses it."""
    if image_is_named(digest) or any(s.image_digest == digest
                                     for s in list_sandboxes(reap_dead=False)):
        return False
    if any(c.image_digest == digest for c in list_checkpoints()):
        return False
    if digest in _layer_pins():
        return False
    _rmtree(image_dir(digest))
    return True


def _layer_pins() -> set[str]:
    """Images whose disk is the root of a cached build step's chain (built before the step
    cache, then used as a FROM): kept until those steps are pruned."""
    from localsbx import layers

    return layers.pinned_images()


def image_is_named(digest: str) -> bool:
    """Whether any project registers an image with this digest."""
    if not paths.projects_dir().exists():
        return False
    return any(e.get("digest") == digest for proj in paths.projects_dir().iterdir()
               if proj.is_dir() for e in _read_table(proj.name).values())


def list_sandboxes(*, reap_dead: bool = True, project: str | None = None) -> list[SandboxRecord]:
    """Live sandboxes (pending, running, suspended), oldest first. With ``reap_dead``,
    records whose QEMU is gone and sandboxes whose owning process died are cleaned up on the
    way. A record that cannot be read is never deleted while a QEMU recorded for it runs.

    :param project: only this project's (``None``: all).
    """
    root = paths.sandboxes_dir()
    out = []
    if not root.exists():
        return out
    for d in root.iterdir():
        if not d.is_dir():
            continue
        try:
            rec = SandboxRecord.from_json(read_json(d / "sandbox.json"))
            if rec.id != d.name:
                raise ValueError(f"record of {rec.id!r} in folder {d.name!r}")
        except FileNotFoundError:
            # a sandbox being created, or a crashed creation: reap if the creator is gone
            if reap_dead:
                _reap_incomplete(d)
            continue
        except (ValueError, TypeError) as exc:
            if reap_dead:
                _reap_unreadable(d, exc)
            continue
        if not rec.alive() or rec.owner_gone():
            if reap_dead:
                cleanup_sandbox(rec)
            continue
        if project is None or rec.project == project:
            out.append(rec)
    return sorted(out, key=lambda r: r.created_at)


def _reap_unreadable(d: Path, exc: Exception) -> None:
    """A record that does not parse: keep it while its QEMU runs (say so); otherwise remove
    the folder once it is old enough not to be a write in progress."""
    with contextlib.suppress(OSError, ValueError):
        qpid, qstart = (int(x) for x in (d / "qemu.pid").read_text().split())
        if pid_alive(qpid, qstart):
            log.warning("sandbox folder %s: record unreadable (%s) but its QEMU (pid %s) "
                        "runs; left alone", d, exc, qpid)
            return
    with contextlib.suppress(OSError):
        if time.time() - (d / "sandbox.json").stat().st_mtime < 60:
            return
    _rmtree(d)


def _reap_incomplete(d: Path) -> None:
    try:
        creator = int((d / "creator").read_text().split()[0])
        start = int((d / "creator").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        creator, start = None, None
    if creator is not None and pid_alive(creator, start):
        return
    if creator is None:
        # another process may be between mkdir and writing `creator` (every create reaps
        # first, so with pytest-xdist this race is real): leave young folders alone
        with contextlib.suppress(OSError):
            if time.time() - d.stat().st_mtime < 60:
                return
    _kill_recorded_qemu(d)
    _rmtree(d)


def reap() -> int:
    """Clean up dead sandboxes, sandboxes past their timeout whose supervisor is gone, and
    orphaned build folders; returns how many sandboxes were reaped. Called at the start of
    every localsbx entry point."""
    root = paths.sandboxes_dir()
    before = sum(1 for d in root.iterdir() if d.is_dir()) if root.exists() else 0
    alive = 0
    for rec in list_sandboxes(reap_dead=True):
        left = rec.remaining_secs()
        if (rec.state is SandboxState.RUNNING and left is not None and left <= 0
                and not rec.supervisor_alive()):
            log.warning("sandbox %s ran past its timeout with no supervisor; stopping it", rec.id)
            cleanup_sandbox(rec)
            continue
        alive += 1
    root = paths.images_dir()
    if root.exists():
        for d in root.glob(".tmp-*"):
            try:
                owner = int((d / "owner").read_text())
            except (OSError, ValueError):
                owner = None
            if owner is None or not pid_alive(owner):
                _rmtree(d)
    return max(0, before - alive)


# --------------------------------------------------------------------------- checkpoints

@dataclass
class CheckpointRecord:
    """A checkpoint of a sandbox (``checkpoints/<id>/checkpoint.json``; Tensorlake's
    snapshot). ``kind`` is ``memory`` (``state.mig`` holds the whole guest RAM and device
    state, ``disk.qcow2`` the disk at that instant) or ``filesystem`` (disk only; clones
    cold-boot on it). Its disk is backed by the image's snapshot disk, so the image folder
    stays while the checkpoint exists. The boot fields copy the sandbox's."""

    id: str
    sandbox_id: str
    image: str
    project: str
    image_digest: str
    kind: str
    created_at: float
    cpus: int
    memory_mb: int
    env: dict
    workdir: str
    user: str | None
    kernel: str
    initrd: str
    ram_file: str | None
    host_key: str
    base_initrd: str = ""
    size_bytes: int = 0
    status: str = "completed"
    schema: int = 1
    #: :func:`localsbx.vm.snapshot.file_digest` of ``state.mig`` (memory checkpoints;
    #: "" for older ones), checked before a restore
    state_digest: str = ""

    @property
    def dir(self) -> Path:
        return paths.data_dir() / "checkpoints" / self.id

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CheckpointRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def checkpoints_dir() -> Path:
    return paths.data_dir() / "checkpoints"


def new_checkpoint_tmpdir() -> Path:
    """A fresh ``checkpoints/.tmp-*`` folder for a checkpoint being written."""
    root = checkpoints_dir()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    d = root / f".tmp-{os.getpid()}-{time.time_ns()}"
    d.mkdir(mode=0o700)
    return d


def commit_checkpoint(tmp: Path, rec: CheckpointRecord) -> CheckpointRecord:
    """Write the record into ``tmp`` and rename it to ``checkpoints/<id>`` (atomic)."""
    write_json_atomic(tmp / "checkpoint.json", rec.to_json())
    make_private(tmp)
    os.rename(tmp, rec.dir)
    return rec


def read_checkpoint(checkpoint_id: str) -> CheckpointRecord:
    """:raises SandboxNotFound: no such checkpoint (Tensorlake: snapshot not found)."""
    try:
        return CheckpointRecord.from_json(
            read_json(checkpoints_dir() / checkpoint_id / "checkpoint.json"))
    except (OSError, ValueError, TypeError) as exc:
        raise SnapshotError(f"no checkpoint {checkpoint_id!r}",
                            hint="`localsbx snapshot ls` lists them") from exc


def list_checkpoints(sandbox_id: str | None = None) -> list[CheckpointRecord]:
    """All complete checkpoints (optionally of one sandbox), oldest first."""
    root = checkpoints_dir()
    out = []
    if root.exists():
        for d in root.iterdir():
            if d.name.startswith("."):
                continue
            with contextlib.suppress(OSError, ValueError, TypeError):
                c = CheckpointRecord.from_json(read_json(d / "checkpoint.json"))
                if sandbox_id is None or c.sandbox_id == sandbox_id:
                    out.append(c)
    return sorted(out, key=lambda c: c.created_at)


def delete_checkpoint(checkpoint_id: str) -> None:
    """Delete a checkpoint.

    :raises SnapshotError: no such checkpoint.
    :raises SandboxStateError: a live sandbox restored from it still uses its disk.
    """
    c = read_checkpoint(checkpoint_id)
    users = [s.id for s in list_sandboxes() if s.source == f"checkpoint:{checkpoint_id}"]
    if users:
        raise SandboxStateError(f"checkpoint {checkpoint_id} is the disk of live sandboxes "
                                f"{', '.join(users)}", hint="terminate them first")
    _rmtree(c.dir)
    drop_image_if_unused(c.image_digest)

