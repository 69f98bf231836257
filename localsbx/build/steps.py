"""Run an image definition's ops against a guest: the build loop, without any VM.

:func:`run_ops` is what the builder does inside the build VM, written against the small
:class:`Guest` protocol (:class:`localsbx.guest.ssh.GuestConnection` is one; the unit tests
use an in-memory fake), so the step semantics are testable without QEMU::

    state = await run_ops(vm.guest, definition, ctx, reporter, timeout=3600.0)
    state.env, state.workdir      # what sandboxes of the image start with

Per op:

* ``Env`` sets a variable for every later step (and the image).
* ``Workdir`` runs ``mkdir -p PATH`` (as root, cwd ``/``), then later steps run in it.
* ``Run`` runs its argv with the runtime env (``HOME``, the image ENV, then the step's
  ARG values), cwd = the current WORKDIR, as the current user (root: there is no USER op
  yet), stdin at EOF, bounded by ``timeout``, and ``kill_tree`` (its background processes
  end with it). A ``#!`` heredoc is first written to ``/tmp/.localsbx-run-<ns>`` (0755) and
  removed afterwards.
* ``Copy``/``Add`` read the guest's ``/etc/passwd`` and ``/etc/group`` (for ``--chown``
  names), probe ``test -d DEST`` when DEST has no trailing ``/``, build one tar stream on
  the host (in a worker thread: it reads the context and may download ADD URLs) and
  extract it at ``/``.

A failing step raises :class:`~localsbx.errors.ImageBuildError` with the step (line and
instruction), its exit code and the tail of its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from localsbx.definition.ops import (
    DEFAULT_PATH,
    Copy,
    Env,
    ImageDefinition,
    Op,
    Run,
    User,
    Workdir,
)
from localsbx.errors import DefinitionError, GuestError, ImageBuildError
from localsbx.guest.ssh import ExecResult

if TYPE_CHECKING:
    from localsbx.definition.context import BuildContext

#: Bytes of step output kept for error messages.
TAIL_BYTES = 16384
#: Lines of step output an ImageBuildError shows.
TAIL_LINES = 25


class Guest(Protocol):
    """What the build loop needs from a guest (:class:`~localsbx.guest.ssh.GuestConnection`
    has it). Semantics are those of ``GuestConnection``: ``exec`` runs argv without a shell
    with exactly ``env``; a non-zero status is a result, not an error; timeouts are seconds
    (``None`` = no limit)."""

    async def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None,
                   stdin: bytes | None = None, timeout: float | None = None,
                   stdout_cb: Callable[[bytes], None] | None = None,
                   stderr_cb: Callable[[bytes], None] | None = None,
                   kill_tree: bool = False) -> ExecResult: ...

    async def put_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None: ...

    async def get_file(self, path: str) -> bytes: ...

    async def extract_tar(self, tar_bytes: bytes, *,
                          timeout: float | None = None) -> ExecResult: ...


class Reporter(Protocol):
    """Where build progress goes (see :class:`localsbx.build.builder.Reporter`)."""

    def say(self, text: str) -> None: ...

    def output(self, chunk: bytes) -> None: ...


@dataclass
class BuildState:
    """What later steps (and the image's sandboxes) see.

    :param env: the image ENV so far (Docker's default ``PATH`` first).
    :param workdir: the current WORKDIR (absolute; ``/`` by default).
    :param user: the current user (``None`` = root; the IR has no USER op yet).
    """

    env: dict[str, str] = field(default_factory=lambda: {"PATH": DEFAULT_PATH})
    workdir: str = "/"
    user: str | None = None


def runtime_env(image_env: Mapping[str, str], user_home: str = "/root") -> dict[str, str]:
    """The environment of a command: ``HOME`` (as Docker sets it at run time), then the
    image ENV (which may override it)."""
    return {"HOME": user_home, **image_env}


class _Tail:
    """Keeps the last ``TAIL_BYTES`` of a step's output, echoing each chunk to ``echo``."""

    def __init__(self, echo: Callable[[bytes], None] | None) -> None:
        self.buf = bytearray()
        self.echo = echo

    def __call__(self, chunk: bytes) -> None:
        self.buf.extend(chunk)
        if len(self.buf) > 2 * TAIL_BYTES:
            del self.buf[:-TAIL_BYTES]
        if self.echo is not None:
            self.echo(chunk)

    def text(self, lines: int = TAIL_LINES) -> str:
        return "\n".join(bytes(self.buf).decode(errors="replace").splitlines()[-lines:])


async def run_ops(guest: Guest, defn: ImageDefinition, ctx: BuildContext | None,
                  rep: Reporter, *, timeout: float | None,
                  stage_roots: Mapping[str, tuple[Guest, str]] | None = None,
                  initial: BuildState | None = None,
                  secrets: Mapping[str, bytes] | None = None,
                  cache_dir: Path | None = None, start: int = 0,
                  after_step: AfterStep | None = None) -> BuildState:
    """Run every op of ``defn`` in ``guest``, in order.

    :param ctx: the build context COPY/ADD read from (``None``: a COPY is an error).
    :param rep: gets one ``[i/n] <op>`` line per op, and RUN output as it arrives.
    :param timeout: seconds one RUN (or one COPY's extraction) may take; ``None`` = none.
    :param stage_roots: for ``COPY --from``: stage key (or ``image:REF`` for
        ``COPY --from=IMAGE``) -> (the guest holding the tree, the tree's path in it); see
        :func:`run_stages`.
    :param secrets: ``RUN --mount=type=secret`` contents by id (never written to the image).
    :param cache_dir: host folder of ``RUN --mount=type=cache`` contents (one folder per id).
    :param initial: the state to start from (an image built FROM another image: its ENV,
        WORKDIR and USER; a build resumed from the step cache: the state after step
        ``start``); default Docker's.
    :param start: how many leading ops are already done (the step cache had them): they
        are skipped, the ``[i/n]`` numbering stays the definition's.
    :param after_step: awaited after each op that ran, with its 1-based index, the op
        and the state after it (the builder snapshots the disk there).
    :returns: the final :class:`BuildState`.
    :raises ImageBuildError: a step failed or timed out (step, exit code, output tail).
    :raises DefinitionError: a COPY without a context, a missing source, an unknown
        ``--chown`` name.
    :raises GuestError: the guest connection failed.
    """
    state = BuildState(dict(initial.env), initial.workdir, initial.user) if initial else BuildState()
    total = len(defn.ops)
    for i, op in enumerate(defn.ops, 1):
        if i <= start:
            continue
        rep.say(f"[{i}/{total}] {op.describe()}")
        if isinstance(op, Env):
            state.env[op.key] = op.value
        elif isinstance(op, User):
            state.user = op.user
        elif isinstance(op, Workdir):
            argv = ["mkdir", "-p", op.path]
            if state.user:  # BuildKit: the folders WORKDIR creates belong to the USER
                owner = await _owner_ids(guest, state.user)
                argv = ["/bin/sh", "-c", 'p=$1; set --; while [ ! -e "$p" ] && [ ! -L "$p" ]; '
                        'do set -- "$p" "$@"; p=${p%/*}; p=${p:-/}; done; mkdir -p "$0" && '
                        '{ [ $# -eq 0 ] || chown -h "$O" "$@"; }', op.path, op.path]
                env = {**runtime_env(state.env), "O": owner}
            else:
                env = runtime_env(state.env)
            res = await guest.exec(argv, env=env, cwd="/")
            _check(op, res, _Tail(None), what="creating WORKDIR", source=defn.source,
                   timeout=timeout)
            state.workdir = op.path
        elif isinstance(op, Run) and op.mounts:
            mounts = _Mounts(guest, op, ctx, stage_roots or {}, secrets or {}, cache_dir)
            try:
                await mounts.setup(timeout)
                await _run(guest, op, state, rep, defn.source, timeout)
            finally:
                await mounts.teardown(timeout)
        elif isinstance(op, Run):
            await _run(guest, op, state, rep, defn.source, timeout)
        elif isinstance(op, Copy) and op.from_stage is not None:
            await _copy_from_stage(guest, op, state, (stage_roots or {}).get(op.from_stage),
                                   defn.source, timeout)
        elif isinstance(op, Copy) and op.from_image is not None:
            await _copy_from_stage(guest, op, state,
                                   (stage_roots or {}).get("image:" + op.from_image),
                                   defn.source, timeout)
        elif isinstance(op, Copy):
            await _copy(guest, op, state, ctx, defn.source, timeout)
        else:  # pragma: no cover - the IR has five ops
            raise DefinitionError(f"unknown op {op!r}")
        if after_step is not None:
            await after_step(i, op, state)
    return state


#: ``after_step(index, op, state)`` of :func:`run_ops`.
AfterStep = Callable[[int, Op, BuildState], Awaitable[None]]


def touches_disk(op: Op) -> bool:
    """Whether an op may change the guest's file system (``ENV`` and ``USER`` only change
    the build state)."""
    return not isinstance(op, (Env, User))


def uses_images(ops: Sequence[Op]) -> bool:
    """Whether any of ``ops`` is a ``COPY --from=IMAGE`` (an image, not a stage)."""
    return any(isinstance(op, Copy) and op.from_image is not None for op in ops)


def image_refs(defn: ImageDefinition) -> list[str]:
    """The images a build of ``defn`` reads besides its own root, in first-use order: the
    bases of its stages and every ``COPY --from=IMAGE`` of the stages and the final ops."""
    out: list[str] = []
    for st in defn.stages:
        if st.definition.base not in out:
            out.append(st.definition.base)
    for d in (*(st.definition for st in defn.stages), defn):
        for op in d.ops:
            if isinstance(op, Copy) and op.from_image is not None and op.from_image not in out:
                out.append(op.from_image)
    return out


def uses_stages(ops: Sequence[Op]) -> bool:
    """Whether any of ``ops`` reads an earlier stage (``COPY --from``, ``RUN --mount
    from=``)."""
    return any((isinstance(op, Copy) and op.from_stage is not None)
               or any(m.from_stage is not None for m in getattr(op, "mounts", ()))
               for op in ops)


async def _owner_ids(guest: Guest, user: str) -> str:
    """``UID:GID`` of a ``USER`` value in the guest (Docker: a name's primary group; a
    number without a passwd entry gets group 0)."""
    from localsbx.definition.context import parse_chown

    name, _, grp = user.partition(":")
    passwd = (await guest.get_file("/etc/passwd")).decode(errors="replace")
    group = (await guest.get_file("/etc/group")).decode(errors="replace")
    for line in passwd.splitlines():
        f = line.split(":")
        if len(f) >= 4 and (f[0] == name or f[2] == name):
            uid, gid = f[2], f[3]
            break
    else:
        uid, gid = name, "0"
    if grp:
        try:
            gid = str(parse_chown(f"0:{grp}", passwd, group)[1])
        except KeyError:
            gid = grp
    return f"{uid}:{gid}"


async def _through_dest_symlink(guest: Guest, op: Copy, state: BuildState) -> Copy:
    """BuildKit follows a symlink at a file destination (``COPY a /dst/link`` writes the
    link's target), resolved inside the image."""
    import dataclasses

    res = await guest.exec(["/bin/sh", "-c", '[ -L "$1" ] && readlink -f -- "$1"', "sh",
                            op.dest], env=runtime_env(state.env))
    target = res.stdout.decode(errors="replace").strip()
    if res.exit_status == 0 and target.startswith("/") and target != op.dest:
        return dataclasses.replace(op, dest=target)
    return op


async def _copy_from_stage(guest: Guest, op: Copy, state: BuildState,
                           where: tuple[Guest, str] | None, source: str,
                           timeout: float | None) -> None:
    """``COPY --from=STAGE``: the sources' folders are tarred out of the stage's tree (owners
    kept, as BuildKit keeps them), unpacked in a host folder, and copied from there with
    the same rules as the build context."""
    import copy
    import dataclasses
    import posixpath
    import shutil
    import tarfile
    import tempfile
    from pathlib import Path

    from localsbx.definition.context import BuildContext

    if where is None:
        what = (f"image {op.from_image} is not attached to the build VM"
                if op.from_image is not None else f"stage {op.from_stage} was not built")
        raise DefinitionError(f"{op.describe()}: internal error: {what}")
    holder, root = where
    tops: list[str] = []
    sources: list[str] = []
    links: list[tuple[str, str]] = []  # (the source as named, its real path in the root)
    for src in op.sources:
        rel = posixpath.normpath(src.lstrip("/") or ".")
        parts = rel.split("/")
        glob_at = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), None)
        if glob_at is not None:  # the folders before the pattern, resolved in the root
            top = await _real_path(holder, root, "/".join(parts[:glob_at]) or ".")
            tops.append(top)
            sources.append("/" + "/".join(([] if top == "." else [top]) + parts[glob_at:]))
            continue
        # BuildKit follows symlinks on the source path (folders and the source itself)
        # inside the source's root: take the real file, named as the source
        real = await _real_path(holder, root, rel)
        tops.append(real)
        sources.append(src)
        if real != rel:
            links.append((rel, real))
    res = await holder.exec(["tar", "-C", root, "-cf", "-", "--numeric-owner", "--", *tops],
                            env=_SYS_PATH, timeout=timeout)
    _check(op, res, _Tail(None), what=f"reading image {op.from_image}" if op.from_image
           else f"reading stage {op.from_stage}", source=source, timeout=timeout)
    passwd = (await guest.get_file("/etc/passwd")).decode(errors="replace")
    group = (await guest.get_file("/etc/group")).decode(errors="replace")
    dest_is_dir = False
    if not op.dest.endswith("/"):
        probe = await guest.exec(["test", "-d", op.dest], env=runtime_env(state.env))
        dest_is_dir = probe.exit_status == 0

    def build() -> bytes:
        tmp = tempfile.mkdtemp(prefix="localsbx-stage-")
        try:
            import io
            with tarfile.open(fileobj=io.BytesIO(res.stdout)) as tf:
                tf.extractall(tmp, filter="fully_trusted")
                for named, real in links:  # the real tree again, under the name copied
                    if os.path.lexists(Path(tmp, named)):
                        continue
                    for ti in tf.getmembers():
                        if ti.name.rstrip("/") != real and not ti.name.startswith(real + "/"):
                            continue
                        moved = copy.copy(ti)
                        moved.name = named + ti.name.rstrip("/")[len(real):]
                        if ti.islnk() and (ti.linkname == real
                                           or ti.linkname.startswith(real + "/")):
                            moved.linkname = named + ti.linkname[len(real):]
                        tf.extract(moved, tmp, filter="fully_trusted")
            plain = dataclasses.replace(op, from_stage=None, from_image=None,
                                        sources=tuple(sources))
            return BuildContext(Path(tmp)).make_tar(plain, passwd=passwd, group=group,
                                                    dest_is_dir=dest_is_dir, keep_owners=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    data = await asyncio.to_thread(build)
    res = await guest.extract_tar(data, timeout=timeout)
    _check(op, res, _Tail(None), what="extracting files", source=source, timeout=timeout)


async def _real_path(holder: Guest, root: str, rel: str) -> str:
    """``rel`` (relative to ``root``, normalised) with every symlink on it resolved as if
    ``root`` were ``/`` (absolute targets start again at ``root``, ``..`` stops there), as
    BuildKit resolves a ``COPY --from`` source in the source's file system; one
    ``readlink`` per component. Returns a path relative to ``root`` (``.`` for the root)."""
    done: list[str] = []
    todo = [p for p in rel.split("/") if p not in ("", ".")]
    hops = 0
    while todo:
        p = todo.pop(0)
        if p == "..":
            if done:
                done.pop()
            continue
        cand = "/".join([*done, p])
        res = await holder.exec(["readlink", "--", f"{root}/{cand}"], env=_SYS_PATH)
        target = res.stdout.decode(errors="surrogateescape").rstrip("\n")
        if res.exit_status == 0 and target and hops < 40:  # 40: Linux's MAXSYMLINKS
            hops += 1
            if target.startswith("/"):
                done = []
            todo = [x for x in target.split("/") if x not in ("", ".")] + todo
        else:
            done.append(p)
    return "/".join(done) or "."


async def _copy(guest: Guest, op: Copy, state: BuildState, ctx: BuildContext | None,
                source: str, timeout: float | None) -> None:
    if ctx is None:
        raise DefinitionError(f"{op.describe()}: no build context")
    passwd = await guest.get_file("/etc/passwd")
    group = await guest.get_file("/etc/group")
    dest_is_dir = False
    if not op.dest.endswith("/"):  # Docker: `COPY f /opt` into an existing dir
        probe = await guest.exec(["test", "-d", op.dest], env=runtime_env(state.env))
        dest_is_dir = probe.exit_status == 0
        if not dest_is_dir and "*" not in "".join(op.sources) and len(op.sources) == 1:
            op = await _through_dest_symlink(guest, op, state)
    if op.inline:
        data = _inline_tar(op, passwd.decode(errors="replace"), group.decode(errors="replace"),
                           dest_is_dir)
        res = await guest.extract_tar(data, timeout=timeout)
        _check(op, res, _Tail(None), what="extracting files", source=source, timeout=timeout)
        return
    # Reads the context and may download ADD URLs (up to a minute): not in the loop.
    data = await asyncio.to_thread(
        ctx.make_tar, op, passwd=passwd.decode(errors="replace"),
        group=group.decode(errors="replace"), dest_is_dir=dest_is_dir)
    res = await guest.extract_tar(data, timeout=timeout)
    _check(op, res, _Tail(None), what="extracting files", source=source, timeout=timeout)


def _inline_tar(op: Copy, passwd: str, group: str, dest_is_dir: bool) -> bytes:
    """The tar stream of a ``COPY <<EOF`` (files named by their delimiters, 0644)."""
    import io
    import posixpath
    import tarfile

    from localsbx.definition.context import parse_chown

    uid, gid = parse_chown(op.chown, passwd, group) if op.chown else (0, 0)
    to_dir = op.dest.endswith("/") or dest_is_dir or len(op.inline) > 1
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, content in op.inline:
            raw = content.encode()
            target = posixpath.join(op.dest, name) if to_dir else op.dest
            ti = tarfile.TarInfo(target.lstrip("/"))
            ti.size, ti.uid, ti.gid, ti.mtime = len(raw), uid, gid, int(time.time())
            ti.mode = int(op.chmod, 8) if op.chmod else 0o644
            tf.addfile(ti, io.BytesIO(raw))
    return buf.getvalue()


class _Mounts:
    """The ``RUN --mount``s of one step: staged in the VM's ``/run`` (a tmpfs, never in
    the image) and bind-mounted on their targets for the step, then undone. Cache mounts
    are copied from the host folder before the step and back after it."""

    def __init__(self, guest: Guest, op: Run, ctx: BuildContext | None,
                 stage_roots: Mapping[str, tuple[Guest, str]], secrets: Mapping[str, bytes],
                 cache_dir: Path | None) -> None:
        if isinstance(guest, ChrootGuest):
            self.holder, self.prefix = guest.inner, guest.root
        else:
            self.holder, self.prefix = guest, ""
        self.op, self.ctx, self.stage_roots = op, ctx, stage_roots
        self.secrets, self.cache_dir = secrets, cache_dir
        self.stage = f"/run/localsbx-mnt/{time.time_ns()}"
        self.mounted: list[str] = []
        self.created: list[str] = []
        self.caches: list[tuple[str, Path]] = []

    async def _sh(self, script: str, *args: str, timeout: float | None = None,
                  stdin: bytes | None = None) -> ExecResult:
        res = await self.holder.exec(["/bin/sh", "-c", script, "sh", *args], env=_SYS_PATH,
                                     stdin=stdin, timeout=timeout)
        if res.exit_status != 0:
            raise ImageBuildError(
                f"{self.op.describe()}: setting up its --mount failed: {res.describe()}",
                step=self.op.describe(), exit_code=res.shell_code,
                output_tail=(res.stdout + res.stderr).decode(errors="replace")[-2000:])
        return res

    async def _note_created(self, t: str) -> None:
        """BuildKit removes a mount target it had to create once the step ends."""
        if (await self.holder.exec(["test", "-e", t], env=_SYS_PATH)).exit_status != 0:
            self.created.append(t)

    async def _bind(self, src: str, target: str, *, file: bool, ro: bool) -> None:
        t = self.prefix + target
        await self._note_created(t)
        make = 'mkdir -p "${2%/*}" && { [ -e "$2" ] || : > "$2"; }' if file else 'mkdir -p "$2"'
        await self._sh(make + ' && mount --bind "$1" "$2"' +
                       (' && mount -o remount,bind,ro "$2"' if ro else ""), src, t)
        self.mounted.append(t)

    async def setup(self, timeout: float | None) -> None:
        import io
        import posixpath
        import tarfile

        for i, m in enumerate(self.op.mounts):
            st = f"{self.stage}/{i}"
            if m.type == "tmpfs":
                t = self.prefix + m.target
                await self._note_created(t)
                await self._sh('mkdir -p "$1" && mount -t tmpfs tmpfs "$1"', t)
                self.mounted.append(t)
            elif m.type == "secret":
                data = self.secrets.get(m.id)
                if data is None:
                    if m.required:
                        raise DefinitionError(
                            f"{self.op.describe()}: secret {m.id!r} was not given",
                            hint=f"pass --secret id={m.id},src=FILE")
                    continue
                await self.holder.put_file(f"{st}/secret", data,
                                           mode=int(m.mode, 8) if m.mode else 0o400)
                await self._bind(f"{st}/secret", m.target, file=True, ro=True)
            elif m.type == "cache":
                await self._sh('mkdir -p "$1"', f"{st}/cache")
                host = None
                if self.cache_dir is not None:
                    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in m.id)
                    host = self.cache_dir / (safe or "default")
                    self.caches.append((f"{st}/cache", host))
                if host is not None and host.is_dir():
                    buf = io.BytesIO()
                    with tarfile.open(fileobj=buf, mode="w") as tf:
                        tf.add(host, arcname=f"{st}/cache".lstrip("/"))
                    await self.holder.extract_tar(buf.getvalue(), timeout=timeout)
                await self._bind(f"{st}/cache", m.target, file=False, ro=False)
            elif m.from_stage is not None:
                holder_root = self.stage_roots[m.from_stage][1]
                src = posixpath.join(holder_root, m.source.lstrip("/"))
                is_file = (await self.holder.exec(["test", "-f", src], env=_SYS_PATH)
                           ).exit_status == 0
                await self._bind(src, m.target, file=is_file, ro=not m.rw)
            else:  # bind from the build context
                if self.ctx is None:
                    raise DefinitionError(f"{self.op.describe()}: no build context to bind")
                copy = Copy((m.source or ".",), f"{st}/bind/")
                kind = self.ctx.resolve(copy)[0][0]
                data = await asyncio.to_thread(self.ctx.make_tar, copy, passwd="", group="")
                await self._sh('mkdir -p "$1"', f"{st}/bind")
                await self.holder.extract_tar(data, timeout=timeout)
                src = f"{st}/bind" if kind == "dir" else \
                    f"{st}/bind/{posixpath.basename(m.source.rstrip('/'))}"
                await self._bind(src, m.target, file=kind != "dir", ro=not m.rw)

    async def teardown(self, timeout: float | None) -> None:
        import io
        import shutil
        import tarfile

        for t in reversed(self.mounted):
            with contextlib.suppress(Exception):
                await self.holder.exec(["umount", "-l", t], env=_SYS_PATH)
        for src, host in self.caches:
            res = await self.holder.exec(["tar", "-C", src, "-cf", "-", "."], env=_SYS_PATH,
                                         timeout=timeout)
            if res.exit_status == 0:
                def keep(data: bytes = res.stdout, host: Path = host) -> None:
                    tmp = host.with_name(host.name + ".new")
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
                    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                        tf.extractall(tmp, filter="fully_trusted")
                    shutil.rmtree(host, ignore_errors=True)
                    tmp.rename(host)
                await asyncio.to_thread(keep)
        with contextlib.suppress(Exception):
            await self.holder.exec(
                ["/bin/sh", "-c", 'rm -rf "$1"; shift; for t in "$@"; do '
                 'rmdir "$t" 2>/dev/null || rm -f "$t"; done', "sh", self.stage,
                 *reversed(self.created)], env=_SYS_PATH)


