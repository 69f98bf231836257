"""Per-base and registry-pull benchmarks (``make bench``; ``python -m bench.run --bases`` for
this section alone; or ``python -m bench.bases [--runs N] [--base NAME ...] [--skip-pull]``).

For every built base in the store (``debian-minimal``, ``debian-systemd``, ``debian-vnc``,
``ubuntu-*`` when built; bases made from registry images, ``oci-*``, are left to the pull
figures), on the base's own image (the one ``Sandbox.create("<base>")`` starts from; an
existing one in any project is reused, else it is built once in the current project), each
figure beside its raw reference measured in the same run, interleaved:

* cold boot → first command: ``Sandbox.create(cold_boot=True)`` + ``run("true")``, beside a
  bare QEMU boot of the same kernel, initramfs (+ an identity archive) and disk (an overlay
  over the image's ``build.qcow2``) to the guest's ready marker, then a bare OpenSSH
  ``ssh ... true`` retried until it works (both instants printed). For systemd bases the
  first command answers as soon as the boot kit's SSH listens, before systemd has finished
  starting (``init_ready_s`` in the base's ``timings.json``, measured at its first image
  build, says when that is);
* restore → first command: ``Sandbox.create`` + ``run("true")`` from the image's snapshot,
  beside a bare QEMU ``-incoming`` of the same snapshot files + ``cont`` + bare ``ssh true``
  (:func:`bench.control.bare_restore_then_ssh`).

Registry pull (``FROM`` a registry image): a local registry (Debian's ``docker-registry`` on
127.0.0.1, as ``tests/vm/test_registry.py``), an image of the ``debian-minimal`` tree (one
layer, made by umoci, pushed by skopeo), then, each beside its reference in the same run:

* first pull into an empty OCI cache (:func:`localsbx.oci.pull_base` with the cache folder
  pointed at a fresh directory): skopeo copy + umoci unpack + making the base; the copy part
  beside ``skopeo copy docker://REF dir:...`` of the same image;
* cached pull (reference recorded, base made: no registry asked) and the re-checking pull
  (``LOCALSBX_PULL=always``: the registry is asked, no blob downloaded again) beside
  ``skopeo inspect --raw`` (one manifest request).

Bounded in time: ``--runs`` (default 2) runs per boot figure, one per pull figure, since a
TCG boot of a systemd base is 8-15 s and a pull makes a 200 MiB ext4. All times in seconds
(``time.monotonic``). Nothing here asserts a timing. Results go to
``bench/results/bases.json`` (and into ``make bench``'s ``latest.json``); the registry
image's base (``oci-*``) and the temporary OCI cache are removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from localsbx import Sandbox, paths, store

HERE = Path(__file__).parent
REGISTRY_CONFIG = HERE.parent / "tests" / "vm" / "registry" / "config.yml"


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:7.2f} s (n=1)"
    return f"p50 {p50(xs):.2f} s (min {min(xs):.2f}, max {max(xs):.2f}, n={len(xs)})"


# --- which image of a base ------------------------------------------------------------------


def image_of_base(name: str) -> tuple[store.ImageRecord, str]:
    """The image ``Sandbox.create(name)`` starts from and its project: an existing, current
    one in any project (the current project first), else built once in the current project.

    :returns: ``(image record, project)``.
    :raises BaseImageError: the base is not built.
    """
    from localsbx.sandbox import _stale_base_image, image_for

    current = store.current_project()
    projects = [current] + sorted(p.name for p in paths.projects_dir().iterdir()
                                  if p.is_dir() and p.name != current) \
        if paths.projects_dir().is_dir() else [current]
    for proj in projects:
        try:
            img = store.lookup_image(name, project=proj)
        except Exception:  # noqa: BLE001 - not there: try the next project
            continue
        if img.meta.source == f"<base {name}>" and not _stale_base_image(img):
            return img, proj
    t = time.monotonic()
    img = asyncio.run(image_for(name, current))
    print(f"  (image {name} built in {time.monotonic() - t:.0f} s, once)")
    return img, current


# --- the figures ------------------------------------------------------------------------------


def sandbox_first_command(image: str, project: str, *, cold: bool) -> float:
    """Seconds from ``Sandbox.create`` to the end of a first ``run("true")``."""
    t = time.monotonic()
    sb = Sandbox.create(image, project=project, cold_boot=cold)
    try:
        assert sb.run("true").exit_code == 0
        return time.monotonic() - t
    finally:
        sb.terminate()


def bare_cold_boot(img: store.ImageRecord) -> tuple[float, float]:
    """A bare QEMU boot of ``img``'s disk with its base's kernel and initramfs (+ an
    identity archive authorizing the management key), as a sandbox's cold boot does.

    :returns: ``(seconds to the ready marker, seconds to the end of a bare ssh true)``,
        both from the QEMU start.
    """
    import asyncssh

    from bench.control import ssh_argv
    from localsbx.base import get_base
    from localsbx.vm import disk
    from localsbx.vm.accel import choose_accel
    from localsbx.vm.kernel import make_identity_cpio
    from localsbx.vm.machine import BOOT_TIMEOUT
    from localsbx.vm.qemu import READY_MARKER, QemuProcess, VMSpec

    base = get_base(img.meta.base)
    key_path = paths.keys_dir() / "id_ed25519"
    mgmt = store.management_key()

    async def go() -> tuple[float, float]:
        accel = await choose_accel(base.kernel, base.initrd)
        with tempfile.TemporaryDirectory(prefix="lsbx-bench-") as tmp:
            tmp = Path(tmp)
            await disk.create_overlay(tmp / "o.qcow2", img.path / "build.qcow2")
            host_key = asyncssh.generate_private_key("ssh-ed25519")
            ident = make_identity_cpio(
                host_key_openssh=host_key.export_private_key("openssh"),
                authorized_keys=mgmt.export_public_key("openssh"),
                machine_id=secrets.token_hex(16), hostname="localsbx")
            initrd = tmp / "initrd.cpio"
            initrd.write_bytes(base.initrd.read_bytes() + ident)
            spec = VMSpec(kernel=base.kernel, initrd=initrd, disk=tmp / "o.qcow2",
                          serial_log=tmp / "serial.log", qmp_socket=tmp / "qmp.sock",
                          accel=accel, name="localsbx-bench-bare")
            t = time.monotonic()
            qemu = QemuProcess(spec)
            await qemu.start()
            try:
                await qemu.wait_for_serial(READY_MARKER, timeout=BOOT_TIMEOUT)
                ready = time.monotonic() - t
                port = await qemu.host_ssh_port()
                while True:
                    r = await asyncio.to_thread(subprocess.run, ssh_argv(port, key_path, "true"),
                                                capture_output=True, timeout=60)
                    if r.returncode == 0:
                        return ready, time.monotonic() - t
                    if time.monotonic() - t > BOOT_TIMEOUT:
                        raise RuntimeError(f"bare ssh never answered: {r.stderr[-300:]!r}")
                    await asyncio.sleep(0.02)
            finally:
                await qemu.shutdown(graceful=False)

    return asyncio.run(go())


def bench_base(info, runs: int) -> dict:
    """The four boot figures of one built base (see the module docstring), in seconds."""
    from bench.control import bare_restore_then_ssh

    img, project = image_of_base(info.name)
    key = paths.keys_dir() / "id_ed25519"
    sandbox_first_command(img.name, project, cold=False)  # page cache of the image files
    cold, bare_ready, bare_cold, restore, bare_restore = [], [], [], [], []
    prev = os.environ.get("LOCALSBX_PROJECT")
    for _ in range(runs):
        r, c = bare_cold_boot(img)
        bare_ready.append(r)
        bare_cold.append(c)
        cold.append(sandbox_first_command(img.name, project, cold=True))
        os.environ["LOCALSBX_PROJECT"] = project  # bare_restore_then_ssh looks up by name
        try:
            bare_restore.append(bare_restore_then_ssh(img.name, key))
        finally:
            if prev is None:
                os.environ.pop("LOCALSBX_PROJECT", None)
            else:
                os.environ["LOCALSBX_PROJECT"] = prev
        restore.append(sandbox_first_command(img.name, project, cold=False))
    t = info.timings
    print(f"{info.name} (image {img.digest[:12]}, project {project}"
          + (", base outdated" if info.outdated else "") + ")")
    print(f"  cold boot -> first command      {fmt(cold)}   ratio {p50(cold) / p50(bare_cold):.2f}")
    print(f"  bare QEMU boot + ssh true (raw) {fmt(bare_cold)}   (ready marker p50 "
          f"{p50(bare_ready):.2f} s)")
    print(f"  restore -> first command        {fmt(restore)}   ratio "
          f"{p50(restore) / p50(bare_restore):.2f}")
    print(f"  bare restore + ssh true (raw)   {fmt(bare_restore)}")
    if t.get("init_ready_s"):
        print(f"  (systemd up after a cold boot: {t['init_ready_s']:.0f} s, measured "
              f"{t.get('measured_at', '?')} at the first image build)")
    return {"image": img.digest, "project": project, "outdated": info.outdated,
            "cold_boot_s": cold, "bare_cold_ready_s": bare_ready, "bare_cold_ssh_s": bare_cold,
            "restore_s": restore, "bare_restore_s": bare_restore,
            "init_ready_s": t.get("init_ready_s")}


# --- registry pull ----------------------------------------------------------------------------


class Registry:
    """Debian's ``docker-registry`` on 127.0.0.1 (plain HTTP), storage under ``root``."""

    def __init__(self, root: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root = root
        self.addr = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Registry:
        env = dict(os.environ, REGISTRY_HTTP_ADDR=self.addr,
                   REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY=str(self.root / "data"))
        log = open(self.root / "registry.log", "ab")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(REGISTRY_CONFIG)], env=env,
                                     stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError((self.root / "registry.log").read_text()[-500:])
            time.sleep(0.1)
        raise RuntimeError("the registry did not listen within 30 s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def make_and_push(base_info, work: Path, dest: str) -> int:
    """Push an image of ``base_info``'s root tree (read out of its ext4 with debugfs; one
    layer, umoci) to ``dest`` (skopeo). :returns: the layer's size in bytes (compressed)."""
    raw, tree = work / "raw", work / "tree"
    tree.mkdir()
    _run("qemu-img", "convert", "-O", "raw", str(base_info.rootfs), str(raw))
    _run("debugfs", "-R", f"rdump / {tree}", str(raw))
    raw.unlink()
    shutil.rmtree(tree / "usr" / "lib" / "localsbx", ignore_errors=True)  # the kit comes anew
    layout, bundle = work / "layout", work / "bundle"
    _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", f"{layout}:t")
    _run("umoci", "unpack", "--image", f"{layout}:t", str(bundle))
    _run("cp", "-a", f"{tree}/.", str(bundle / "rootfs"))
    shutil.rmtree(tree)
    _run("umoci", "repack", "--image", f"{layout}:t", str(bundle))
    shutil.rmtree(bundle)
    _run("umoci", "config", "--image", f"{layout}:t", "--config.env=PATH=/usr/bin:/bin",
         "--config.cmd=/bin/sh")
    _run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:t",
         f"docker://{dest}")
    blobs = layout / "blobs" / "sha256"
    return max(p.stat().st_size for p in blobs.iterdir())


