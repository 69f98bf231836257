"""A cold boot whose guest kernel crashes on its own is booted once more; a boot that failed
because of the rootfs is not (localsbx.vm.machine.Machine.cold_boot)."""

import asyncio

import pytest

from localsbx.errors import VMLaunchError
from localsbx.vm.machine import Machine, boot_crash_is_transient

OOPS = (b"[    2.808102] RIP: 0010:sched_clock_cpu+0x9/0x1d0\n"
        b"[    2.808641] Kernel panic - not syncing: Fatal exception in interrupt\n")
NO_INIT = (b"[    1.2] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n")


@pytest.mark.parametrize("text,transient", [
    (OOPS, True),
    (NO_INIT, False),
    (b"localsbx-init: no /sbin/init in the rootfs\n", False),
    (b"", False),
])
def test_which_boot_crashes_are_retried(tmp_path, text, transient):
    log = tmp_path / "serial.log"
    log.write_bytes(text)
    assert boot_crash_is_transient(log) is transient


def test_missing_log_is_not_transient(tmp_path):
    assert boot_crash_is_transient(tmp_path / "nope.log") is False


def _kw(tmp_path):
    return dict(kernel=tmp_path / "k", initrd=tmp_path / "i", disk=tmp_path / "d",
                workdir=tmp_path, accel=None, client_key=None, cpus=2, memory_mib=512)


def test_cold_boot_retries_once_after_a_kernel_oops(tmp_path, monkeypatch):
    calls = []

    async def once(**kw):
        calls.append(kw["workdir"])
        if len(calls) == 1:
            (tmp_path / "serial.log").write_bytes(OOPS)
            raise VMLaunchError("the guest stopped before it was ready")
        return "machine"

    monkeypatch.setattr(Machine, "_boot_once", staticmethod(once))
    assert asyncio.run(Machine.cold_boot(**_kw(tmp_path))) == "machine"
    assert len(calls) == 2
    assert (tmp_path / "serial.crashed-boot.log").read_bytes() == OOPS


@pytest.mark.parametrize("first_log", [NO_INIT, OOPS])
def test_cold_boot_gives_up(tmp_path, monkeypatch, first_log):
    calls = []

    async def once(**kw):
        calls.append(1)
        (tmp_path / "serial.log").write_bytes(first_log)
        raise VMLaunchError("the guest stopped before it was ready")

    monkeypatch.setattr(Machine, "_boot_once", staticmethod(once))
    with pytest.raises(VMLaunchError):
        asyncio.run(Machine.cold_boot(**_kw(tmp_path)))
    # a rootfs fault is not retried; an oops is retried once, then reported
    assert len(calls) == (1 if first_log == NO_INIT else 2)