async def _run(guest: Guest, op: Run, state: BuildState, rep: Reporter, source: str,
               timeout: float | None) -> None:
    argv = list(op.argv)
    if op.script is not None:
        path = f"/tmp/.localsbx-run-{time.time_ns()}"
        await guest.put_file(path, op.script.encode(), mode=0o755)
        argv = [*argv, path]
    tail = _Tail(rep.output)
    try:
        res = await guest.exec(argv, env={**runtime_env(state.env), **dict(op.build_env)},
                               cwd=state.workdir, user=state.user, timeout=timeout,
                               stdout_cb=tail, stderr_cb=tail, kill_tree=True)
    except GuestError as exc:  # the VM powered off, panicked, or `kill -9 -1` took its sshd
        where = f"{source}, " if source and not source.startswith("<") else ""
        raise ImageBuildError(
            f"build failed at {where}{op.describe()}: the build VM stopped or the connection "
            f"to it broke during the step ({exc.message})", step=op.describe(),
            output_tail=tail.text(),
            hint="the step may power off or panic the VM, or kill every process "
                 "(`kill -9 -1`); the build VM's console is shown below") from exc
    if op.script is not None:
        with contextlib.suppress(Exception):
            await guest.exec(["rm", "-f", argv[-1]], env=runtime_env(state.env))
    _check(op, res, tail, source=source, timeout=timeout)


