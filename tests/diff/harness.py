"""The two builders of the differential suite: real BuildKit (Docker 26 from a Debian 13
chroot, started and stopped by ``oracle.sh``) and localsbx (every case's steps run by
:func:`localsbx.build.steps.run_stages`, the builder's own step engine, in one build VM:
each case gets a fresh overlay over the base rootfs, so one boot serves the whole suite).

Both sides start from the same bytes: the debian-minimal base's ``rootfs.qcow2``, converted
to raw, loop-mounted read-only and ``docker import``-ed. Each side prints :data:`PROBE`'s
output in the built image (Docker: ``docker run --entrypoint /bin/sh``; localsbx: as a
sandbox command, with the image's USER, WORKDIR and runtime environment).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shlex
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).parent
ORACLE = HERE / "oracle.sh"
FAILED = "BUILD FAILED"
#: localsbx cases built at once in the one VM (SSH round trips overlap; 2 vCPUs)
JOBS = 3

# The probe: printed identically by a container and a sandbox of the same image.
PROBE = r"""
echo "pwd: $(pwd)"
echo "id: $(id)"
env | LC_ALL=C sort | grep -v -e '^HOSTNAME=' -e '^PWD=' -e '^OLDPWD=' -e '^SHLVL=' -e '^_='
find / -xdev -mindepth 1 -maxdepth 1 ! -name .dockerenv -printf 'top %p %y %#m %U:%G %l\n' | LC_ALL=C sort
for p in $PROBE_PATHS; do
  if [ -e "$p" ] || [ -L "$p" ]; then
    find "$p" \( -type d -printf '%p d %#m %U:%G\n' \) -o \( -type l -printf '%p l %U:%G -> %l\n' \) \
      -o -printf '%p %y %#m %U:%G %s\n' 2>&1 | LC_ALL=C sort
    find "$p" -type f -exec sha256sum {} + 2>&1 | LC_ALL=C sort
  else
    echo "absent $p"
  fi
done
"""


def probe_script(paths: str) -> str:
    return f"PROBE_PATHS={shlex.quote(paths)}\n{PROBE}"


@dataclass
class Outcome:
    ok: bool
    output: str
    seconds: float = 0.0
    detail: str = ""

    def comparable(self) -> str:
        return self.output if self.ok else FAILED


@dataclass
class Oracle:
    docker: str
    env: dict[str, str]
    run_dir: Path
    log: list[str] = field(default_factory=list)

    def cmd(self, *args: str, timeout: float = 300, stdin=None) -> subprocess.CompletedProcess:
        return subprocess.run([self.docker, *args], env=self.env, capture_output=True,
                              timeout=timeout, stdin=stdin)


def start_oracle(run_dir: Path) -> Oracle:
    """Start dockerd (``oracle.sh start``) and import the base; raises RuntimeError."""
    run_dir.mkdir(parents=True, exist_ok=True)
    res = subprocess.run([str(ORACLE), "start", str(run_dir)], capture_output=True, text=True,
                         timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"oracle.sh start failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    kv = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
    env = {**os.environ, "DOCKER_HOST": kv["DOCKER_HOST"], "DOCKER_BUILDKIT": "1"}
    return Oracle(docker=kv["DOCKER"], env=env, run_dir=run_dir)


def stop_oracle(run_dir: Path) -> None:
    subprocess.run([str(ORACLE), "stop", str(run_dir)], capture_output=True, timeout=120)


def import_base(oracle: Oracle, rootfs_qcow2: Path, tag: str = "debian-minimal:latest") -> None:
    """``docker import`` the base's own rootfs (converted to raw, mounted read-only)."""
    raw = oracle.run_dir / "root.raw"
    mnt = oracle.run_dir / "root.mnt"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(rootfs_qcow2), str(raw)], check=True,
                   timeout=300)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "mount", "-o", "loop,ro", str(raw), str(mnt)], check=True, timeout=60)
    try:
        tar = subprocess.Popen([*sudo, "tar", "-C", str(mnt), "--numeric-owner", "-cf", "-", "."],
                               stdout=subprocess.PIPE)
        res = oracle.cmd("import", "-", tag, stdin=tar.stdout, timeout=300)
        tar.wait()
        if res.returncode != 0 or tar.returncode != 0:
            raise RuntimeError(f"docker import failed: {res.stderr.decode(errors='replace')}")
    finally:
        subprocess.run([*sudo, "umount", str(mnt)], timeout=60)
        raw.unlink(missing_ok=True)


