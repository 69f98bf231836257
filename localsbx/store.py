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
import fcntl
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from localsbx import paths
from localsbx.errors import ConfigError, ImageNotFound, SandboxNotFound
from localsbx.vm.qemu import kill_pid, pid_alive

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
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: object) -> None:
    """Write JSON to ``path`` via a temp file in the same folder, fsync and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
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
    return asyncssh.read_private_key(str(key_path))


# --------------------------------------------------------------------------- images

@dataclass
class ImageRecord:
    """A registered image.

    :param name: the registered name.
    :param project: the project it is registered in.
    :param digest: the image folder's name (definition + context digest).
    :param path: the image folder.
    :param meta: ``image.json`` (definition, env, workdir, snapshot key, sizes...).
    """

    name: str
    project: str
    digest: str
    path: Path
    meta: dict = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return dict(self.meta.get("env", {}))

    @property
    def workdir(self) -> str:
        return self.meta.get("workdir", "/")

    @property
    def user(self) -> str | None:
        return self.meta.get("user")


def _project_file(project: str) -> Path:
    return paths.projects_dir() / check_name("project", project) / "images.json"


def _read_table(project: str) -> dict[str, dict]:
    p = _project_file(project)
    try:
        return read_json(p).get("images", {})
    except FileNotFoundError:
        return {}


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
        meta = read_json(d / "image.json")
    except (FileNotFoundError, ValueError) as exc:
        raise ImageNotFound(f"image {name!r} is registered but its files are missing ({d})",
                            hint=f"rebuild it, or remove it: localsbx image rm {name}") from exc
    return ImageRecord(name, project, entry["digest"], d, meta)


def list_images(project: str | None = None) -> list[ImageRecord]:
    """All images of a project, sorted by name (broken entries are skipped with a warning)."""
    project = current_project(project)
    out = []
    for name in sorted(_read_table(project)):
        try:
            out.append(lookup_image(name, project=project))
        except ImageNotFound as exc:
            log.warning("%s", exc.message)
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
    root.mkdir(parents=True, exist_ok=True)
    d = root / f".tmp-{os.getpid()}-{time.time_ns()}"
    d.mkdir()
    (d / "owner").write_text(str(os.getpid()))
    return d


def commit_image_dir(tmp: Path, digest: str) -> Path:
    """Rename a finished build folder to ``images/<digest>`` (replacing an older build of the
    same digest only when no sandbox still uses it)."""
    target = image_dir(digest)
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


def discard_tmpdir(tmp: Path) -> None:
    _rmtree(tmp)


# --------------------------------------------------------------------------- sandboxes

@dataclass
class SandboxRecord:
    """What ``sandboxes/<id>/sandbox.json`` holds.

    Times are UNIX seconds; ``pid`` is the process to signal to stop the sandbox (QEMU, or
    the ``timeout`` wrapper of a detached sandbox), ``pid_start`` its start time (guards
    against pid reuse). ``owner_pid`` is set when the sandbox must die with that process
    (pytest); ``None`` for sandboxes that outlive their creator (``localsbx new``).
    """

    id: str
    image: str
    project: str
    image_digest: str
    pid: int
    pid_start: int | None
    qemu_pid: int
    ssh_port: int
    host_key: str
    env: dict
    workdir: str
    user: str | None
    cpus: int
    memory_mb: int
    created_at: float
    timeout_secs: int
    restored: bool
    owner_pid: int | None = None
    owner_start: int | None = None
    name: str | None = None

    @property
    def dir(self) -> Path:
        return paths.sandboxes_dir() / self.id

    @property
    def deadline(self) -> float | None:
        return self.created_at + self.timeout_secs if self.timeout_secs else None

    def alive(self) -> bool:
        return pid_alive(self.pid, self.pid_start)

    def to_json(self) -> dict:
        return asdict(self)


def sandbox_dir(sandbox_id: str) -> Path:
    return paths.sandboxes_dir() / sandbox_id


def write_sandbox(rec: SandboxRecord) -> None:
    write_json_atomic(rec.dir / "sandbox.json", rec.to_json())


def read_sandbox(sandbox_id: str) -> SandboxRecord:
    """The record of a live sandbox.

    :raises SandboxNotFound: no such id, or its QEMU is gone (the record is then removed).
    """
    d = sandbox_dir(sandbox_id)
    try:
        rec = SandboxRecord(**read_json(d / "sandbox.json"))
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise SandboxNotFound(f"no sandbox {sandbox_id!r}",
                              hint="`localsbx ls` lists the running sandboxes") from exc
    if not rec.alive():
        cleanup_sandbox(rec)
        raise SandboxNotFound(f"sandbox {sandbox_id} is not running any more "
                              "(it was terminated, timed out or its QEMU died)")
    return rec


def cleanup_sandbox(rec: SandboxRecord) -> None:
    """Kill the sandbox's QEMU if still there and remove its folder (and the image folder
    it used, if it was the last user of an unregistered image)."""
    kill_pid(rec.pid, start_time=rec.pid_start)
    if rec.qemu_pid != rec.pid:
        # the QEMU under a `timeout` wrapper; only if it still looks like ours
        with contextlib.suppress(OSError):
            if str(rec.dir) in Path(f"/proc/{rec.qemu_pid}/cmdline").read_bytes().decode(errors="replace"):
                kill_pid(rec.qemu_pid)
    _rmtree(rec.dir)
    drop_image_if_unused(rec.image_digest)


def drop_image_if_unused(digest: str) -> bool:
    """Delete ``images/<digest>`` when no project names it and no live sandbox uses it."""
    if image_is_named(digest) or any(s.image_digest == digest
                                     for s in list_sandboxes(reap_dead=False)):
        return False
    _rmtree(image_dir(digest))
    return True


def image_is_named(digest: str) -> bool:
    """Whether any project registers an image with this digest."""
    if not paths.projects_dir().exists():
        return False
    return any(e.get("digest") == digest for proj in paths.projects_dir().iterdir()
               if proj.is_dir() for e in _read_table(proj.name).values())


def list_sandboxes(*, reap_dead: bool = True) -> list[SandboxRecord]:
    """Live sandboxes, oldest first. Records whose QEMU is gone, and sandboxes whose owning
    process died, are cleaned up on the way (``reap_dead``)."""
    root = paths.sandboxes_dir()
    out = []
    if not root.exists():
        return out
    for d in root.iterdir():
        try:
            rec = SandboxRecord(**read_json(d / "sandbox.json"))
        except FileNotFoundError:
            # a sandbox being created, or a crashed creation: reap if the creator is gone
            if reap_dead:
                _reap_incomplete(d)
            continue
        except (ValueError, TypeError):
            if reap_dead:
                _rmtree(d)
            continue
        owner_gone = rec.owner_pid is not None and not pid_alive(rec.owner_pid, rec.owner_start)
        if not rec.alive() or owner_gone:
            if reap_dead:
                cleanup_sandbox(rec)
            continue
        out.append(rec)
    return sorted(out, key=lambda r: r.created_at)


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
    with contextlib.suppress(OSError, ValueError):
        qpid, qstart = (int(x) for x in (d / "qemu.pid").read_text().split())
        kill_pid(qpid, start_time=qstart)
    _rmtree(d)


def reap() -> int:
    """Clean up dead sandboxes and orphaned build folders; returns how many sandboxes were
    reaped. Called at the start of every localsbx entry point."""
    before = len(list(paths.sandboxes_dir().iterdir())) if paths.sandboxes_dir().exists() else 0
    alive = len(list_sandboxes(reap_dead=True))
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
