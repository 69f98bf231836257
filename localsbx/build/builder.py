"""Build an image: IR → build VM → snapshot → registered name.

1. A build VM (default 2 vCPU / 4096 MiB, Tensorlake's builder size) cold-boots on a new
   overlay over the base rootfs. Each op runs through the guest agent: ``Run`` as its argv
   with the image ENV, the ARG values in scope, the current WORKDIR, stdin at EOF, and every
   process it left behind killed when it ends (a RUN's background processes do not survive
   the step, as in Docker); ``Copy``/``Add`` as one tar stream extracted at ``/``;
   ``Env``/``Workdir`` change the state later steps see (WORKDIR is created).
2. The guest syncs and powers off; its overlay is frozen (``build.qcow2``).
3. A snapshot VM boots at the sandbox default shape (1 vCPU / 1024 MiB, Tensorlake's
   default) on a new overlay over ``build.qcow2`` with RAM in ``snap/ram``, runs one command
   (warming the page cache sandboxes will use), closes its sessions, syncs and is snapshotted
   (method C: ``snap/disk.qcow2`` + ``snap/ram`` + ``snap/state.mig``).
4. ``image.json`` is written, the folder renamed to ``images/<digest>`` and the name
   registered. Any failure before that removes the folder and leaves no QEMU.

An unchanged definition (same digest: ops, context files, base, snapshot shape) is not built
again; the name is just registered.
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

from localsbx import paths, store
from localsbx.build import basetimes
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
from localsbx.vm.accel import choose_accel
from localsbx.vm.machine import Machine

__all__ = ["TAIL_BYTES", "Reporter", "StderrReporter", "build_image", "build_image_async",
           "runtime_env", "step_timeout"]

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


def _context_reads(defn: ImageDefinition) -> list[Copy | str]:
    """What the definition (all its stages) reads from the build context: COPY/ADD ops
    (not heredocs, not ``--from``) and the sources of context bind mounts."""
    out: list[Copy | str] = []
    for d in (defn, *(st.definition for st in defn.stages)):
        for op in d.ops:
            if isinstance(op, Copy) and not op.inline and op.from_stage is None:
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
) -> store.ImageRecord:
    """Build ``definition`` and register it as ``name`` (default ``definition.name``).

    :param context_dir: the build context (COPY/ADD sources are relative to it); required
        when the definition copies local files, as in Tensorlake's ``Image.build``.
    :param project: the project to register in (default: ``$LOCALSBX_PROJECT`` or
        ``default``).
    :param force: build even if an identical image exists.
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
    from localsbx.base import get_base, record_timings
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
    context_digest = ""
    if ctx is not None:
        reads = _context_reads(definition)
        context_digest = await asyncio.to_thread(ctx.digest, reads)  # reads every source
    digest = definition.digest(
        f"{context_digest}|base={base.digest}|snap={SNAPSHOT_FORMAT}:{SANDBOX_CPUS}:{SANDBOX_MEMORY_MIB}"
        f"|build={definition.build_cpus}:{definition.build_memory_mb}"
        + (f"|from={parent.digest}" if parent else ""))[:32]
    if not force:
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
    accel = await choose_accel(base.kernel, base.initrd)
    rep.say(f"accelerator: {accel.kind.upper()} ({accel.reason})")
    client_key = store.management_key()
    tmp = store.new_image_tmpdir()
    started = time.monotonic()
    try:
        # ---- 1. build VM
        build_disk = tmp / "build.qcow2"
        await disk.create_overlay(build_disk, parent.path / "build.qcow2" if parent
                                  else base.rootfs)
        rep.say(f"booting build VM ({definition.build_cpus} vCPU, {definition.build_memory_mb} MiB) "
                f"from base {base.name}")
        async with await Machine.cold_boot(
            kernel=base.kernel, initrd=base.initrd, disk=build_disk, workdir=tmp,
            accel=accel, client_key=client_key, cpus=definition.build_cpus,
            memory_mib=definition.build_memory_mb, name=f"localsbx-build-{name}",
        ) as vm:
            initial = None
            if parent:
                initial = BuildState(dict(parent.env), parent.workdir, parent.user)
                rep.say(f"FROM image {parent.name} ({parent.digest[:12]})")
            try:
                state = await run_stages(vm.guest, definition, ctx, rep, timeout=timeout,
                                         initial=initial, secrets=secret_data,
                                         cache_dir=paths.data_dir() / "build-cache")
            except (ImageBuildError, GuestError) as exc:
                raise _with_console(exc, vm) from exc
            env, workdir = state.env, state.workdir
            if state.user and "HOME" not in env:  # docker run: HOME of the image's USER
                env = {"HOME": await user_home(vm.guest, state.user), **env}
            rep.say("build steps done; syncing and powering off the build VM")
            if not await vm.poweroff():
                rep.say("warning: the build VM did not power off in time; it was killed")
        if parent:  # the image must not depend on the parent's folder, which may go
            await disk.rebase(build_disk, base.rootfs)
        disk.freeze(build_disk)

        # ---- 2. snapshot VM at the sandbox shape
        snap = tmp / "snap"
        snap.mkdir()
        snap_disk = snap / "disk.qcow2"
        await disk.create_overlay(snap_disk, build_disk)
        rep.say(f"booting snapshot VM ({SANDBOX_CPUS} vCPU, {SANDBOX_MEMORY_MIB} MiB)")
        vm = await Machine.cold_boot(
            kernel=base.kernel, initrd=base.initrd, disk=snap_disk, workdir=snap, accel=accel,
            client_key=client_key, cpus=SANDBOX_CPUS, memory_mib=SANDBOX_MEMORY_MIB,
            ram_file=snap / "ram", ram_share=True, name=f"localsbx-snap-{name}",
        )
        try:
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
            accel=accel.kind,
            snapshot=store.SnapshotMeta(
                key=key, host_key=host_key, cpus=SANDBOX_CPUS, memory_mib=SANDBOX_MEMORY_MIB,
                state_size=(snap / "state.mig").stat().st_size,
                ram_size=(snap / "ram").stat().st_size, format=SNAPSHOT_FORMAT,
                state_digest=await asyncio.to_thread(snapshot.file_digest, snap / "state.mig"),
                ram_digest=await asyncio.to_thread(snapshot.file_digest, snap / "ram")))
        store.write_json_atomic(tmp / "image.json", meta.to_json())
        store.commit_image_dir(tmp, digest)
    except BaseException:
        store.discard_tmpdir(tmp)
        raise
    rec = store.register_image(project, name, digest)
    rep.say(f"image {name} registered in project {project} "
            f"({meta.build_seconds} s, digest {digest[:12]})")
    return rec


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
                secrets: Mapping[str, str | Path] | None = None) -> store.ImageRecord:
    """Synchronous :func:`build_image_async` (for scripts and ``Image.build``)."""
    from localsbx._loop import run_sync

    return run_sync(build_image_async(definition, context_dir=context_dir, name=name,
                                      project=project, reporter=reporter, force=force,
                                      secrets=secrets))
