"""Control-plane benchmarks (``make bench``; or ``python -m bench.control [--runs N]``).

Each figure is printed beside its raw reference, measured in the same run:

* ``new`` → first command (library, with and without the spare supervisor a process keeps
  after its first create, and CLI) beside a bare restore: QEMU started on the
  same snapshot files with the same network helper, ``migrate-incoming``, ``cont``, then a
  bare OpenSSH ``ssh`` running ``true`` in the guest (the raw limit; target ≤ 1.1×);
* ``localsbx exec ID -- true`` on a running sandbox beside a bare ``ssh`` round trip to the
  same guest (target: faster, since the supervisor's session is already open);
* checkpoint time and size; restore from a checkpoint → first command;
* suspend and resume time per GiB of guest RAM touched;
* idle sandboxes alive at once (``--idle N``, target 100 on 24 GiB), all answering, and
  PSS per sandbox (QEMU + supervisor + passt).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from localsbx import Sandbox, store
from localsbx.supervisor import SPARE_ENV

LSBX = str(Path(sys.executable).with_name("localsbx"))
MiB = 1 << 20


def p50(xs):
    return statistics.median(xs)


def fmt(xs):
    return f"p50 {p50(xs):.3f} s (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


def ssh_argv(port: int, key: Path, *cmd: str) -> list[str]:
    return ["ssh", "-q", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "KexAlgorithms=curve25519-sha256", "localsbx@127.0.0.1",
            "exec /usr/lib/localsbx/agent exec -- " + " ".join(cmd)]


def bare_ssh(port: int, key: Path) -> float:
    t = time.monotonic()
    subprocess.run(ssh_argv(port, key, "true"), check=True, timeout=60)
    return time.monotonic() - t


def bare_restore_then_ssh(image: str, key: Path) -> float:
    """QEMU on the image's snapshot files (as a clone: new overlay, share=off RAM,
    -incoming), the state loaded, ``cont``, then OpenSSH ``true`` retried until it works."""
    from localsbx.base import get_base
    from localsbx.vm import disk, snapshot
    from localsbx.vm.accel import choose_accel
    from localsbx.vm.qemu import QemuProcess, VMSpec

    img = store.lookup_image(image)
    base = get_base(img.meta.base)
    snap = img.path / "snap"

    async def go() -> float:
        accel = await choose_accel(base.kernel, base.initrd)
        with tempfile.TemporaryDirectory(prefix="lsbx-bench-") as tmp:
            tmp = Path(tmp)
            await disk.create_overlay(tmp / "o.qcow2", snap / "disk.qcow2")
            spec = VMSpec(kernel=base.kernel, initrd=snap / "initrd.cpio", disk=tmp / "o.qcow2",
                          serial_log=tmp / "serial.log", qmp_socket=tmp / "qmp.sock",
                          accel=accel, ram_file=snap / "ram", ram_share=False, incoming=True,
                          name="localsbx-bench-bare")
            t = time.monotonic()
            qemu = QemuProcess(spec)
            await qemu.start()
            try:
                await snapshot.restore(qemu, snap / "state.mig")
                port = await qemu.host_ssh_port()
                while True:
                    r = await asyncio.to_thread(subprocess.run, ssh_argv(port, key, "true"),
                                                capture_output=True, timeout=60)
                    if r.returncode == 0:
                        return time.monotonic() - t
                    await asyncio.sleep(0.02)
            finally:
                await qemu.shutdown(graceful=False)

    return asyncio.run(go())


def lib_new_first_command(image: str, **kw) -> float:
    t = time.monotonic()
    sb = Sandbox.create(image, **kw)
    try:
        assert sb.run("true").exit_code == 0
        return time.monotonic() - t
    finally:
        sb.terminate()


def cli_new_first_command(image: str) -> float:
    t = time.monotonic()
    sid = subprocess.run([LSBX, "new", "--image", image], capture_output=True, text=True,
                         check=True).stdout.strip()
    subprocess.run([LSBX, "exec", sid, "--", "true"], check=True)
    dt = time.monotonic() - t
    subprocess.run([LSBX, "terminate", sid], capture_output=True)
    return dt


def cli_exec(sid: str) -> float:
    t = time.monotonic()
    subprocess.run([LSBX, "exec", sid, "--", "true"], check=True)
    return time.monotonic() - t


def pss_kib(pid: int | None) -> int:
    if not pid:
        return 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def passt_pid(rec) -> int | None:
    try:
        return int((rec.dir / "passt.pid").read_text().split()[0])
    except (OSError, ValueError):
        return None


def run(image: str, runs: int, idle: int) -> dict:
    key = store.paths.keys_dir() / "id_ed25519"
    store.management_key()
    res: dict = {}
    print(f"== control plane (image {image}, {runs} runs each, interleaved)")
    lib_new_first_command(image)  # warm the page cache
    bare, lib, cold_lib, cli = [], [], [], []
    for _ in range(runs):
        bare.append(bare_restore_then_ssh(image, key))
        lib.append(lib_new_first_command(image))  # the spare supervisor of the last create
        os.environ[SPARE_ENV] = "0"
        try:
            cold_lib.append(lib_new_first_command(image))
        finally:
            del os.environ[SPARE_ENV]
        cli.append(cli_new_first_command(image))
    print(f"bare restore + ssh true (raw)      {fmt(bare)}")
    print(f"Sandbox.create -> first run        {fmt(lib)}   ratio {p50(lib) / p50(bare):.2f}"
          "   target <= 1.10")
    print(f"  the same, no spare supervisor    {fmt(cold_lib)}   ratio "
          f"{p50(cold_lib) / p50(bare):.2f}   (a process's first create)")
    print(f"CLI new + exec true                {fmt(cli)}   ratio {p50(cli) / p50(bare):.2f}"
          "   (two Python start-ups)")
    res.update(bare_restore_s=bare, lib_new_s=lib, lib_new_no_spare_s=cold_lib, cli_new_s=cli)

    sb = Sandbox.create(image)
    try:
        rec = sb.refresh()
        cli_exec(sb.sandbox_id)
        bare_ssh(rec.ssh_port, key)
        ex, ss, lr = [], [], []
        for _ in range(max(runs, 10)):
            ex.append(cli_exec(sb.sandbox_id))
            ss.append(bare_ssh(rec.ssh_port, key))
            t = time.monotonic()
            sb.run("true")
            lr.append(time.monotonic() - t)
        print(f"bare ssh true (raw)                {fmt(ss)}")
        print(f"localsbx exec ID -- true           {fmt(ex)}   ratio {p50(ex) / p50(ss):.2f}"
              "   target < 1.00")
        print(f"Sandbox.run('true') (in process)   {fmt(lr)}   ratio {p50(lr) / p50(ss):.2f}")
        res.update(bare_ssh_s=ss, cli_exec_s=ex, lib_run_s=lr)

        ck_t, ck_size, from_ck = [], [], []
        for _ in range(min(runs, 3)):
            t = time.monotonic()
            ck = sb.checkpoint("memory")
            ck_t.append(time.monotonic() - t)
            ck_size.append(ck.size_bytes)
            from_ck.append(lib_new_first_command(None, snapshot_id=ck.id))
            store.delete_checkpoint(ck.id)
        print(f"memory checkpoint                  {fmt(ck_t)}, {p50(ck_size) / MiB:.0f} MiB")
        print(f"restore checkpoint -> first run    {fmt(from_ck)}")
        res.update(checkpoint_s=ck_t, checkpoint_bytes=ck_size, restore_checkpoint_s=from_ck)

        sr = []
        for touched in (256, 768):
            sb.run(f"rm -f /dev/shm/fill; head -c {touched}M /dev/urandom > /dev/shm/fill")
            t = time.monotonic()
            info = sb.suspend()
            ts = time.monotonic() - t
            t = time.monotonic()
            sb.resume()
            sb.run("true")
            tr = time.monotonic() - t
            gib = info["state_bytes"] / (1 << 30)
            sr.append({"touched_mib": touched, "state_bytes": info["state_bytes"],
                       "suspend_s": ts, "resume_s": tr})
            print(f"suspend/resume, {touched} MiB touched: state {info['state_bytes'] / MiB:.0f} "
                  f"MiB; suspend {ts:.2f} s ({ts / gib:.2f} s/GiB), resume + first run "
                  f"{tr:.2f} s ({tr / gib:.2f} s/GiB)")
        res["suspend_resume"] = sr
    finally:
        sb.terminate()

    if idle:
        res["idle"] = idle_many(image, idle)
    return res


def idle_many(image: str, n: int) -> dict:
    """``n`` idle sandboxes at once: all answer; PSS of QEMU + supervisor + passt each."""
    sbs = []
    t = time.monotonic()
    try:
        for _ in range(n):
            sbs.append(Sandbox.create(image, detached=False))
        started = time.monotonic() - t
        time.sleep(5)
        answering = sum(1 for sb in sbs if sb.run("echo ok").stdout == "ok\n")
        recs = [sb.refresh() for sb in sbs]
        q = [pss_kib(r.qemu_pid) / 1024 for r in recs]
        s = [pss_kib(r.supervisor_pid) / 1024 for r in recs]
        p = [pss_kib(passt_pid(r)) / 1024 for r in recs]
        total = [a + b + c for a, b, c in zip(q, s, p)]
        avail = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable")).split()[1]) // 1024
        print(f"idle sandboxes alive at once: {len(sbs)} started in {started:.0f} s, "
              f"{answering} answering   target 100")
        print(f"PSS per idle sandbox: QEMU {statistics.mean(q):.1f} MiB + supervisor "
              f"{statistics.mean(s):.1f} MiB + passt {statistics.mean(p):.1f} MiB = "
              f"{statistics.mean(total):.1f} MiB; host MemAvailable {avail} MiB")
        return {"n": len(sbs), "answering": answering, "start_s": started,
                "pss_qemu_mib": q, "pss_supervisor_mib": s, "pss_passt_mib": p}
    finally:
        for sb in sbs:
            try:
                sb.terminate()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up the others
                print(f"terminate {sb.sandbox_id}: {exc}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--idle", type=int, default=100, help="idle sandboxes at once (0: skip)")
    ap.add_argument("--image", default=None)
    a = ap.parse_args()
    os.environ.setdefault("LOCALSBX_PROJECT", "bench")
    if a.image is None:
        from bench.run import IMAGE, ensure_image

        ensure_image()
        a.image = IMAGE
    res = run(a.image, a.runs, a.idle)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "control.json").write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
