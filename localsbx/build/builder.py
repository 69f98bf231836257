"""Build an image: IR → build VM → snapshot → registered name.

0. Every op gets a cache key (:mod:`localsbx.layers`: parent key, the op after
   substitution, what it reads); the longest cached prefix is taken as is (``[i/n] CACHED``).
1. A build VM (default 2 vCPU / 4096 MiB, Tensorlake's builder size) starts on a new
   layer over the last cached step's disk (or the base rootfs): restored from the base's
   VM template at that shape (:mod:`localsbx.vm.template`), or cold-booted when the build
   attaches other roots, the base has no template support, or templates are off. Each remaining op runs
   through the guest agent: ``Run`` as its argv with the image ENV, the ARG values in scope,
   the current WORKDIR, stdin at EOF, and every process it left behind killed when it ends
   (a RUN's background processes do not survive the step, as in Docker);
   ``Copy``/``Add`` as one tar stream extracted at ``/``; ``Env``/``Workdir`` change the
   state later steps see (WORKDIR is created). After each op that may write the disk, QMP
   ``blockdev-snapshot-sync`` freezes what it wrote as its layer and the VM goes on on a
   new one; no VM boots when only ``ENV``/``USER`` are left.
2. The guest syncs and powers off; the last layer is frozen; ``build.qcow2`` is an empty
   frozen overlay of it.
3. A snapshot VM starts at the sandbox default shape (1 vCPU / 1024 MiB, Tensorlake's
   default) on a new overlay over ``build.qcow2`` with RAM in ``snap/ram`` (a template
   restore; a cold boot for the first image of a base, whose times go to ``base ls``), runs one command
   (warming the page cache sandboxes will use), closes its sessions, syncs and is snapshotted
   (method C: ``snap/disk.qcow2`` + ``snap/ram`` + ``snap/state.mig``).
4. ``image.json`` is written (with the steps: layer, cached or run, time, size), the folder
   renamed to ``images/<digest>`` and the name registered. Any failure before that removes
   the folder, and the layer of the step that failed, and leaves no QEMU; the layers of the
   steps that finished stay in the cache.

An unchanged definition (same digest: ops, context files, base, snapshot shape) is not built
again; the name is just registered (nothing boots).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from localsbx import layers, paths, store
from localsbx.build import basetimes
from localsbx.build.resolve import ImageRoot
from localsbx.build.steps import TAIL_BYTES, BuildState, run_stages, runtime_env, user_home
from localsbx.definition.ops import Copy, ImageDefinition
from localsbx.errors import (
    ConfigError,
    DefinitionError,
    GuestError,
    ImageBuildError,
    ImageNotFound,
    LocalsbxError,
)
from localsbx.vm import disk, snapshot
from localsbx.vm import template as vmtemplate
from localsbx.vm.accel import choose_accel
from localsbx.vm.machine import Machine

__all__ = ["TAIL_BYTES", "EmitReporter", "Reporter", "StderrReporter", "build_image",
           "build_image_async", "print_event", "registered_event", "runtime_env",
           "step_timeout"]

log = logging.getLogger("localsbx.build")

#: Sandbox shape a snapshot is taken at (Tensorlake defaults: 1 vCPU, 1024 MiB).
SANDBOX_CPUS = 1
SANDBOX_MEMORY_MIB = 1024
#: Bumped when the snapshot procedure changes, so old snapshots are not reused.
SNAPSHOT_FORMAT = 3


def step_timeout() -> float | None:
    """Seconds one build step may run: ``LOCALSBX_STEP_TIMEOUT`` (default 3600; ``0`` =
    no limit, returned as ``None``).

    :raises ConfigError: the variable is not a finite number >= 0 (names it and the value).
    """
    raw = os.environ.get("LOCALSBX_STEP_TIMEOUT", "3600")
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"LOCALSBX_STEP_TIMEOUT={raw!r} is not a number of seconds",
                          hint="set it to seconds per build step, e.g. 3600, or 0 for no limit")
    return v or None


class Reporter:
    """Where build progress goes: ``say`` gets status lines, ``output`` raw step output.
    The default logs status lines and drops output."""

    def say(self, text: str) -> None:
        log.info("%s", text)

    def output(self, chunk: bytes) -> None:  # an optional hook: the default drops output
        pass


class StderrReporter(Reporter):
    """Progress lines and live step output on stderr (``Image.build(verbose=True)``)."""

    def say(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def output(self, chunk: bytes) -> None:
        sys.stderr.buffer.write(chunk)
        sys.stderr.buffer.flush()


class EmitReporter(Reporter):
    """Build progress as Tensorlake's image-build events, each a dict passed to ``emit``
    (the ``emit`` of ``tensorlake.image`` builds): ``{"type": "status", "message": ...}`` per
    status line (warnings start with ``warning:``), ``{"type": "build_log", "stream":
    "stdout", "message": ...}`` per line of step output (stdout and stderr of a step come
    merged, as in ``docker buildx`` progress; a line without its newline yet is held until
    it ends or :meth:`flush`), and :func:`registered_event` after the registration. An
    exception raised by ``emit`` stops the build (it propagates; nothing half-made stays),
    as Tensorlake's does."""

    def __init__(self, emit) -> None:
        self.emit = emit
        self._partial = b""

    def say(self, text: str) -> None:
        self.flush()
        self.emit({"type": "status", "message": text})

    def output(self, chunk: bytes) -> None:
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            self.emit({"type": "build_log", "stream": "stdout",
                       "message": line.decode(errors="replace")})

    def flush(self) -> None:
        if self._partial:
            line, self._partial = self._partial, b""
            self.emit({"type": "build_log", "stream": "stdout",
                       "message": line.decode(errors="replace")})


