"""The build-operation IR: what every image definition (Dockerfile, Python DSL, HTTP API) becomes.

An :class:`ImageDefinition` is a base image name plus an ordered tuple of five kinds of
operation (:class:`Run`, :class:`Copy`, :class:`Add`, :class:`Env`, :class:`Workdir`).
Readers resolve everything they can before the IR is made: variables are substituted,
``WORKDIR`` paths and ``COPY``/``ADD`` destinations are absolute (a destination that ends in
``/`` names a directory, as in Docker). The builder knows nothing about Dockerfiles and the
readers know nothing about QEMU.

The IR is frozen and hashable; :meth:`ImageDefinition.digest` is a stable SHA-256 over the
canonical JSON form (and the content of the build-context files it reads, when a context is
given), used as the image's cache key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
from dataclasses import dataclass, field
from typing import Union

from localsbx.errors import SourceLocation

#: Docker's default PATH for root (moby ``oci.DefaultPathEnv``); applied before image ENV.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def resolve_path(workdir: str, path: str) -> str:
    """Resolve ``path`` against ``workdir`` the way Docker resolves WORKDIR and COPY dest.

    Relative paths are joined to ``workdir`` and cleaned (``..`` and ``.`` removed); a
    trailing ``/`` (meaning "a directory") is kept. No ``~`` expansion (Docker does none).

    :param workdir: absolute working directory, e.g. ``/srv/app``.
    :param path: absolute or relative path as written.
    :returns: absolute, normalised path.
    """
    trailing = path.endswith("/") or path.endswith("/.") or path in (".", "..")
    joined = path if path.startswith("/") else posixpath.join(workdir or "/", path)
    norm = posixpath.normpath(joined)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if trailing and norm != "/":
        norm += "/"
    return norm


@dataclass(frozen=True)
class Mount:
    """A ``RUN --mount`` (BuildKit): visible to that step only, never in the image.

    :param type: ``cache`` (kept on the host per ``id``, across builds), ``tmpfs``,
        ``secret`` (the content of ``--secret id=ID,src=FILE``, default target
        ``/run/secrets/ID``) or ``bind`` (``source`` from the build context, or from the
        stage ``from_stage``; read-only unless ``rw``).
    """

    type: str
    target: str
    id: str = ""
    source: str = ""
    from_stage: str | None = None
    rw: bool = False
    required: bool = False
    mode: str | None = None


@dataclass(frozen=True)
class Run:
    """Run a command in the build VM (Docker ``RUN``, Tensorlake ``Image.run``).

    :param argv: exactly what is executed. Shell form is ``("/bin/sh", "-c", command)``
        (Docker's semantics: dash on Debian, no errexit); exec form is the JSON list as
        written, run without a shell.
    :param shell: ``True`` for shell form.
    :param script: for a heredoc whose body starts with ``#!``: the body, which the builder
        writes to a fresh temporary file in the guest (mode 0755) and runs as
        ``argv + (path,)``; ``argv`` is ``()`` then, so the kernel honours the shebang
        (BuildKit's behaviour).
    :param build_env: build-time-only variables (Dockerfile ``ARG`` values in scope) as
        ``(key, value)`` pairs; visible to this step, never stored in the image.
    """

    argv: tuple[str, ...]
    shell: bool = True
    script: str | None = None
    build_env: tuple[tuple[str, str], ...] = ()
    location: SourceLocation | None = field(default=None, compare=False)
    text: str = field(default="", compare=False)
    mounts: tuple[Mount, ...] = ()

    def describe(self) -> str:
        return _describe(self, "RUN " + (self.text or " ".join(self.argv)))


@dataclass(frozen=True)
class Copy:
    """Copy files from the build context into the image (Docker ``COPY``).

    :param sources: paths (or globs) relative to the build-context root, as written.
    :param dest: absolute destination; ends with ``/`` when it names a directory.
    :param chown: ``user[:group]`` (names resolved in the image's /etc/passwd and
        /etc/group, numbers taken as ids; a user without group uses the same id as group),
        or ``None`` for root:root.
    :param chmod: octal mode string such as ``"0750"``, or ``None`` to keep source modes.
    :param from_stage: ``COPY --from``: the key of an earlier stage
        (:attr:`ImageDefinition.stages`); sources are absolute paths in that stage.
    :param from_image: ``COPY --from=NAME`` where NAME is no stage: an image, resolved as
        ``FROM`` is (a registered localsbx image, then a base, then a registry image), as
        BuildKit takes a ``--from`` that names no stage for an image reference; sources are
        absolute paths in that image's root.
    :param inline: ``COPY <<EOF`` files as ``(name, content)`` pairs; their names are in
        ``sources`` and are not read from the build context.
    """

    sources: tuple[str, ...]
    dest: str
    chown: str | None = None
    chmod: str | None = None
    inline: tuple[tuple[str, str], ...] = ()
    from_stage: str | None = None
    from_image: str | None = None
    location: SourceLocation | None = field(default=None, compare=False)
    text: str = field(default="", compare=False)

    def describe(self) -> str:
        return _describe(self, "COPY " + (self.text or f"{' '.join(self.sources)} {self.dest}"))


@dataclass(frozen=True)
class Add(Copy):
    """Like :class:`Copy`, but local tar archives (plain, gzip, bzip2, xz; detected by
    content, not name) are extracted into ``dest`` and ``http(s)://`` sources are
    downloaded (never extracted, mode 0600), as Docker ``ADD`` does."""

    def describe(self) -> str:
        return _describe(self, "ADD " + (self.text or f"{' '.join(self.sources)} {self.dest}"))


@dataclass(frozen=True)
class Env:
    """Set an environment variable for every later step and every sandbox command
    (Docker ``ENV``). ``value`` is final: quotes removed, variables substituted."""

    key: str
    value: str
    location: SourceLocation | None = field(default=None, compare=False)
    text: str = field(default="", compare=False)

    def describe(self) -> str:
        return _describe(self, "ENV " + (self.text or f"{self.key}={self.value}"))


@dataclass(frozen=True)
class Workdir:
    """Set the working directory (absolute, cleaned) for later steps and sandbox
    commands; it is created if missing (Docker ``WORKDIR``)."""

    path: str
    location: SourceLocation | None = field(default=None, compare=False)
    text: str = field(default="", compare=False)

    def describe(self) -> str:
        return _describe(self, "WORKDIR " + (self.text or self.path))


@dataclass(frozen=True)
class User:
    """Run later steps and every sandbox command as ``user`` (``name``, ``uid`` or
    ``uid:gid``; Docker ``USER``)."""

    user: str
    location: SourceLocation | None = field(default=None, compare=False)
    text: str = field(default="", compare=False)

    def describe(self) -> str:
        return _describe(self, "USER " + (self.text or self.user))


Op = Union[Run, Copy, Add, Env, Workdir, User]


def _describe(op: Op, text: str) -> str:
    loc = op.location
    if loc is not None and loc.line:
        return f"line {loc.line}: {text}"
    return text


@dataclass(frozen=True)
class Stage:
    """An earlier stage of a multi-stage Dockerfile that the image copies from: built in a
    scratch root of the build VM, never part of the image.

    :param key: the stage's index (as a string), what ``Copy.from_stage`` holds.
    :param name: its ``AS`` name, if any.
    :param definition: its base and ops (a stage ``FROM`` another stage holds that stage's
        ops first).
    """

    key: str
    name: str | None
    definition: ImageDefinition


@dataclass(frozen=True)
class ImageDefinition:
    """A whole image: base name + ops, as produced by every reader.

    :param name: the name to register (``Image(name=...)`` or ``-n NAME``).
    :param base: base image name (``debian-minimal``, ...).
    :param ops: the operations in order.
    :param source: where it came from (Dockerfile path or ``<dsl>``), for messages.
    :param warnings: reader warnings (ignored instructions, deprecated syntax), each with
        a line number; shown to the user, not part of the digest.
    :param build_cpus: vCPUs of the build VM (Tensorlake default 2).
    :param build_memory_mb: RAM of the build VM in MiB (Tensorlake default 4096).
    :param cmd: Dockerfile ``CMD`` (argv; shell form is the SHELL plus the text), recorded.
    :param entrypoint: Dockerfile ``ENTRYPOINT``, recorded.
    :param stages: the other stages ``COPY --from`` needs, in build order (multi-stage).
    """

    name: str
    base: str
    ops: tuple[Op, ...] = ()
    source: str = "<dsl>"
    warnings: tuple[str, ...] = field(default=(), compare=False)
    build_cpus: int = 2
    build_memory_mb: int = 4096
    cmd: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    stages: tuple[Stage, ...] = ()

    def to_json(self) -> dict:
        """Canonical JSON form (no locations): used for the digest and stored metadata."""
        out = []
        for op in self.ops:
            d: dict = {"op": type(op).__name__.lower()}
            if isinstance(op, Run):
                d.update(argv=list(op.argv), shell=op.shell, script=op.script,
                         build_env=[list(p) for p in op.build_env])
                if op.mounts:
                    d.update(mounts=[dataclasses.asdict(m) for m in op.mounts])
            elif isinstance(op, Copy):  # Copy and Add
                d.update(sources=list(op.sources), dest=op.dest, chown=op.chown, chmod=op.chmod)
                if op.inline:
                    d.update(inline=[list(p) for p in op.inline])
                if op.from_stage is not None:
                    d.update(from_stage=op.from_stage)
                if op.from_image is not None:
                    d.update(from_image=op.from_image)
            elif isinstance(op, Env):
                d.update(key=op.key, value=op.value)
            elif isinstance(op, Workdir):
                d.update(path=op.path)
            elif isinstance(op, User):
                d.update(user=op.user)
            out.append(d)
        j: dict = {"base": self.base, "ops": out}
        if self.cmd is not None:
            j["cmd"] = list(self.cmd)
        if self.entrypoint is not None:
            j["entrypoint"] = list(self.entrypoint)
        if self.stages:
            j["stages"] = [{"key": st.key, "name": st.name, **st.definition.to_json()}
                           for st in self.stages]
        return j

    def digest(self, context_digest: str = "") -> str:
        """SHA-256 hex of the canonical definition plus ``context_digest`` (the digest of
        the build-context files the COPY/ADD ops read; ``""`` when there are none)."""
        h = hashlib.sha256()
        h.update(json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode())
        h.update(b"\0" + context_digest.encode())
        return h.hexdigest()

    @property
    def final_env(self) -> dict[str, str]:
        """The image ENV after all ops (Docker's default PATH first, then ``Env`` ops)."""
        env = {"PATH": DEFAULT_PATH}
        for op in self.ops:
            if isinstance(op, Env):
                env[op.key] = op.value
        return env

    @property
    def final_user(self) -> str | None:
        """The last USER, or ``None`` (root)."""
        user = None
        for op in self.ops:
            if isinstance(op, User):
                user = op.user
        return user

    @property
    def final_workdir(self) -> str:
        """The last WORKDIR, or ``/`` (Docker's default cwd)."""
        wd = "/"
        for op in self.ops:
            if isinstance(op, Workdir):
                wd = op.path
        return wd