def _check(op: Op, res: ExecResult, tail: _Tail, *, what: str = "", source: str = "",
           timeout: float | None = None) -> None:
    """Raise :class:`ImageBuildError` unless ``res`` is a clean exit 0."""
    if res.exit_status == 0 and not res.timed_out:
        return
    if not tail.buf:
        tail(res.stdout + res.stderr)
    hint = None
    if res.timed_out:
        hint = (f"the step ran past LOCALSBX_STEP_TIMEOUT ({timeout or 0:.0f} s); it may be "
                "waiting for input - set DEBIAN_FRONTEND=noninteractive or pass -y")
    elif res.exit_status == 127:
        hint = "command not found (shell-form RUN uses /bin/sh, which is dash: no `source`, use `.`)"
    where = f"{source}, " if source and not source.startswith("<") else ""
    raise ImageBuildError(
        f"build failed at {where}{op.describe()}: {what + ': ' if what else ''}{res.describe()}",
        step=op.describe(), exit_code=res.shell_code, output_tail=tail.text(), hint=hint)


#: The guest agent's path in every rootfs built from a localsbx base.
AGENT = "/usr/lib/localsbx/agent"
_SYS_PATH = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


class ChrootGuest:
    """A :class:`Guest` whose filesystem is the tree at ``root`` inside ``inner``: commands
    run as ``chroot ROOT agent exec ...`` (so user names, ``--cwd`` and the environment are
    resolved inside the tree), files are read and written under ``root``, and tar streams
    are extracted by the tree's own view (``chroot ROOT tar -C /``), so absolute symlinks in
    it resolve against it, as they would if it were the VM's root.

    Used for the stages of a multi-stage build that are not the final image, and by the
    differential suite (tests/diff) to run many builds in one VM."""

    def __init__(self, inner: Guest, root: str) -> None:
        self.inner = inner
        self.root = root.rstrip("/")

    async def exec(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                   cwd: str | None = None, user: str | None = None,
                   stdin: bytes | None = None, timeout: float | None = None,
                   stdout_cb: Callable[[bytes], None] | None = None,
                   stderr_cb: Callable[[bytes], None] | None = None,
                   kill_tree: bool = False) -> ExecResult:
        opts: list[str] = []
        if cwd is not None:
            opts += ["--cwd", cwd]
        if user is not None:
            opts += ["--user", user]
        for k, v in (env or {}).items():
            opts += ["--env", f"{k}={v}"]
        if stdin is not None:
            opts.append("--stdin")
        return await self.inner.exec(
            ["chroot", self.root, AGENT, "exec", *opts, "--", *argv], env=_SYS_PATH,
            stdin=stdin, timeout=timeout, stdout_cb=stdout_cb, stderr_cb=stderr_cb,
            kill_tree=kill_tree)

    async def put_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        await self.inner.put_file(self.root + path, data, mode=mode)

    async def get_file(self, path: str) -> bytes:
        return await self.inner.get_file(self.root + path)

    async def extract_tar(self, tar_bytes: bytes, *,
                          timeout: float | None = None) -> ExecResult:
        return await self.inner.exec(
            ["chroot", self.root, "tar", "-C", "/", "-xpf", "-", "--same-owner",
             "--numeric-owner", "--no-overwrite-dir", "--keep-directory-symlink"],
            env=_SYS_PATH, stdin=tar_bytes, timeout=timeout)