def registered_event(rec: store.ImageRecord) -> dict:
    """Tensorlake's ``image_registered`` event for a registered image: ``image_id`` and
    ``snapshot_id`` are the image's digest (its snapshot lives in the image's folder)."""
    return {"type": "image_registered", "image_id": rec.digest, "name": rec.name,
            "snapshot_id": rec.digest}


def print_event(event: dict) -> None:
    """Print one build event on stderr as Tensorlake's ``verbose=True`` does:
    ``[stdout] line`` for build output, ``[type] message`` for the others."""
    msg = event.get("message") or ""
    if event.get("type") == "build_log":
        print(f"[{event.get('stream', 'stdout')}] {msg}", file=sys.stderr, flush=True)
    elif msg:
        print(f"[{event.get('type', '')}] {msg}", file=sys.stderr, flush=True)


def _context_reads(defn: ImageDefinition) -> list[Copy | str]:
    """What the definition (all its stages) reads from the build context: COPY/ADD ops
    (not heredocs, not ``--from``) and the sources of context bind mounts."""
    out: list[Copy | str] = []
    for d in (defn, *(st.definition for st in defn.stages)):
        for op in d.ops:
            if (isinstance(op, Copy) and not op.inline and op.from_stage is None
                    and op.from_image is None):
                out.append(op)
            for m in getattr(op, "mounts", ()):
                if m.type == "bind" and m.from_stage is None:
                    out.append(m.source or ".")
    return out


def _uses_context(defn: ImageDefinition) -> bool:
    return any(not isinstance(r, Copy) or any("://" not in s for s in r.sources)
               for r in _context_reads(defn))


