"""One background event loop per process for the synchronous facades (``Sandbox``,
``build_image``, the CLI).

The loop runs in a daemon thread for the life of the process, so objects bound to it
(asyncssh connections, QEMU child processes watched by asyncio) stay usable across calls,
and QEMU children started with a parent-death signal live exactly as long as the process.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def loop() -> asyncio.AbstractEventLoop:
    """The shared background loop (started on first use)."""
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            new = asyncio.new_event_loop()
            t = threading.Thread(target=new.run_forever, name="localsbx-loop", daemon=True)
            t.start()
            _loop = new
        return _loop


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the shared loop and wait for its result (re-raising its error).

    A ``KeyboardInterrupt`` while waiting cancels the coroutine and waits for its cleanup
    (bounded) before re-raising, so no QEMU or temp folder is left behind.
    """
    lp = loop()
    if threading.current_thread().name == "localsbx-loop":
        raise RuntimeError("run_sync called from the localsbx loop itself; await instead")
    started, finished = threading.Event(), threading.Event()

    async def tracked() -> T:
        started.set()
        try:
            return await coro
        finally:
            finished.set()

    def never_started() -> None:  # queued after the task's first step
        if not started.is_set():
            coro.close()
            finished.set()

    fut = asyncio.run_coroutine_threadsafe(tracked(), lp)
    try:
        return fut.result()
    except BaseException:
        if not fut.done():
            # Cancelling the concurrent future marks it cancelled at once, before the task
            # has run its cleanup (``except BaseException: stop QEMU``): wait for the
            # coroutine itself to finish, bounded.
            fut.cancel()
            lp.call_soon_threadsafe(never_started)
            finished.wait(30)
        raise