#: Where the guest's boot kit is mounted (see ``guest/init.sh``).
KIT = "/usr/lib/localsbx"


async def mount_overlay_root(guest: Guest, root: str, lowers: Sequence[str] = ("/",)) -> str:
    """Make ``root`` (a fresh folder on a tmpfs, e.g. under ``/run``) a writable overlay
    over ``lowers`` (upper layer first), with ``/proc``, ``/dev`` and ``/sys`` mounted in
    it as a RUN step needs. Returns the merged tree's path (``root/m``).

    :raises ImageBuildError: the mounts failed (no overlayfs in the guest kernel)."""
    m = f"{root}/m"
    script = (
        "set -e; modprobe overlay 2>/dev/null || true; "
        f"mkdir -p {root}/u {root}/w {m}; "
        f"mount -t overlay overlay -o lowerdir={':'.join(lowers)},upperdir={root}/u,"
        f"workdir={root}/w {m}; "
        f"mount -t proc proc {m}/proc; mount --rbind /dev {m}/dev; mount --rbind /sys {m}/sys; "
        # the boot kit (agent, SSH server) is its own mount, which an overlay of / does not
        # show: bind it in, so commands in this root run through the agent as elsewhere
        f"if [ -d {KIT} ]; then mkdir -p {m}{KIT} && mount --bind {KIT} {m}{KIT}; fi"
    )
    res = await guest.exec(["/bin/sh", "-c", script], env=_SYS_PATH)
    if res.exit_status != 0:
        raise ImageBuildError(f"cannot make a build root at {root}: {res.describe()}",
                              output_tail=(res.stdout + res.stderr).decode(errors="replace"))
    return m