async def build_image_async(
    definition: ImageDefinition,
    *,
    context_dir: str | Path | None = None,
    name: str | None = None,
    project: str | None = None,
    reporter: Reporter | None = None,
    force: bool = False,
    secrets: Mapping[str, str | Path] | None = None,
    no_cache: bool = False,
) -> store.ImageRecord:
    """Build ``definition`` and register it as ``name`` (default ``definition.name``).

    :param context_dir: the build context (COPY/ADD sources are relative to it); required
        when the definition copies local files, as in Tensorlake's ``Image.build``.
    :param project: the project to register in (default: ``$LOCALSBX_PROJECT`` or
        ``default``).
    :param force: build even if an identical image exists (every step runs again).
    :param no_cache: run every step again, ignoring the step cache and an identical
        image (the new steps are cached for later builds).
    :param secrets: ``RUN --mount=type=secret`` sources, id -> host file; read at build
        time, visible to the steps that mount them, never stored in the image or its
        metadata (and not part of the image digest, as in BuildKit).
    :raises DefinitionError: the definition needs a context it was not given, or a COPY
        source is missing.
    :raises ConfigError: ``LOCALSBX_STEP_TIMEOUT`` is not a number (before any VM boots).
    :raises BaseImageError: the base image is not built.
    :raises HostCommandError: ``qemu-img`` failed or timed out.
    :raises ImageBuildError: a step failed (which, its exit code, its output tail); nothing
        is registered and no QEMU is left.
    """
    from localsbx.base import get_base
    from localsbx.build.resolve import resolve_from
    from localsbx.definition.context import BuildContext

    rep = reporter or Reporter()
    timeout = step_timeout()
    project = store.current_project(project)
    name = store.check_name("image", name or definition.name)
    for w in definition.warnings:
        rep.say(f"warning: {w}")
    # Tensorlake resolves FROM against its image catalog before its bases and registries
    parent: store.ImageRecord | None = None
    with contextlib.suppress(ImageNotFound):
        parent = store.lookup_image(definition.base, project=project)
    if parent is not None and _base_rebuilt_since(parent):
        parent = None  # an image of a base alone, stale: its disk backs on the old base
    if parent is not None:
        base = get_base(parent.meta.base)
    else:
        base, definition = await resolve_from(definition, say=rep.say)  # base or registry
    ctx = None
    if context_dir is not None:
        ctx = BuildContext(Path(context_dir))
    elif _uses_context(definition):
        raise DefinitionError(
            f"{definition.source}: COPY/ADD read local files but no build context was given",
            hint="pass a context folder (--context DIR, or Image.build(context_dir=...))")
    elif _context_reads(definition):  # ADD of URLs alone: their bodies key the steps
        ctx = BuildContext(None)
    roots, definition = await _resolve_roots(definition, project, rep)
    context_digest = ""
    if ctx is not None:
        reads = _context_reads(definition)
        context_digest = await asyncio.to_thread(ctx.digest, reads)  # reads every source
    digest = definition.digest(
        f"{context_digest}|base={base.digest}|snap={SNAPSHOT_FORMAT}:{SANDBOX_CPUS}:{SANDBOX_MEMORY_MIB}"
        f"|build={definition.build_cpus}:{definition.build_memory_mb}"
        + (f"|from={parent.digest}" if parent else "")
        + "".join(f"|root={r.ref}={r.digest}" for r in roots.values()))[:32]
    if not (force or no_cache):
        with contextlib.suppress(Exception):
            old = store.ImageMeta.from_json(store.read_json(store.image_dir(digest) / "image.json"))
            if old.digest == digest and _intact(store.image_dir(digest), old, name, rep):
                rep.say(f"image {name}: unchanged definition, reusing build {digest[:12]}")
                return store.register_image(project, name, digest)

    secret_data: dict[str, bytes] = {}
    for sid, src in (secrets or {}).items():
        try:
            secret_data[sid] = Path(src).read_bytes()
        except OSError as exc:
            raise ConfigError(f"--secret id={sid}: cannot read {src}: {exc.strerror}",
                              hint="give src=PATH of a readable file") from None
    keys = await asyncio.to_thread(_step_keys, definition, ctx, base, parent, roots)
    started = time.monotonic()
    with layers.build_lock():
        return await _build(definition, ctx, rep, name=name, project=project, digest=digest,
                            base=base, parent=parent, keys=keys, timeout=timeout,
                            secret_data=secret_data, use_cache=not (force or no_cache),
                            started=started, roots=roots)


async def _resolve_roots(definition: ImageDefinition, project: str, rep: Reporter
                         ) -> tuple[dict[str, ImageRoot], ImageDefinition]:
    """The roots of the other images the build reads (:func:`steps.image_refs`: the stages'
    bases, ``COPY --from=IMAGE``), each resolved as FROM is, and ``definition`` with the
    stages FROM a registry image starting with its config's ENV/WORKDIR (as the final
    stage does).

    :raises DefinitionError: a name resolves to nothing (located at its ``COPY --from``
        line, or naming the stage; the cause and what to do in the message).
    """
    import dataclasses

    from localsbx.build.resolve import resolve_root
    from localsbx.build.steps import image_refs
    from localsbx.errors import BaseImageError

    roots: dict[str, ImageRoot] = {}
    for ref in image_refs(definition):
        try:
            roots[ref] = await resolve_root(ref, project=project, say=rep.say)
        except (BaseImageError, ImageNotFound) as exc:
            user = next((op for d in (*(st.definition for st in definition.stages), definition)
                         for op in d.ops if isinstance(op, Copy) and op.from_image == ref),
                        None)
            stage = next((st for st in definition.stages if st.definition.base == ref), None)
            what = (f"stage {stage.name or stage.key} FROM {ref}" if stage is not None
                    else f"COPY --from={ref}")
            raise DefinitionError(
                f"{what}: no registered image, base or registry image of that name: "
                f"{exc.message}", location=user.location if user is not None else None,
                hint=exc.hint or "build or import it first (localsbx image build / base "
                                 "import), or give a registry image with its tag") from exc
    stages = tuple(
        dataclasses.replace(st, definition=dataclasses.replace(
            st.definition, ops=(*roots[st.definition.base].head, *st.definition.ops)))
        if roots[st.definition.base].head else st for st in definition.stages)
    return roots, dataclasses.replace(definition, stages=stages)


