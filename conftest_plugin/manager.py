"""The sandboxes one pytest process made: creating them, keeping or terminating them, and the
last-chance cleanup.

Ownership. By default (``--sandbox-keep=never``) a sandbox is created *non-detached*: its
record carries this process as owner, and its supervisor terminates it within half a second
of this process's death, even on SIGKILL (if the supervisor dies too, the next localsbx
start, ``store.reap()``, kills what is left). With ``--sandbox-keep=failed`` or ``always``
sandboxes are created *detached* and this plugin writes itself into their record as owner
right away; a sandbox that is kept gets its owner cleared and runs until its own
``timeout_secs`` (default 600 s) or ``localsbx terminate ID``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from conftest_plugin.images import ImageResolver
from conftest_plugin.spec import SandboxSpec

log = logging.getLogger("localsbx.pytest")

KEEP_CHOICES = ("never", "failed", "always")


@dataclass(eq=False)
class Handle:
    """One sandbox this process made.

    :param inner: the ``AsyncSandbox`` (the ``Sandbox`` facade wraps the same object).
    :param label: who asked for it (a test node id, or a fixture scope).
    :param failed: a test that used it failed (set by the report hook).
    :param keep: it is to be left running at teardown.
    """

    inner: Any
    label: str
    failed: bool = False
    keep: bool = False
    announced: bool = False
    done: bool = False
    users: set[str] = field(default_factory=set)

    @property
    def sandbox_id(self) -> str:
        return self.inner.sandbox_id


def _set_owner(record, pid: int | None) -> None:
    """Rewrite a sandbox record's owner (``None``: it outlives this process)."""
    from localsbx import store
    from localsbx.vm.qemu import proc_start_time

    start = proc_start_time(pid) if pid is not None else None
    store.update_sandbox(record.id, owner_pid=pid, owner_start=start)
    record.owner_pid, record.owner_start = pid, start


class SandboxManager:
    """Per-process registry (in ``config.stash``).

    :param keep: ``never`` | ``failed`` | ``always``.
    :param project: localsbx project of images (``None``: ``$LOCALSBX_PROJECT`` or default).
    :param echo: where progress lines of real image builds go (``None``: nowhere).
    :param before_first: called once, in the fixture's thread, before the first sandbox.
    """

    def __init__(self, keep: str = "never", project: str | None = None,
                 echo=None, before_first=None) -> None:
        if keep not in KEEP_CHOICES:
            raise ValueError(f"--sandbox-keep must be one of {', '.join(KEEP_CHOICES)}")
        self.keep_mode = keep
        self.project = project
        self.resolver = ImageResolver(project, echo=echo)
        self.handles: dict[str, Handle] = {}
        self._lock = threading.Lock()
        self._before_first_hook = before_first

    def _before_first(self) -> None:
        """Run the ``before_first`` hook (the plugin's SIGTERM handler) once."""
        hook, self._before_first_hook = self._before_first_hook, None
        if hook is not None:
            hook()

    @property
    def detached(self) -> bool:
        return self.keep_mode != "never"

    # ------------------------------------------------------------------ create

    def _register(self, inner, label: str) -> Handle:
        """Track a new sandbox; a detached one gets this process as owner at once."""
        try:
            if self.detached:
                _set_owner(inner.record, os.getpid())
        except BaseException:
            # a detached sandbox nobody owns would outlive us: stop it (no loop needed)
            from localsbx import store

            with contextlib.suppress(Exception):
                store.cleanup_sandbox(inner.record)
            raise
        h = Handle(inner, label, keep=self.keep_mode == "always")
        with self._lock:
            self.handles[inner.sandbox_id] = h
        return h

    def _create_kwargs(self, spec: SandboxSpec) -> dict[str, Any]:
        return {**spec.create_kwargs(), "project": self.project, "detached": self.detached}

    def create(self, spec: SandboxSpec, label: str):
        """A new ``localsbx.Sandbox`` for ``spec`` (building its image first if needed)."""
        from localsbx.sandbox import Sandbox

        self._before_first()
        name = self.resolver.resolve(spec)
        sb = Sandbox.create(name, **self._create_kwargs(spec))
        self._register(sb._inner, label)
        return sb

    async def create_async(self, spec: SandboxSpec, label: str):
        """A new ``localsbx.AsyncSandbox`` (the image is resolved in a worker thread)."""
        import asyncio

        from localsbx.sandbox import AsyncSandbox

        self._before_first()
        name = await asyncio.to_thread(self.resolver.resolve, spec)
        sb = await AsyncSandbox.create(name, **self._create_kwargs(spec))
        self._register(sb, label)
        return sb

    # ------------------------------------------------------------------ lookup

    def handle_of(self, obj: Any) -> Handle | None:
        inner = getattr(obj, "_inner", obj)
        sid = getattr(inner, "sandbox_id", None)
        return self.handles.get(sid) if isinstance(sid, str) else None

    def handles_in(self, values) -> list[Handle]:
        """The handles of the sandboxes among fixture values (sandboxes and factories)."""
        out: list[Handle] = []
        for v in values:
            for obj in getattr(v, "sandboxes", None) or [v]:
                h = self.handle_of(obj)
                if h is not None and h not in out:
                    out.append(h)
        return out

    # ------------------------------------------------------------------ end

    def mark_failed(self, h: Handle) -> None:
        h.failed = True
        if self.keep_mode == "failed":
            h.keep = True

    def _finish_prepare(self, h: Handle) -> bool:
        """Whether to keep ``h``; if so, hand the sandbox over to nobody (it outlives us)."""
        if h.done:
            return False
        h.done = True
        if h.keep and self.detached and h.inner.record.alive():
            _set_owner(h.inner.record, None)
            return True
        return False

    def release(self, sb) -> None:
        """Teardown of a sync sandbox: keep it or terminate it."""
        from localsbx._loop import run_sync

        h = self.handle_of(sb)
        if h is None:
            sb.terminate()
            return
        if self._finish_prepare(h):
            with contextlib.suppress(Exception):
                run_sync(h.inner.close())
            return
        try:
            sb.terminate()
        finally:
            self._drop(h)

    async def release_async(self, sb) -> None:
        """Teardown of an async sandbox: keep it or terminate it."""
        h = self.handle_of(sb)
        if h is None:
            await sb.terminate()
            return
        if self._finish_prepare(h):
            with contextlib.suppress(Exception):
                await sb.close()
            return
        try:
            await sb.terminate()
        finally:
            self._drop(h)

    def _drop(self, h: Handle) -> None:
        with self._lock:
            self.handles.pop(h.sandbox_id, None)

    def kept(self) -> list[Handle]:
        return [h for h in self.handles.values() if h.keep and h.done]

    def cleanup_leftovers(self) -> list[str]:
        """Last chance (session end, also after an interrupt): kill every sandbox of ours that
        was neither kept nor terminated. Synchronous (no event loop needed). Returns ids."""
        from localsbx import store

        left = []
        with self._lock:
            handles = [h for h in self.handles.values() if not (h.keep and h.done)]
        for h in handles:
            if h.keep and self.detached and not h.done:
                # interrupted before its teardown: the user asked to keep it
                with contextlib.suppress(Exception):
                    if self._finish_prepare(h):
                        continue
            left.append(h.sandbox_id)
            with contextlib.suppress(Exception):
                h.inner._terminated = True
                store.cleanup_sandbox(h.inner.record)
            self._drop(h)
        return left