async def unmount_overlay_root(guest: Guest, root: str) -> None:
    """Undo :func:`mount_overlay_root` and delete ``root`` (best effort)."""
    await guest.exec(["/bin/sh", "-c", f"umount -R -l {root}/m; rm -rf --one-file-system {root}"], env=_SYS_PATH)


async def user_home(guest: Guest, user: str | None) -> str:
    """The home folder of ``user`` (name or uid, ``None`` = root) in the guest's
    ``/etc/passwd``; ``/`` when the user has no entry (as Docker sets ``HOME``)."""
    name = (user or "root").partition(":")[0]
    try:
        passwd = (await guest.get_file("/etc/passwd")).decode(errors="replace")
    except Exception:  # noqa: BLE001 - no passwd file: Docker's fallback
        return "/root" if name in ("root", "0") else "/"
    for line in passwd.splitlines():
        f = line.split(":")
        if len(f) >= 6 and (f[0] == name or f[2] == name):
            return f[5] or "/"
    return "/root" if name in ("root", "0") else "/"


async def sandbox_env(guest: Guest, state: BuildState) -> dict[str, str]:
    """The environment a sandbox command of an image in ``state`` gets (as ``docker run``:
    ``HOME`` of the image's user, then the image ENV)."""
    return runtime_env(state.env, await user_home(guest, state.user))