@contextlib.contextmanager
def fresh_oci_cache():
    """Point :mod:`localsbx.oci`'s cache folder at a new empty directory (an empty cache
    without touching the store's own), removed afterwards."""
    from localsbx import oci

    tmp = Path(tempfile.mkdtemp(prefix="lsbx-bench-oci-"))
    orig = oci._oci_dir
    oci._oci_dir = lambda: tmp
    try:
        yield tmp
    finally:
        oci._oci_dir = orig
        shutil.rmtree(tmp, ignore_errors=True)


def timed_pull(ref) -> tuple[float, dict[str, float], bool]:
    """:func:`localsbx.oci.pull_base` of ``ref``: ``(seconds, {phase: seconds from the
    start when its progress line came}, cached)``."""
    from localsbx import oci

    marks: dict[str, float] = {}
    t = time.monotonic()

    def progress(line: str) -> None:
        marks.setdefault(line.split()[0], time.monotonic() - t)

    pulled = oci.pull_base(ref, progress=progress)
    return time.monotonic() - t, marks, pulled.cached


def bench_pull() -> dict:
    """The pull figures (module docstring); ``{"skipped": reason}`` when they cannot run."""
    from localsbx import oci
    from localsbx.base import list_bases

    for tool in ("docker-registry", "skopeo", "umoci", "debugfs"):
        if not shutil.which(tool):
            return {"skipped": f"{tool} is not installed (make apt)"}
    dm = next((b for b in list_bases() if b.name == "debian-minimal"), None)
    if dm is None or not dm.built:
        return {"skipped": "debian-minimal is not built (its tree is the image, its boot kit "
                           "goes into every pulled base)"}
    before = {p.name for p in paths.bases_dir().glob("oci-*")}
    work = Path(tempfile.mkdtemp(prefix="lsbx-bench-reg-"))
    os.environ["DOCKER_CONFIG"] = str(work / "docker")  # no host credentials
    try:
        with Registry(work) as reg:
            dest = f"{reg.addr}/bench/debian:{secrets.token_hex(4)}"
            t = time.monotonic()
            layer = make_and_push(dm, work, dest)
            push_s = time.monotonic() - t
            t = time.monotonic()
            _run("skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{dest}",
                 f"dir:{work / 'ref'}")
            ref_copy = time.monotonic() - t
            ref = oci.parse_ref(dest)
            with fresh_oci_cache():
                first, marks, _ = timed_pull(ref)
                cached, _, was_cached = timed_pull(ref)
                os.environ["LOCALSBX_PULL"] = "always"
                try:
                    recheck, _, _ = timed_pull(ref)
                finally:
                    os.environ.pop("LOCALSBX_PULL", None)
            t = time.monotonic()
            _run("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{dest}")
            ref_inspect = time.monotonic() - t
    finally:
        os.environ.pop("DOCKER_CONFIG", None)
        shutil.rmtree(work, ignore_errors=True)
        for p in paths.bases_dir().glob("oci-*"):
            if p.name not in before:
                shutil.rmtree(p, ignore_errors=True)
    copy_s = marks.get("unpacking", first)
    print(f"registry image: debian-minimal tree, one layer of {layer / (1 << 20):.0f} MiB "
          f"(made and pushed in {push_s:.0f} s)")
    print(f"  first pull (empty cache)         {first:7.2f} s: copy {copy_s:.2f} s, unpack + "
          f"base {first - copy_s:.2f} s")
    print(f"  skopeo copy to dir: (raw)        {ref_copy:7.2f} s   copy ratio "
          f"{copy_s / ref_copy:.2f}")
    print(f"  cached pull (no registry asked)  {cached:7.2f} s   (cached={was_cached})")
    print(f"  re-check pull (LOCALSBX_PULL=always) {recheck:7.2f} s")
    print(f"  skopeo inspect --raw (raw)       {ref_inspect:7.2f} s")
    return {"layer_bytes": layer, "push_s": push_s, "first_pull_s": first,
            "first_pull_copy_s": copy_s, "skopeo_copy_dir_s": ref_copy,
            "cached_pull_s": cached, "cached": was_cached, "recheck_pull_s": recheck,
            "skopeo_inspect_s": ref_inspect}


