"""Choose the accelerator by a real probe, never by ``/dev/kvm`` existing.

Some hosts have a ``/dev/kvm`` that cannot run a stock kernel (a paravirtual nested KVM such
as ``kvm_pvm`` hangs it). So KVM is chosen only when a tiny probe guest, booted with
``-accel kvm`` from the base's own kernel and initramfs, reaches its ``/init`` (which prints
``LOCALSBX-PROBE-OK`` when the cmdline says ``localsbx.probe=1``) within a bound. Otherwise
TCG is used with ``tsc_early_khz``. The verdict is cached per host kernel, QEMU version and
guest kernel in ``<data>/accel.json``; ``LOCALSBX_ACCEL=kvm|tcg`` overrides it.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from localsbx import paths
from localsbx.errors import ConfigError
from localsbx.vm.disk import create_empty
from localsbx.vm.qemu import Accel, QemuProcess, VMSpec, host_tsc_khz, qemu_version

PROBE_MARKER = b"LOCALSBX-PROBE-OK"
#: Seconds a KVM probe guest gets to reach /init; a working KVM needs well under 2 s.
PROBE_TIMEOUT = 15.0


def _cache_path() -> Path:
    return paths.data_dir() / "accel.json"


def _tcg(reason: str) -> Accel:
    return Accel("tcg", host_tsc_khz(), reason)


async def probe_kvm(kernel: Path, initrd: Path, *, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot a probe guest under KVM and see whether it reaches init.

    :param kernel: the PVH ``vmlinux`` of a base image.
    :param initrd: that base's initramfs (its ``/init`` knows ``localsbx.probe=1``).
    :param timeout: seconds allowed to reach init.
    :returns: ``(ok, reason)``.
    """
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as exc:
        return False, f"/dev/kvm cannot be opened ({exc.strerror})"
    with tempfile.TemporaryDirectory(prefix="lsbx-probe-") as tmp:
        t = Path(tmp)
        disk = t / "empty.qcow2"
        await create_empty(disk, "16M")
        spec = VMSpec(kernel=kernel, initrd=initrd, disk=disk, serial_log=t / "serial.log",
                      qmp_socket=t / "qmp.sock", accel=Accel("kvm"), memory_mib=256,
                      extra_cmdline=("localsbx.probe=1",), name="localsbx-kvm-probe")
        vm = QemuProcess(spec)
        start = time.monotonic()
        try:
            await vm.start()
            await vm.wait_for_serial(PROBE_MARKER, timeout=timeout)
            return True, f"KVM probe guest reached init in {time.monotonic() - start:.1f} s"
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
            rc = vm.proc.returncode if vm.proc is not None else None
            if rc is not None:
                why = f"QEMU exited with status {rc} under -accel kvm"
                if rc < 0:
                    why += f" (signal {-rc}: this host's /dev/kvm cannot run the guest)"
            else:
                why = str(exc).splitlines()[0].rstrip(".")
            return False, f"the KVM probe guest did not reach init: {why}"
        finally:
            await vm.shutdown(graceful=False, timeout=2.0)


async def choose_accel(kernel: Path, initrd: Path, *, refresh: bool = False) -> Accel:
    """The accelerator to use for guests of this kernel, probing once and caching.

    :param refresh: ignore the cached verdict and probe again.
    :raises ConfigError: ``LOCALSBX_ACCEL`` has a bad value.
    """
    forced = os.environ.get("LOCALSBX_ACCEL", "").strip().lower()
    if forced == "tcg":
        return _tcg("forced by LOCALSBX_ACCEL=tcg")
    if forced == "kvm":
        return Accel("kvm", None, "forced by LOCALSBX_ACCEL=kvm")
    if forced:
        raise ConfigError(f"LOCALSBX_ACCEL={forced!r} is not one of kvm, tcg")
    key = f"{platform.release()}|{qemu_version()}|{kernel.stat().st_size}|{kernel.stat().st_mtime_ns}"
    cache = _cache_path()
    if not refresh:
        with contextlib.suppress(OSError, ValueError, KeyError):
            data = json.loads(cache.read_text())
            if data["key"] == key:
                if data["kind"] == "kvm":
                    return Accel("kvm", None, data["reason"] + " [cached verdict]")
                return _tcg(data["reason"] + " [cached verdict; `localsbx doctor --refresh` probes again]")
    ok, reason = await probe_kvm(kernel, initrd)
    accel = Accel("kvm", None, reason) if ok else _tcg(reason + " - using TCG (software emulation)")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "kind": accel.kind, "reason": accel.reason,
                               "probed_at": time.time()}))
    os.replace(tmp, cache)
    return accel