def _step_keys(definition: ImageDefinition, ctx, base, parent: store.ImageRecord | None,
               roots: Mapping[str, ImageRoot] | None = None) -> list[str]:
    """The cache key of every op of ``definition`` (see :mod:`localsbx.layers`): reads the
    build-context files each op copies or binds, the digests of the stages' bases and of
    each ``COPY --from=IMAGE``'s image (``roots``: :func:`_resolve_roots`).

    :raises DefinitionError: a COPY source is missing.
    """
    import hashlib
    import json

    key = layers.root_key(base_digest=base.digest, parent_image=parent.digest if parent else "",
                          build_cpus=definition.build_cpus,
                          build_memory_mb=definition.build_memory_mb)
    stages = ""
    if definition.stages:  # any op reading a stage depends on all of them (conservative)
        st_reads = [r for st in definition.stages for r in _context_reads(st.definition)]
        h = hashlib.sha256(json.dumps([st.definition.to_json() for st in definition.stages]
                                      + [st.key for st in definition.stages]
                                      + sorted(f"{r.ref}={r.digest}"
                                               for r in (roots or {}).values()),
                                      sort_keys=True).encode())
        if ctx is not None and st_reads:
            h.update(ctx.digest(st_reads).encode())
        stages = h.hexdigest()
    out = []
    for op, op_json in zip(definition.ops, definition.to_json()["ops"], strict=True):
        reads: list[str] = []
        if isinstance(op, Copy) and op.from_stage is not None:
            reads.append("stages:" + stages)
        elif isinstance(op, Copy) and op.from_image is not None:
            if not roots or op.from_image not in roots:
                raise ImageBuildError(f"internal error: {op.describe()}: image not resolved")
            reads.append("image:" + roots[op.from_image].digest)
        elif isinstance(op, Copy) and not op.inline and ctx is not None:
            reads.append(ctx.digest(op))
        for m in getattr(op, "mounts", ()):
            if m.type == "bind" and m.from_stage is not None:
                reads.append("stages:" + stages)
            elif m.type == "bind" and ctx is not None:
                reads.append(ctx.digest(m.source or "."))
        key = layers.step_key(key, op_json, "|".join(reads))
        out.append(key)
    return out


