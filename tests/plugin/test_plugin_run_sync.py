"""Interrupted setup: Ctrl-C while the sync facade waits (e.g. in ``Sandbox.create``) must let
the coroutine's cleanup (stop QEMU, remove the sandbox folder) finish before the
KeyboardInterrupt goes on; otherwise pytest may exit while the cleanup is half done."""

import asyncio
import os
import signal
import threading
import time

import pytest

from localsbx._loop import run_sync


def test_keyboard_interrupt_waits_for_the_coroutine_cleanup():
    cleaned = threading.Event()

    async def create_like():
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)  # like `await machine.stop()`
            cleaned.set()
            raise

    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_sync(create_like())
    assert cleaned.is_set(), "KeyboardInterrupt propagated before the cleanup ran"
    assert time.monotonic() - t0 < 5
    assert run_sync(asyncio.sleep(0, result=7)) == 7  # the loop is still usable