def run(runs: int = 2, only: list[str] | None = None, pull: bool = True) -> dict:
    """Every figure of this module; prints them and returns them (seconds), with
    ``skipped: {base: reason}`` for bases that are not measured."""
    from localsbx.base import list_bases

    res: dict = {"runs": runs, "bases": {}, "skipped": {}}
    print(f"== bases ({runs} runs per boot figure, interleaved with their raw references; "
          "TCG: one or two runs each, so read the spread)")
    for info in list_bases():
        if only and info.name not in only:
            continue
        if info.name.startswith("oci-"):
            res["skipped"][info.name] = "a registry image's base (see the pull figures)"
        elif not info.built:
            res["skipped"][info.name] = (f"{info.state}: `localsbx base build {info.name}`")
        else:
            try:
                res["bases"][info.name] = bench_base(info, runs)
            except Exception as exc:  # noqa: BLE001 - report it, go on with the others
                res["skipped"][info.name] = f"failed: {type(exc).__name__}: {exc}"
    for name, why in res["skipped"].items():
        if not name.startswith("oci-"):
            print(f"{name}: skipped ({why})")
    if pull:
        print("== FROM a registry image (local registry on 127.0.0.1, one run each)")
        res["pull"] = bench_pull()
        if "skipped" in res["pull"]:
            print(f"  skipped ({res['pull']['skipped']})")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--base", action="append", help="only this base (repeatable)")
    ap.add_argument("--skip-pull", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("LOCALSBX_PROJECT", "bench")
    res = run(a.runs, a.base, not a.skip_pull)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "bases.json").write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