def docker_case(oracle: Oracle, case, workdir: Path) -> Outcome:
    t0 = time.monotonic()
    tag = f"lsbx-diff-{case.name.lower()}"
    args = ["build", "--no-cache", "--network=none", "-q", "-t", tag,
            "-f", str(workdir / "Dockerfile")]
    for k, v in case.build_args.items():
        args += ["--build-arg", f"{k}={v}"]
    if case.target:
        args += ["--target", case.target]
    for sid in case.secrets:
        args += ["--secret", f"id={sid},src={workdir / 'secrets' / sid}"]
    res = oracle.cmd(*args, str(workdir / "ctx"))
    if res.returncode != 0:
        return Outcome(False, "", time.monotonic() - t0,
                       res.stderr.decode(errors="replace")[-3000:])
    for _attempt in range(3):
        # the probe always prints (pwd, id, env...); an empty stdout is docker failing to
        # run the container (seen once under load), which is retried, then shown in the
        # diff with docker's words instead of passing as an empty probe
        run = oracle.cmd("run", "--rm", "--network=none", "--entrypoint", "/bin/sh", tag, "-c",
                         probe_script(case.probe) + " 2>&1")
        if run.stdout.strip():
            break
        time.sleep(2)
    oracle.cmd("rmi", "-f", tag)
    out = run.stdout.decode(errors="replace")
    if not out.strip():
        out = f"docker run failed ({run.returncode}): {run.stderr.decode(errors='replace')}"
    return Outcome(True, out, time.monotonic() - t0)


def docker_all(oracle: Oracle, cases, root: Path, jobs: int = 3) -> dict[str, Outcome]:
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futs = {c.name: pool.submit(docker_case, oracle, c, root / c.name) for c in cases}
        return {n: f.result() for n, f in futs.items()}


class _Quiet:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def say(self, text: str) -> None:
        self.lines.append(text)

    def output(self, chunk: bytes) -> None:
        pass


async def _one_case(vm_guest, n: int, case, root: Path, base_root: str) -> Outcome:
    """One case on a fresh overlay root in the shared VM: build steps, then the probe.
    ``base_root``: the base's own root, attached and mounted read-only as the builder does
    (what stages FROM the base and ``COPY --from=debian-minimal`` read)."""
    from localsbx.build.steps import (
        ChrootGuest,
        mount_overlay_root,
        run_stages,
        sandbox_env,
        unmount_overlay_root,
    )
    from localsbx.definition.context import BuildContext
    from localsbx.definition.dockerfile import parse_dockerfile
    from localsbx.errors import LocalsbxError

    t0 = time.monotonic()
    croot = f"/run/lsbx-diff/{n}"
    try:
        m = await mount_overlay_root(vm_guest, croot)
        guest = ChrootGuest(vm_guest, m)
        try:
            wd = root / case.name
            defn = parse_dockerfile(wd / "Dockerfile", name="diff", build_args=case.build_args,
                                    target=case.target)
            secrets = {k: v.encode() for k, v in case.secrets.items()}
            state = await run_stages(guest, defn, BuildContext(wd / "ctx"), _Quiet(),
                                     timeout=300, scratch=f"{croot}-stages", secrets=secrets,
                                     cache_dir=wd / "cache",
                                     roots={"debian-minimal": (base_root, None)})
            res = await guest.exec(["/bin/sh", "-c", probe_script(case.probe) + " 2>&1"],
                                   env=await sandbox_env(guest, state), cwd=state.workdir,
                                   user=state.user, timeout=120)
            return Outcome(True, res.stdout.decode(errors="replace"), time.monotonic() - t0)
        finally:
            await unmount_overlay_root(vm_guest, croot)
    except LocalsbxError as exc:
        return Outcome(False, "", time.monotonic() - t0, str(exc)[-3000:])


async def _localsbx_all(cases, root: Path) -> dict[str, Outcome]:
    from localsbx import store
    from localsbx.base import get_base
    from localsbx.build.steps import mount_attached
    from localsbx.vm import disk
    from localsbx.vm.accel import choose_accel
    from localsbx.vm.machine import Machine

    base = get_base("debian-minimal")
    accel = await choose_accel(base.kernel, base.initrd)
    tmp = Path(tempfile.mkdtemp(prefix="diff-vm-", dir=root))
    overlay = tmp / "build.qcow2"
    await disk.create_overlay(overlay, base.rootfs)
    attached = tmp / "base-root.qcow2"  # as the builder attaches the roots of other images
    await disk.create_overlay(attached, base.rootfs)
    out: dict[str, Outcome] = {}
    gate = asyncio.Semaphore(JOBS)
    async with await Machine.cold_boot(
        kernel=base.kernel, initrd=base.initrd, disk=overlay, workdir=tmp, accel=accel,
        client_key=store.management_key(), cpus=2, memory_mib=4096, name="localsbx-diff",
        extra_disks=(attached,),
    ) as vm:
        await vm.guest.exec(["modprobe", "overlay"], env={"PATH": "/usr/sbin:/usr/bin"})
        (base_root,) = await mount_attached(vm.guest, 1)

        async def one(n: int, case) -> None:
            async with gate:
                out[case.name] = await _one_case(vm.guest, n, case, root, base_root)

        await asyncio.gather(*(one(n, c) for n, c in enumerate(cases)))
    return out


def localsbx_all(cases, root: Path) -> dict[str, Outcome]:
    return asyncio.run(_localsbx_all(cases, root))