#: Where the build VM mounts the attached roots of other images (read-only, by number).
ATTACHED = "/run/localsbx-src"


async def mount_attached(guest: Guest, count: int) -> list[str]:
    """Mount the build VM's attached disks ``lsbx-disk-0 .. count-1`` (virtio-blk serials,
    see :attr:`localsbx.vm.qemu.VMSpec.extra_disks`) read-only at ``ATTACHED/N``.

    :returns: the mount points, in disk order.
    :raises ImageBuildError: a disk is missing or is no ext4 file system."""
    from localsbx.vm.qemu import EXTRA_DISK_SERIAL

    script = (
        'for n in "$@"; do found=; for b in /sys/block/vd*; do '
        f'[ "$(cat "$b/serial" 2>/dev/null)" = "{EXTRA_DISK_SERIAL}$n" ] || continue; '
        f'mkdir -p {ATTACHED}/$n && mount -t ext4 -o ro "/dev/${{b##*/}}" {ATTACHED}/$n '
        '&& found=1; done; [ -n "$found" ] || { echo "attached disk '
        f'{EXTRA_DISK_SERIAL}$n cannot be mounted" >&2; exit 1; }}; done')
    res = await guest.exec(["/bin/sh", "-c", script, "sh", *map(str, range(count))],
                           env=_SYS_PATH)
    if res.exit_status != 0:
        raise ImageBuildError(f"cannot mount the roots of the other images: {res.describe()}",
                              output_tail=(res.stdout + res.stderr).decode(errors="replace"))
    return [f"{ATTACHED}/{n}" for n in range(count)]


