"""Step-cache benchmarks (``make bench``; or ``python -m bench.stepcache [--runs N]``).

A ten-step Dockerfile (each step writes and hashes 32 MiB in the guest, the tenth echoes a
build argument), made unique per run by a nonce in its first step. Each figure is printed
beside its raw reference, measured in the same run:

* the cold build (all ten steps run) beside a bare cold boot of the build VM shape and a
  bare restore of the base's VM template at that shape (a build is two VM starts - build
  VM, snapshot VM, each restored from a template, :mod:`localsbx.vm.template` - plus its
  steps);
* a no-op rebuild (unchanged definition: nothing boots; target ≤ 0.3 s) beside the
  library's own work for it (parse + context digest), and the same through the CLI beside
  the CLI's start-up (``localsbx --help``);
* the rebuild after changing the last step (its build argument) against the cold build
  (target ratio ≤ 0.3) and beside its floor, two bare cold boots.

The ratio depends on what the steps cost: a rebuild is still two VM starts (the build VM,
then the snapshot VM at the sandbox shape, each a template restore of about 1.3 s under TCG
here, a cold boot of 4-5 s without templates) plus the changed step, so with steps of a
fraction of a second each the ten-step ratio is bounded below by about 2 starts / (2 starts
+ 10 steps); the steps here (about 2 s each under TCG) are meant to be typical of a real
Dockerfile's RUNs, and their total is printed so the ratio can be read against it.

Nothing here fails; results go to ``bench/results/stepcache.json`` (and into ``make
bench``'s ``latest.json``). The images made are unregistered afterwards; their cached
steps stay until ``localsbx prune``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from localsbx import store
from localsbx.build.builder import Reporter, build_image
from localsbx.definition.dockerfile import parse_dockerfile

HERE = Path(__file__).parent
LSBX = str(Path(sys.executable).with_name("localsbx"))
STEPS = 10


def p50(xs):
    return statistics.median(xs)


def dockerfile(nonce: str) -> str:
    lines = ["FROM debian-minimal", f"RUN echo {nonce} > /etc/bench-nonce"]
    for i in range(2, STEPS):
        lines.append(f"RUN dd if=/dev/urandom of=/opt/bench-{i} bs=1M count=32 status=none "
                     f"&& sha256sum /opt/bench-{i} > /opt/bench-{i}.sum")
    lines += ["ARG LAST=1", "RUN echo last=$LAST > /etc/bench-last"]
    return "\n".join(lines) + "\n"


def _bare_start(*, template: bool) -> float:
    """Seconds from QEMU start to the agent answering a first command, at the build VM's
    shape, on an overlay of the base rootfs: a cold boot, or a restore of the base's VM
    template (made first when missing, outside the timing). The VM is then stopped."""
    from localsbx.base import get_base
    from localsbx.vm import disk
    from localsbx.vm import template as vmtemplate
    from localsbx.vm.accel import choose_accel
    from localsbx.vm.machine import Machine

    async def go() -> float:
        base = get_base("debian-minimal")
        accel = await choose_accel(base.kernel, base.initrd)
        key = store.management_key()
        shape = dict(cpus=2, memory_mib=4096)
        tpl = await vmtemplate.ensure(base, **shape, accel=accel, client_key=key) \
            if template else None
        with tempfile.TemporaryDirectory(dir=store.paths.data_dir()) as d:
            ov = Path(d) / "disk.qcow2"
            await disk.create_overlay(ov, base.rootfs)
            t = time.monotonic()
            if tpl is not None:
                vm = await Machine.from_template(tpl, kernel=base.kernel, disk=ov,
                                                 workdir=Path(d), accel=accel, client_key=key,
                                                 name="localsbx-bench-template")
            else:
                vm = await Machine.cold_boot(kernel=base.kernel, initrd=base.initrd, disk=ov,
                                             workdir=Path(d), accel=accel, client_key=key,
                                             **shape, name="localsbx-bench-boot")
            try:
                r = await vm.guest.exec(["true"])
                assert r.exit_status == 0
                return time.monotonic() - t
            finally:
                await vm.stop()

    return asyncio.run(go())


def bare_cold_boot() -> float:
    """A bare cold boot → first command (seconds), at the build VM's shape."""
    return _bare_start(template=False)


def bare_template_restore() -> float:
    """A bare restore of the base's VM template → first command (seconds), at the build
    VM's shape."""
    return _bare_start(template=True)


def run(runs: int = 3) -> dict:
    """Run the step-cache benchmarks; returns the figures (seconds)."""
    nonce = secrets.token_hex(6)
    name = f"bench-stepcache-{nonce}"
    res: dict = {}
    with tempfile.TemporaryDirectory() as d:
        df = Path(d) / "Dockerfile"
        df.write_text(dockerfile(nonce))

        def build(**kw):
            t = time.monotonic()
            rec = build_image(parse_dockerfile(df, name=name, build_args=kw.pop("args", {})),
                              context_dir=d, name=name, reporter=Reporter(), **kw)
            return time.monotonic() - t, rec

        print(f"== step cache ({STEPS} steps, each step writes+hashes 32 MiB)")
        boot = bare_cold_boot()
        restore = bare_template_restore()
        cold, rec = build()
        steps = [s.seconds for s in rec.meta.steps]
        print(f"cold build                      {cold:7.2f} s   raw: one bare cold boot "
              f"{boot:.2f} s, one bare template restore {restore:.2f} s (a build = 2 VM "
              f"starts + steps: {sum(steps):.1f} s of steps)")

        noop = [build()[0] for _ in range(runs)]
        t = time.monotonic()
        for _ in range(runs):
            parse_dockerfile(df, name=name).digest()
        floor = (time.monotonic() - t) / runs
        print(f"no-op rebuild (library)         {p50(noop):7.3f} s p50 of {runs}   target <= 0.30 s"
              f"   raw: parse + digest {floor:.3f} s; cold build {cold:.2f} s")
        cli = []
        for _ in range(runs):
            t = time.monotonic()
            subprocess.run([LSBX, "image", "build", str(df), "-n", name, "-q"], check=True,
                           capture_output=True)
            cli.append(time.monotonic() - t)
        t = time.monotonic()
        subprocess.run([LSBX, "--help"], check=True, capture_output=True)
        start = time.monotonic() - t
        print(f"no-op rebuild (CLI)             {p50(cli):7.3f} s p50 of {runs}"
              f"   raw: CLI start-up (localsbx --help) {start:.3f} s")

        last, rec2 = build(args={"LAST": "2"})
        cached = [s.cached for s in rec2.meta.steps]
        ratio = last / cold
        print(f"rebuild, last step changed      {last:7.2f} s   ratio to cold build "
              f"{ratio:.3f}   target <= 0.30   raw: 2 bare template restores "
              f"{2 * restore:.2f} s, 2 bare cold boots {2 * boot:.2f} s "
              f"({sum(cached)}/{len(cached)} steps cached)")
        res.update(cold_build_s=cold, bare_cold_boot_s=boot, bare_template_restore_s=restore,
                   step_s=steps, noop_s=noop,
                   noop_floor_s=floor, noop_cli_s=cli, cli_startup_s=start,
                   last_changed_s=last, ratio=ratio, cached=cached)
        store.remove_image(name)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "stepcache.json").write_text(json.dumps(res, indent=2))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    import os

    os.environ.setdefault("LOCALSBX_PROJECT", "bench")
    run(ap.parse_args().runs)


if __name__ == "__main__":
    main()
