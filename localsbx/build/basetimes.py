"""Builder helpers for bases with their own init (systemd) and for the boot times that
``localsbx base ls`` shows.

* :func:`settle_init`: in the snapshot VM, when PID 1 is systemd, wait until it has
  finished starting (``systemctl is-system-running --wait``) before the snapshot, so
  every sandbox restored from it starts with the system up (running or degraded).
* :func:`measure_restore`: the first image built on a base that has no recorded times
  yet also restores its fresh snapshot once and runs one command; that and the snapshot
  VM's cold boot (both measured on the host) go to the base's ``timings.json``
  (:func:`localsbx.base.record_timings`).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from localsbx.vm import disk
from localsbx.vm.machine import Machine

__all__ = ["SETTLE_TIMEOUT", "measure_restore", "settle_init"]

#: Seconds systemd may take to finish starting in the snapshot VM (TCG is slow).
SETTLE_TIMEOUT = 600

# systemctl answers once systemd's private socket exists (not at once after READY)
_SETTLE = ('[ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] || exit 0; i=0; '
           'until [ -S /run/systemd/private ] || [ $i -gt 600 ]; do i=$((i+1)); sleep 0.5; done; '
           f'timeout {SETTLE_TIMEOUT} systemctl is-system-running --wait; '
           'systemctl --failed --no-legend --plain 2>/dev/null | head -n 20; exit 0')


async def settle_init(vm: Machine, env: dict, say) -> None:
    """Wait for systemd (when it is PID 1) to finish starting; say its state. Records
    ``vm.timings["init_ready"]`` (boot start to systemd up, approximately) when it waited."""
    t0 = time.monotonic()
    res = await vm.guest.exec(["/bin/sh", "-c", _SETTLE], env=env, timeout=SETTLE_TIMEOUT + 30)
    text = res.stdout.decode(errors="replace").strip()
    if text:
        say("systemd: " + " | ".join(text.splitlines()))
        vm.timings["init_ready"] = vm.timings.get("connected", 0) + time.monotonic() - t0


async def measure_restore(vm: Machine, *, kernel: Path, snap: Path, accel, client_key,
                          host_key: str, cpus: int, memory_mib: int) -> float | None:
    """Restore the snapshot in ``snap`` once and run one command: seconds from the start
    of the restore to that command's end (``None`` if it failed; the build goes on)."""
    work = snap.parent / "measure"
    work.mkdir()
    try:
        clone = work / "disk.qcow2"
        await disk.create_overlay(clone, snap / "disk.qcow2")
        t0 = time.monotonic()
        m = await Machine.restore(kernel=kernel, initrd=vm.qemu.spec.initrd,
                                  ram_file=snap / "ram", state_file=snap / "state.mig",
                                  disk=clone, workdir=work, accel=accel, client_key=client_key,
                                  host_key_public=host_key, cpus=cpus, memory_mib=memory_mib,
                                  name="localsbx-measure", lazy_fixup=True)
        try:
            from localsbx.guest.ssh import KIT_BUSYBOX

            res = await m.guest.exec([KIT_BUSYBOX, "true"])
            return round(time.monotonic() - t0, 2) if res.exit_status == 0 else None
        finally:
            await m.stop()
    except Exception:  # noqa: BLE001 - a measurement only
        return None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