async def run_stages(guest: Guest, defn: ImageDefinition, ctx: BuildContext | None,
                     rep: Reporter, *, timeout: float | None, scratch: str = "/run/localsbx-stages",
                     initial: BuildState | None = None,
                     secrets: Mapping[str, bytes] | None = None,
                     cache_dir: Path | None = None, start: int = 0,
                     after_step: AfterStep | None = None,
                     roots: Mapping[str, tuple[str, BuildState | None]] | None = None,
                     ) -> BuildState:
    """Run a whole definition: the other stages it copies from (each on its own overlay,
    tmpfs upper under ``scratch``), then the final stage's ops on ``guest`` itself. The
    scratch roots are removed afterwards. ``start`` and ``after_step`` are
    :func:`run_ops`'s; the stages are built only when an op after ``start`` reads one.

    :param roots: image name (a stage's ``FROM``, a ``COPY --from=IMAGE``) -> (its root
        mounted read-only in the guest, see :func:`mount_attached`; the state a stage FROM
        it starts with). A stage is built on an overlay of its base's root, so it does not
        depend on what the VM's own root holds (a resumed build may run them). Without an
        entry, a stage FROM the image's own base is built on the guest's root (pristine
        only when ``start`` is 0: the differential suite's case).
    :raises DefinitionError: a stage FROM another base than the image's with no root given.
    """
    if isinstance(guest, ChrootGuest):
        holder, lower = guest.inner, guest.root
    else:
        holder, lower = guest, "/"
    given = roots or {}
    tree: dict[str, tuple[Guest, str]] = {
        "image:" + ref: (holder, path) for ref, (path, _st) in given.items()}
    made: list[str] = []
    try:
        for st in defn.stages if uses_stages(defn.ops[start:]) else ():
            src = given.get(st.definition.base)
            if src is not None:
                st_lower, st_initial = src
            elif st.definition.base == defn.base:
                st_lower, st_initial = lower, None
            else:
                raise DefinitionError(
                    f"stage {st.name or st.key} is FROM {st.definition.base} and the image "
                    f"FROM {defn.base}, and the root of {st.definition.base} is not attached",
                    hint="build it with `localsbx image build` (which attaches it)")
            path = f"{scratch}/{st.key}"
            made.append(path)
            m = await mount_overlay_root(holder, path, (st_lower,))
            rep.say(f"stage {st.name or st.key} FROM {st.definition.base} (for COPY --from)")
            await run_ops(ChrootGuest(holder, m), st.definition, ctx, rep, timeout=timeout,
                          stage_roots=tree, secrets=secrets, cache_dir=cache_dir,
                          initial=st_initial)
            tree[st.key] = (holder, m)
        return await run_ops(guest, defn, ctx, rep, timeout=timeout, stage_roots=tree,
                             initial=initial, secrets=secrets, cache_dir=cache_dir,
                             start=start, after_step=after_step)
    finally:
        for path in reversed(made):
            with contextlib.suppress(Exception):
                await unmount_overlay_root(holder, path)