class _StepLog:
    """A reporter that forwards everything to ``rep`` and keeps each step's output."""

    def __init__(self, rep: Reporter) -> None:
        self.rep = rep
        self.buf = bytearray()

    def say(self, text: str) -> None:
        self.rep.say(text)

    def output(self, chunk: bytes) -> None:
        self.buf.extend(chunk)
        if len(self.buf) > 2 * layers.OUTPUT_MAX:
            del self.buf[:-layers.OUTPUT_MAX]
        self.rep.output(chunk)

    def take(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


class _NoGuest:
    """The guest of a build whose remaining ops touch no disk (``ENV``/``USER``): no VM."""

    def __getattr__(self, name):  # pragma: no cover - run_ops never calls it for ENV/USER
        raise ImageBuildError(f"internal error: guest.{name} called without a build VM")


async def _build(definition: ImageDefinition, ctx, rep: Reporter, *, name: str, project: str,
                 digest: str, base, parent: store.ImageRecord | None, keys: list[str],
                 timeout: float | None, secret_data: dict[str, bytes], use_cache: bool,
                 started: float, roots: Mapping[str, ImageRoot] | None = None
                 ) -> store.ImageRecord:
    """The build proper, under the layers' build lock: cached prefix, build VM for the
    rest (a disk layer per step, the other images' roots attached when the steps left read
    them), snapshot VM, registration."""
    from localsbx.build.steps import mount_attached, touches_disk, uses_images, uses_stages

    roots = roots or {}
    ops = definition.ops
    n = len(ops)
    # ---- 0. the chain's root and the longest cached prefix
    pins = ""
    root_below: str | None = None
    if parent is not None and parent.meta.layer and layers.read(parent.meta.layer):
        root_below = parent.meta.layer
        top = layers.read(root_below)
        root, root_depth, pins = top.root, top.depth, top.pins_image
    elif parent is not None:  # built before the step cache: its disk is the root
        root, pins, root_depth = str(parent.path / "build.qcow2"), parent.digest, 0
    else:
        root, root_depth = str(base.rootfs), 0
    # the stages are built on their bases' own (attached) roots, so a build may resume
    # anywhere, also when the steps left read a stage
    cached = layers.longest_prefix(keys) if use_cache else []
    j = len(cached)
    if parent:
        initial = BuildState(dict(parent.env), parent.workdir, parent.user)
        rep.say(f"FROM image {parent.name} ({parent.digest[:12]})")
    else:
        initial = BuildState()
    if cached:
        last = cached[-1]
        initial = BuildState(dict(last.env), last.workdir, last.user)
    for i in range(1, j + 1):
        rep.say(f"[{i}/{n}] CACHED {ops[i - 1].describe()}")
    history: list[store.StepMeta] = [
        store.StepMeta(layer=r.id, step=r.step, cached=True, seconds=r.seconds, size=r.size)
        for r in cached]

    # state of the disk chain while steps run
    cur_disk: str | None = cached[-1].disk if cached else root_below
    cur_depth = (layers.read(cur_disk).depth if cur_disk and layers.read(cur_disk)
                 else root_depth)
    prev_id: str | None = cached[-1].id if cached else None
    disk_steps = [i for i in range(j + 1, n + 1) if touches_disk(ops[i - 1])]
    active: str | None = None       # layer folder the VM writes to now
    reserved: list[str] = []        # folders begun by this build (abandoned on failure)
    pending: list[tuple[layers.LayerRecord, bytes]] = []  # waiting for their disk to freeze
    log_ = _StepLog(rep)
    tmp = store.new_image_tmpdir()
    accel = None
    client_key = store.management_key()

    def record(i: int, op, state: BuildState, seconds: float, lid: str, disk_id: str | None,
               below: str | None, depth: int) -> layers.LayerRecord:
        return layers.LayerRecord(
            id=lid, key=keys[i - 1], parent=prev_id, disk=disk_id, below=below, root=root,
            depth=depth, step=op.describe(), env=dict(state.env), workdir=state.workdir,
            user=state.user, seconds=round(seconds, 2), pins_image=pins)

    def flush() -> None:
        for r, out in pending:
            c = layers.commit(r, out)
            history.append(store.StepMeta(layer=c.id, step=c.step, cached=False,
                                          seconds=c.seconds, size=c.size))
            if c.id in reserved:
                reserved.remove(c.id)
        pending.clear()

    try:
        state = initial
        if j < n:
            step_t = [time.monotonic()]
            vm: Machine | None = None

            async def after_step(i: int, op, st: BuildState) -> None:
                # a disk step's layer is the folder the VM wrote it to; it is frozen (and its
                # record, and those of the ENV/USER steps after it, committed) once the VM
                # writes elsewhere: at the next disk step, or after the poweroff
                nonlocal cur_disk, cur_depth, prev_id, active
                secs = time.monotonic() - step_t[0]
                out = log_.take()
                if touches_disk(op):
                    lid = active
                    pending.append((record(i, op, st, secs, lid, lid, cur_disk, cur_depth + 1),
                                    out))
                    cur_disk, cur_depth = lid, cur_depth + 1
                    later = [k for k in disk_steps if k > i]
                    if later and vm is not None:
                        nxt = layers.begin(keys[later[0] - 1])
                        reserved.append(nxt)
                        await vm.new_disk_layer(layers.disk_path(nxt))
                        active = nxt
                else:
                    lid = layers.begin(keys[i - 1])
                    reserved.append(lid)
                    pending.append((record(i, op, st, secs, lid, cur_disk, None, cur_depth),
                                    out))
                if cur_disk != active:
                    flush()
                prev_id = lid
                step_t[0] = time.monotonic()

            attach = list(roots.values()) if (uses_stages(ops[j:]) or uses_images(ops[j:])) \
                else []
            src_dir = tmp / "roots"
            if disk_steps:
                extra: list[Path] = []
                if attach:
                    src_dir.mkdir()
                    for k, r in enumerate(attach):  # throwaway overlays: never the image's
                        extra.append(src_dir / f"{k}.qcow2")
                        await disk.create_overlay(extra[-1], Path(r.disk))
                    rep.say("attaching the roots of " + ", ".join(
                        f"{r.kind} {r.ref}" for r in attach))
                active = layers.begin(keys[disk_steps[0] - 1])
                reserved.append(active)
                below = layers.disk_path(cur_disk) if cur_disk else Path(root)
                await disk.create_overlay(layers.disk_path(active), below)
                accel = await choose_accel(base.kernel, base.initrd)
                rep.say(f"accelerator: {accel.kind.upper()} ({accel.reason})")
                shape = dict(cpus=definition.build_cpus, memory_mib=definition.build_memory_mb)
                # a template has one disk: a build that attaches other roots cold-boots
                tpl = None if extra else await vmtemplate.try_ensure(
                    base, **shape, accel=accel, client_key=client_key, say=rep.say)
                rep.say(f"{'restoring' if tpl else 'booting'} build VM ({shape['cpus']} vCPU, "
                        f"{shape['memory_mib']} MiB) from base {base.name}"
                        + (" (VM template)" if tpl else "")
                        + (f", resuming after step {j}" if j else ""))
                start = _start_vm(
                    tpl, rep, kernel=base.kernel, initrd=base.initrd,
                    disk=layers.disk_path(active), workdir=tmp, accel=accel,
                    client_key=client_key, **shape, name=f"localsbx-build-{name}",
                    extra_disks=tuple(extra))
                async with await start as vm:
                    step_t[0] = time.monotonic()
                    try:
                        mounted = await mount_attached(vm.guest, len(attach)) if attach else []
                        given = {r.ref: (m, BuildState(dict(r.env), r.workdir, r.user)
                                         if r.env is not None else None)
                                 for r, m in zip(attach, mounted, strict=True)}
                        state = await run_stages(
                            vm.guest, definition, ctx, log_, timeout=timeout, initial=initial,
                            secrets=secret_data, cache_dir=paths.data_dir() / "build-cache",
                            start=j, after_step=after_step, roots=given)
                    except (ImageBuildError, GuestError) as exc:
                        raise _with_console(exc, vm) from exc
                    rep.say("build steps done; syncing and powering off the build VM")
                    if not await vm.poweroff():
                        rep.say("warning: the build VM did not power off in time; it was "
                                "killed")
                active = None
                if src_dir.exists():  # not part of the image folder tmp becomes
                    import shutil

                    shutil.rmtree(src_dir)
            else:  # only ENV/USER left: no VM
                state = await run_stages(_NoGuest(), definition, ctx, log_, timeout=timeout,
                                         initial=initial, start=j, after_step=after_step)
            flush()
        elif cached:
            state = initial
        top = cur_disk
        if top is not None:
            top_rec = layers.read(top)
            if top_rec is not None and top_rec.depth > layers.MAX_DEPTH:
                rep.say(f"flattening the disk chain ({top_rec.depth} layers deep)")
                flat = tmp / "flat.qcow2"
                await disk.copy_sparse(layers.disk_path(top), flat)
                os.chmod(flat, 0o600)
                await disk.rebase(flat, base.rootfs, timeout=disk.COPY_TIMEOUT)
                layers.replace_disk(top_rec, flat, root=str(base.rootfs))
        return await _snapshot_and_register(
            definition, rep, tmp=tmp, name=name, project=project, digest=digest, base=base,
            top=top, root=Path(root), pinned=bool(pins), state=state, accel=accel,
            client_key=client_key, history=history, started=started)
    except BaseException:
        store.discard_tmpdir(tmp)
        for lid in reserved:
            layers.abandon(lid)
        raise


async def _snapshot_and_register(definition: ImageDefinition, rep: Reporter, *, tmp: Path,
                                 name: str, project: str, digest: str, base, top: str | None,
                                 root: Path, pinned: bool, state: BuildState, accel,
                                 client_key, history: list[store.StepMeta],
                                 started: float) -> store.ImageRecord:
    """Steps 2-3: ``build.qcow2`` (an empty overlay of the top disk layer), the snapshot VM,
    ``image.json``, commit and register. The caller removes ``tmp`` on failure."""
    build_disk = tmp / "build.qcow2"
    await disk.create_overlay(build_disk, layers.disk_path(top) if top else root)
    if top is None and pinned:  # the image must not depend on a pre-cache parent's folder
        await disk.rebase(build_disk, base.rootfs)
    disk.freeze(build_disk)
    if accel is None:
        accel = await choose_accel(base.kernel, base.initrd)
        rep.say(f"accelerator: {accel.kind.upper()} ({accel.reason})")

    # ---- 2. snapshot VM at the sandbox shape
    snap = tmp / "snap"
    snap.mkdir()
    snap_disk = snap / "disk.qcow2"
    await disk.create_overlay(snap_disk, build_disk)
    # the first image of a base cold-boots its snapshot VM: its times go to `base ls`
    tpl = None if not base.timings else await vmtemplate.try_ensure(
        base, cpus=SANDBOX_CPUS, memory_mib=SANDBOX_MEMORY_MIB, accel=accel,
        client_key=client_key, say=rep.say)
    rep.say(f"{'restoring' if tpl else 'booting'} snapshot VM ({SANDBOX_CPUS} vCPU, "
            f"{SANDBOX_MEMORY_MIB} MiB)" + (" (VM template)" if tpl else ""))
    vm = await _start_vm(
        tpl, rep, kernel=base.kernel, initrd=base.initrd, disk=snap_disk, workdir=snap,
        accel=accel, client_key=client_key, cpus=SANDBOX_CPUS, memory_mib=SANDBOX_MEMORY_MIB,
        ram_file=snap / "ram", name=f"localsbx-snap-{name}")
    try:
        env, workdir = state.env, state.workdir
        if state.user and "HOME" not in env:  # docker run: HOME of the image's USER
            env = {"HOME": await user_home(vm.guest, state.user), **env}
        warm = await vm.guest.exec(["/bin/sh", "-c", "true"], env=runtime_env(env),
                                   cwd=workdir)
        if warm.exit_status == 127:  # a rootfs without a shell (exec form only)
            from localsbx.guest.ssh import KIT_BUSYBOX

            warm = await vm.guest.exec([KIT_BUSYBOX, "true"], env=runtime_env(env),
                                       cwd=workdir)
        if warm.exit_status != 0:
            raise ImageBuildError(f"image {name}: the snapshot VM cannot run commands in "
                                  f"WORKDIR {workdir}: {warm.stderr.decode(errors='replace')}")
        await basetimes.settle_init(vm, runtime_env(env), rep.say)  # systemd
        await vm.guest.agent("sync")
        await vm.guest.close()
        await asyncio.sleep(0.5)  # let the guest's per-connection server process exit
        key = snapshot.snapshot_key(vm.qemu.spec, kernel_digest=base.kernel_digest)
        await snapshot.save(vm.qemu, snap / "state.mig")
    finally:
        await vm.stop()
    host_key = vm.host_key.export_public_key("openssh").decode().strip()
    for f in (snap_disk, snap / "ram", snap / "state.mig"):
        disk.freeze(f)
    (snap / "serial.log").unlink(missing_ok=True)
    if not base.timings:  # the first image on this base: its boot times for `base ls`
        from localsbx.base import record_timings

        restore_s = await basetimes.measure_restore(
            vm, kernel=base.kernel, snap=snap, accel=accel, client_key=client_key,
            host_key=host_key, cpus=SANDBOX_CPUS, memory_mib=SANDBOX_MEMORY_MIB)
        record_timings(base.name, cold_boot_s=round(vm.timings.get("connected", 0), 2),
                       init_ready_s=round(vm.timings.get("init_ready", 0), 2) or None,
                       restore_s=restore_s, accel=accel.kind)

    # ---- 3. metadata, commit, register
    final = store.image_dir(digest)
    await disk.rebase_unsafe(snap_disk, final / "build.qcow2")
    meta = store.ImageMeta(
        name=name, digest=digest, base=base.name, base_digest=base.digest,
        source=definition.source, definition=_redacted(definition.to_json()),
        warnings=tuple(definition.warnings), env=env, workdir=workdir, user=state.user,
        created_at=time.time(), build_seconds=round(time.monotonic() - started, 1),
        accel=accel.kind, steps=tuple(history), layer=top or "",
        snapshot=store.SnapshotMeta(
            key=key, host_key=host_key, cpus=SANDBOX_CPUS, memory_mib=SANDBOX_MEMORY_MIB,
            state_size=(snap / "state.mig").stat().st_size,
            ram_size=(snap / "ram").stat().st_size, format=SNAPSHOT_FORMAT,
            state_digest=await asyncio.to_thread(snapshot.file_digest, snap / "state.mig"),
            ram_digest=await asyncio.to_thread(snapshot.file_digest, snap / "ram")))
    store.write_json_atomic(tmp / "image.json", meta.to_json())
    store.commit_image_dir(tmp, digest)
    rec = store.register_image(project, name, digest)
    ran = sum(not h.cached for h in history)
    rep.say(f"image {name} registered in project {project} "
            f"({meta.build_seconds} s, digest {digest[:12]}, {len(history) - ran} step(s) "
            f"cached, {ran} run)")
    return rec


async def _start_vm(tpl: vmtemplate.Template | None, rep: Reporter, *, kernel: Path,
                    initrd: Path, disk: Path, workdir: Path, accel, client_key, cpus: int,
                    memory_mib: int, name: str, ram_file: Path | None = None,
                    extra_disks: tuple[Path, ...] = ()) -> Machine:
    """A build or snapshot VM: restored from ``tpl`` (:mod:`localsbx.vm.template`), or
    cold-booted without one. When the template does not give a guest that answers (it does
    not load, the guest never gets ready, its host key is not the recorded one...), the
    template is removed, with a warning, and the VM cold-boots: a fault of the template
    never fails a build, and one of the image's disk fails the cold boot too, with its
    console. With ``ram_file`` the guest's RAM lives there, shared (the snapshot VM)."""
    import asyncssh

    if tpl is not None:
        try:
            return await Machine.from_template(
                tpl, kernel=kernel, disk=disk, workdir=workdir, accel=accel,
                client_key=client_key, ram_file=ram_file, name=name)
        except (LocalsbxError, asyncssh.Error, OSError) as exc:
            why = exc.message if isinstance(exc, LocalsbxError) else str(exc)
            rep.say(f"warning: the VM template in {tpl.folder} does not restore "
                    f"({why.splitlines()[0] if why else type(exc).__name__}); it is removed "
                    "and the VM cold-boots")
            vmtemplate.discard(tpl)
            for f in (ram_file, workdir / "serial.log"):
                if f is not None:
                    f.unlink(missing_ok=True)
    return await Machine.cold_boot(
        kernel=kernel, initrd=initrd, disk=disk, workdir=workdir, accel=accel,
        client_key=client_key, cpus=cpus, memory_mib=memory_mib, ram_file=ram_file,
        ram_share=ram_file is not None, name=name, extra_disks=extra_disks)


def _base_rebuilt_since(img: store.ImageRecord) -> bool:
    """``img`` was made from a base alone (``Sandbox.create(BASE)``) and that base was
    rebuilt since, so it cannot be a parent (``image_for`` rebuilds it from the base)."""
    from localsbx.sandbox import _stale_base_image

    return _stale_base_image(img)


def _redacted(defn: dict) -> dict:
    """The definition for ``image.json`` with build-time values (``ARG``/``--build-arg``)
    replaced by a short digest, so no secret passed as a build argument is kept in clear."""
    import hashlib

    ops = []
    for op in defn.get("ops", []):
        if op.get("build_env"):
            op = {**op, "build_env": [
                [k, "sha256:" + hashlib.sha256(str(v).encode()).hexdigest()[:16]]
                for k, v in op["build_env"]]}
        ops.append(op)
    return {**defn, "ops": ops}


def _intact(image_dir: Path, meta: store.ImageMeta, name: str, rep: Reporter) -> bool:
    """Whether a previous build's snapshot files are all there and undamaged (else it is
    rebuilt, not reused)."""
    from localsbx.errors import SnapshotError

    try:
        snapshot.check_image_snapshot(image_dir, meta.snapshot, name)
    except SnapshotError as exc:
        rep.say(f"image {name}: previous build {meta.digest[:12]} is damaged "
                f"({exc.message}); building again")
        return False
    return True


#: Console lines where a guest's death starts (shown from there on, not its last lines).
_PANIC_RE = re.compile(r"Kernel panic|sysrq: |Oops|BUG: |reboot: Power down")


def _with_console(exc: ImageBuildError | GuestError, vm: Machine) -> LocalsbxError:
    """``exc`` with the build VM's console tail when the VM is gone or the link to it broke
    (a panic, a poweroff, ``kill -9 -1`` in a RUN): the step and line are already named."""
    if isinstance(exc, ImageBuildError) and vm.qemu.proc is not None and (
            vm.qemu.proc.returncode is None and vm.guest.connected and exc.exit_code is not None):
        return exc  # an ordinary failing step: its own output says it all
    lines = vm.qemu.log_tail(300).splitlines()
    first = next((i for i, ln in enumerate(lines) if _PANIC_RE.search(ln)), None)
    console = "\n".join(lines[first:first + 25] if first is not None else lines[-20:])
    if isinstance(exc, ImageBuildError):
        out = ImageBuildError(exc.message, step=exc.step, exit_code=exc.exit_code,
                              output_tail=exc.output_tail, hint=exc.hint)
    else:
        out = ImageBuildError(f"build failed: {exc.message}", hint=exc.hint)
    if console:
        out.output_tail = (out.output_tail.rstrip("\n") + "\n--- build VM console (tail) ---\n"
                           + console).lstrip("\n")
    return out


def build_image(definition: ImageDefinition, *, context_dir: str | Path | None = None,
                name: str | None = None, project: str | None = None,
                reporter: Reporter | None = None, force: bool = False,
                secrets: Mapping[str, str | Path] | None = None,
                no_cache: bool = False) -> store.ImageRecord:
    """Synchronous :func:`build_image_async` (for scripts and ``Image.build``)."""
    from localsbx._loop import run_sync

    return run_sync(build_image_async(definition, context_dir=context_dir, name=name,
                                      project=project, reporter=reporter, force=force,
                                      secrets=secrets, no_cache=no_cache))
