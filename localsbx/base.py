"""Base images: build from a recipe under ``images/<name>/``, list, locate.

A base is a directory ``<data>/bases/<name>/`` (docs/ARCHITECTURE.md, "Base image on
disk") holding ``rootfs.qcow2``, ``vmlinux``, ``initramfs.cpio``, ``base.json`` and the
``build.log``.  Usage::

    info = build_base("debian-minimal", progress=print)   # ~1-2 min; no-op when built
    info = get_base("debian-minimal")                      # raises BaseImageError if not built
    argv = [..., "-kernel", str(info.kernel), "-initrd", str(info.initrd), ...]

How a base is built (:func:`build_base`):

1. the guest agent ``localsbx/guest/agent.c`` is compiled on the host (``gcc -static -Os``);
2. ``mmdebstrap --mode=unshare`` (works as root and, with subuids, rootless) builds the
   tree from the host's own Debian mirror (``LOCALSBX_MIRROR`` overrides it) and runs three
   customize hooks: ``localsbx/guest/guest-install.sh install`` (kernel unpacked without
   initramfs-tools, modules + depmod, bundled dropbear, agent, build packages purged), the
   recipe's own ``customize`` script, and ``guest-install.sh mkfs`` (``mkfs.ext4 -d`` into
   a sparse image of ``rootfs_size_gib``, no loop mount);
3. on the host: ``vmlinuz`` → PVH ``vmlinux``, the busybox initramfs
   (:mod:`localsbx.vm.kernel`), ``qemu-img convert`` to qcow2, ``base.json``.

Everything is written under ``<data>/bases/.tmp-<name>-*`` and renamed into place only
when complete; a failure or Ctrl-C leaves no half base and no temporary directory.

Recipe keys (``images/<name>/recipe.toml``):

======================  ===================================================================
``distro``              ``debian`` (the mirror is the host's ``…/debian`` apt source)
``suite``               e.g. ``trixie``
``variant``             mmdebstrap variant, e.g. ``minbase``
``components``          archive components, default ``["main"]``
``extra_suites``        more suites from the mirror; ``{suite}`` is substituted
``security``            add ``<suite>-security`` from the host's security mirror if it has one
``packages``            packages to install
``build_packages``      installed for the build only, purged at its end (``dropbear-bin``)
``kernel_package``      kernel (meta)package, unpacked, never installed
``busybox_package``     static busybox package for the initramfs
``initramfs_modules``   modules ``/init`` loads (deps added, built-ins skipped)
``rootfs_size_gib``     virtual size of the root filesystem (sparse)
``rootfs_label``        ext4 label, default ``root``
``dpkg_path_exclude``   dpkg ``path-exclude`` patterns (kept in the image)
``dpkg_path_include``   dpkg ``path-include`` patterns
``customize``           script in the recipe folder, run as ``customize ROOT``
``extends``             another recipe this one builds on: its keys are the defaults,
                        ``packages`` are added to its packages, its ``customize`` runs first
``mirror``              the archive when the host has no mirror for ``distro`` (Ubuntu's)
``keyring``             host keyring file for mmdebstrap ``--keyring`` (Ubuntu's archive key)
======================  ===================================================================

.. warning:: Rebuilding a base (``force=True``) replaces the ``rootfs.qcow2`` that built
   images use as backing file; images built on the old base must be rebuilt.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localsbx import paths
from localsbx.errors import BaseImageError, ConfigError
from localsbx.vm.kernel import extract_vmlinux, make_initramfs

__all__ = [
    "BaseInfo",
    "Recipe",
    "build_base",
    "get_base",
    "known_base_names",
    "list_bases",
    "load_recipe",
]

logger = logging.getLogger(__name__)

#: Folder of base recipes, one sub-folder with a ``recipe.toml`` per base.
RECIPES_DIR = Path(__file__).resolve().parent.parent / "images"
_GUEST_DIR = Path(__file__).resolve().parent / "guest"
_AGENT_SOURCE = _GUEST_DIR / "agent.c"
_GUEST_INSTALL = _GUEST_DIR / "guest-install.sh"
#: Guest files whose content is baked into a base (part of the recipe digest).
_GUEST_FILES = (_AGENT_SOURCE, _GUEST_INSTALL, _GUEST_DIR / "init.sh")

ROOTFS = "rootfs.qcow2"
VMLINUX = "vmlinux"
INITRAMFS = "initramfs.cpio"
METADATA = "base.json"
BUILD_LOG = "build.log"
#: boot times measured on the host (cold boot, restore to a first command): see record_timings
TIMINGS = "timings.json"
#: Base format. 2: the boot kit (agent + dropbear) is in the initramfs, not the rootfs;
#: a format-1 base cannot boot with today's /init and must be rebuilt.
_FORMAT = 2

Progress = Callable[[str], None]

# ------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    """A parsed ``images/<name>/recipe.toml`` (see the module docstring for the keys)."""

    name: str
    dir: Path
    distro: str
    suite: str
    variant: str
    components: tuple[str, ...]
    extra_suites: tuple[str, ...]
    security: bool
    packages: tuple[str, ...]
    build_packages: tuple[str, ...]
    kernel_package: str
    busybox_package: str
    initramfs_modules: tuple[str, ...]
    rootfs_size_gib: int
    rootfs_label: str
    dpkg_path_exclude: tuple[str, ...]
    dpkg_path_include: tuple[str, ...]
    #: customize scripts in order (an ``extends`` parent's first)
    customize: tuple[Path, ...]
    digest: str = field(repr=False)
    mirror: str | None = None
    keyring: str | None = None
    extends: str | None = None


_REQUIRED = ("distro", "suite", "packages", "kernel_package", "busybox_package",
             "initramfs_modules")  # fmt: skip
_KNOWN = {*_REQUIRED, "variant", "components", "extra_suites", "security", "build_packages",
          "rootfs_size_gib", "rootfs_label", "dpkg_path_exclude", "dpkg_path_include",
          "customize", "mirror", "keyring", "extends"}  # fmt: skip


def recipe_names() -> list[str]:
    """Names of the bases that have a recipe (``images/<name>/recipe.toml``), sorted."""
    if not RECIPES_DIR.is_dir():
        return []
    return sorted(p.parent.name for p in RECIPES_DIR.glob("*/recipe.toml"))


def known_base_names() -> list[str]:
    """Names a ``FROM`` may use: every recipe, plus every base present in the store
    without one (``localsbx base import``), sorted."""
    names = set(recipe_names())
    bases = _bases_dir()
    if bases.is_dir():
        names |= {p.name for p in bases.iterdir()
                  if not p.name.startswith(".") and (p / METADATA).is_file()}
    return sorted(names)


def _unknown(name: str) -> BaseImageError:
    known = ", ".join(known_base_names()) or "none"
    return BaseImageError(f"unknown base image {name!r} (known: {known})",
                          hint="list them with `localsbx base ls`")


def load_recipe(name: str) -> Recipe:
    """Parse and check ``images/<name>/recipe.toml`` (``tensorlake/<name>`` is the same
    recipe, as Tensorlake names its bases).

    :raises BaseImageError: unknown name, or a malformed recipe.
    """
    name = name.removeprefix("tensorlake/")
    raw, customize, files = _recipe_raw(name, ())
    digest = hashlib.sha256()
    for f in files + list(_GUEST_FILES):
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    suite = raw["suite"]
    return Recipe(
        name=name,
        dir=RECIPES_DIR / name,
        distro=raw["distro"],
        suite=suite,
        variant=raw.get("variant", "minbase"),
        components=tuple(raw.get("components", ["main"])),
        extra_suites=tuple(s.replace("{suite}", suite) for s in raw.get("extra_suites", [])),
        security=bool(raw.get("security", False)),
        packages=tuple(raw["packages"]),
        build_packages=tuple(raw.get("build_packages", [])),
        kernel_package=raw["kernel_package"],
        busybox_package=raw["busybox_package"],
        initramfs_modules=tuple(raw["initramfs_modules"]),
        rootfs_size_gib=int(raw.get("rootfs_size_gib", 8)),
        rootfs_label=raw.get("rootfs_label", "root"),
        dpkg_path_exclude=tuple(raw.get("dpkg_path_exclude", [])),
        dpkg_path_include=tuple(raw.get("dpkg_path_include", [])),
        customize=tuple(customize),
        digest=digest.hexdigest(),
        mirror=raw.get("mirror"),
        keyring=raw.get("keyring"),
        extends=raw.get("extends"),
    )


def _recipe_raw(name: str, chain: tuple[str, ...]) -> tuple[dict[str, Any], list[Path], list[Path]]:
    """The recipe's keys with its ``extends`` chain folded in, its customize scripts
    (parents' first) and every file of the recipe folders (for the digest)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
        raise _unknown(name)
    folder = RECIPES_DIR / name
    path = folder / "recipe.toml"
    if not path.is_file():
        raise _unknown(name)
    try:
        raw: dict[str, Any] = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise BaseImageError(f"{path}: {exc}") from exc
    extra = sorted(set(raw) - _KNOWN)
    if extra:
        raise BaseImageError(f"{path}: unknown keys {extra}")
    customize = folder / raw["customize"] if raw.get("customize") else None
    if customize is not None and not customize.is_file():
        raise BaseImageError(f"{path}: customize script {customize} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if customize is not None and customize.resolve().parent != folder.resolve():
        files.append(customize)  # shared with another recipe (ubuntu-systemd: debian-systemd's)
    scripts: list[Path] = []
    parent = raw.get("extends")
    if parent:
        if parent in (*chain, name):
            raise BaseImageError(f"{path}: extends {parent!r} makes a cycle")
        praw, scripts, pfiles = _recipe_raw(parent, (*chain, name))
        packages = [*praw.get("packages", []), *raw.get("packages", [])]
        raw = {**{k: v for k, v in praw.items() if k != "customize"}, **raw,
               "packages": packages, "extends": parent}
        files = pfiles + files
    if customize is not None:
        scripts.append(customize)
    if not chain:
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise BaseImageError(f"{path}: missing keys {missing}")
    return raw, scripts, files


# --------------------------------------------------------------------------- bases


@dataclass(frozen=True)
class BaseInfo:
    """What is known about one base: built or not, and where its files are.

    :param name: the base name (its recipe folder).
    :param path: ``<data>/bases/<name>``, whether or not it exists.
    :param built: all files present and ``base.json`` readable.
    :param meta: the parsed ``base.json`` (empty when not built).
    :param size_bytes: disk space used by the base directory (bytes), 0 when not built.
    :param recipe_digest: digest of the recipe and guest files the base was built from.
    :param current_recipe_digest: digest of today's recipe (``None``: recipe gone).
    """

    name: str
    path: Path
    built: bool
    meta: dict[str, Any]
    size_bytes: int
    recipe_digest: str | None
    current_recipe_digest: str | None
    old_format: int | None = None

    @property
    def rootfs(self) -> Path:
        """``rootfs.qcow2``: backing file of every overlay (never written)."""
        return self.path / ROOTFS

    @property
    def kernel(self) -> Path:
        """``vmlinux``: the PVH ELF kernel for ``-kernel``."""
        return self.path / VMLINUX

    @property
    def initrd(self) -> Path:
        """``initramfs.cpio``: for ``-initrd``, followed by the per-VM identity cpio."""
        return self.path / INITRAMFS

    @property
    def digest(self) -> str | None:
        """Content digest of the built base (its three files); images built on it key on this,
        so a rebuilt base never matches images that were built on the previous one."""
        files = self.meta.get("files")
        if not files:
            return None
        text = "|".join(f"{f}:{files[f]['sha256']}" for f in (ROOTFS, VMLINUX, INITRAMFS))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def kernel_digest(self) -> str | None:
        """sha256 of ``vmlinux`` (part of a snapshot's compatibility key)."""
        return self.meta.get("files", {}).get(VMLINUX, {}).get("sha256")

    @property
    def kernel_version(self) -> str | None:
        return self.meta.get("kernel_version")

    @property
    def built_at(self) -> str | None:
        """ISO 8601 UTC time the build finished, or ``None``."""
        return self.meta.get("built_at")

    @property
    def outdated(self) -> bool:
        """Built from another version of the recipe or guest files than today's."""
        return bool(self.built and self.current_recipe_digest
                    and self.recipe_digest != self.current_recipe_digest)

    @property
    def state(self) -> str:
        """``built``, ``outdated`` (built, recipe changed since), ``rebuild needed`` (made by
        an older localsbx: :data:`_FORMAT`) or ``not built``."""
        if not self.built:
            return "rebuild needed" if self.old_format else "not built"
        return "outdated" if self.outdated else "built"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary (the CLI's ``base ls --json``).

        ``state`` is ``built``, ``not built`` or ``rebuild needed``; ``outdated`` says whether the recipe
        changed since the build.
        """
        return {
            "name": self.name,
            "state": "built" if self.built else self.state,
            "outdated": self.outdated,
            "path": str(self.path),
            "distro": self.meta.get("distro"),
            "suite": self.meta.get("suite"),
            "kernel_version": self.kernel_version,
            "digest": self.digest,
            "size_bytes": self.size_bytes if self.built else None,
            "built_at": self.built_at,
            **{k: self.timings.get(k) for k in ("cold_boot_s", "init_ready_s", "restore_s")},
        }

    @property
    def timings(self) -> dict[str, Any]:
        """Boot times measured on this host when the first image was built on the base
        (:func:`record_timings`): ``cold_boot_s`` (QEMU start to SSH connected, the snapshot
        VM), ``init_ready_s`` (to systemd up, systemd bases), ``restore_s`` (snapshot
        restore to the end of a first command); ``{}`` if none."""
        with contextlib.suppress(OSError, ValueError):
            data = json.loads((self.path / TIMINGS).read_text())
            if isinstance(data, dict):
                return data
        return {}


def _bases_dir() -> Path:
    return paths.bases_dir()


def _du(path: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def _info(name: str) -> BaseInfo:
    path = _bases_dir() / name
    try:
        current = load_recipe(name).digest
    except BaseImageError:
        current = None
    meta: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads((path / METADATA).read_text())
    built = (bool(meta) and meta.get("format", 1) >= _FORMAT
             and all((path / f).is_file() for f in (ROOTFS, VMLINUX, INITRAMFS)))
    return BaseInfo(
        name=name,
        path=path,
        built=built,
        meta=meta if built else {},
        size_bytes=_du(path) if built else 0,
        recipe_digest=meta.get("recipe_digest") if built else None,
        current_recipe_digest=current,
        old_format=meta.get("format", 1) if meta and not built else None,
    )


def record_timings(name: str, **values: Any) -> None:
    """Write the base's measured boot times (``timings.json``, beside ``base.json``, so
    the base's digest does not change); a rebuilt base starts without them."""
    path = _bases_dir() / name
    if not (path / METADATA).is_file():
        return
    data = {**values, "measured_at": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    tmp = path / f".{TIMINGS}.{os.getpid()}"
    with contextlib.suppress(OSError):
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path / TIMINGS)


def list_bases() -> list[BaseInfo]:
    """Every base that has a recipe or a built directory, by name."""
    names = set(known_base_names())
    bases = _bases_dir()
    if bases.is_dir():
        names |= {p.name for p in bases.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return [_info(n) for n in sorted(names)]


def get_base(name: str) -> BaseInfo:
    """The built base ``name``.

    :raises BaseImageError: unknown name (the message lists the known ones), or not
        built yet (hint: ``localsbx base build NAME``).
    """
    name = name.removeprefix("tensorlake/")
    info = _info(name)
    if info.built:
        return info
    with contextlib.suppress(OSError, ValueError):
        old = json.loads((info.path / METADATA).read_text()).get("format", 1)
        if old < _FORMAT:
            how = (f"localsbx base build {name} --force" if name in recipe_names()
                   else f"localsbx base import {name} ROOTFS.tar (again)")
            raise BaseImageError(
                f"base image {name!r} was made by an older localsbx (base format {old}, now "
                f"{_FORMAT}: the guest agent and SSH server moved from the rootfs into the "
                "initramfs boot kit); it must be rebuilt", hint=how)
    if name not in known_base_names():
        raise _unknown(name)
    raise BaseImageError(f"base image {name!r} is not built",
                         hint=f"localsbx base build {name}")


# --------------------------------------------------------------------------- mirror

_APT_DIR = Path("/etc/apt")


def _apt_sources(apt_dir: Path = _APT_DIR) -> list[tuple[str, list[str]]]:
    """``(uri, suites)`` of every enabled ``deb`` source in the host's apt configuration."""
    out: list[tuple[str, list[str]]] = []
    one_line = [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]
    for f in one_line:
        with contextlib.suppress(OSError):
            for line in f.read_text().splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    out.append((words[1], [words[2]]))
    for f in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", f.read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[0].isspace():
                        continue
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    out.append((uri, fields.get("suites", "").split()))
    return out


def host_mirrors(distro: str, apt_dir: Path = _APT_DIR) -> tuple[str, str | None]:
    """The host's mirror for ``distro`` and its security mirror (or ``None``).

    ``LOCALSBX_MIRROR`` / ``LOCALSBX_SECURITY_MIRROR`` override the host configuration.
    A source counts as the ``debian`` mirror when its URI path ends in ``/debian``, and as
    its security mirror when it ends in ``/debian-security``.

    :raises ConfigError: no mirror for ``distro`` in the host configuration.
    """
    env_main = os.environ.get("LOCALSBX_MIRROR")
    env_sec = os.environ.get("LOCALSBX_SECURITY_MIRROR")
    main = sec = None
    for uri, _suites in _apt_sources(apt_dir):
        tail = uri.rstrip("/").rsplit("/", 1)[-1]
        if tail == distro and main is None:
            main = uri
        elif tail == f"{distro}-security" and sec is None:
            sec = uri
    main = env_main or main
    if not main:
        raise ConfigError(
            f"no {distro} mirror in the host's apt configuration ({apt_dir})",
            hint="set LOCALSBX_MIRROR to a mirror URL (e.g. the one your apt uses)",
        )
    return main, env_sec or sec


def _mirrors(recipe: Recipe, mirror: str | None) -> tuple[str, str | None]:
    if mirror:
        return mirror, None
    try:
        return host_mirrors(recipe.distro)
    except ConfigError:
        if recipe.mirror and not os.environ.get("LOCALSBX_MIRROR"):
            return recipe.mirror, None
        raise


# ---------------------------------------------------------------------------- build


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    bases = _bases_dir()
    bases.mkdir(parents=True, exist_ok=True)
    with open(bases / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run_logged(argv: list[str], log: Path, progress: Progress | None, *, step: str,
                env: dict[str, str] | None = None) -> None:
    """Run ``argv``, appending its output to ``log``; progress gets the notable lines."""
    logger.debug("+ %s", shlex.join(argv))
    with open(log, "ab") as f:
        f.write(f"+ {shlex.join(argv)}\n".encode())
        f.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env)
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                f.write(raw)
                line = raw.decode(errors="replace").rstrip()
                if progress and line.startswith(("localsbx:", "I: running", "E:")):
                    progress("  " + line.removeprefix("localsbx: "))
            rc = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise BaseImageError(f"{step} failed (exit status {rc})\n--- {log.name} (tail) ---\n{tail}")


def _require_tools(*tools: str) -> None:
    sbin = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [t for t in tools if shutil.which(t, path=sbin) is None]
    if missing:
        raise ConfigError(
            f"missing host tools for building a base: {', '.join(missing)}",
            hint="apt-get install mmdebstrap e2fsprogs qemu-utils gcc libc6-dev uidmap zstd",
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: Where Debian/Ubuntu hosts keep locally added CA certificates (update-ca-certificates).
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")


def host_ca_certificates() -> list[Path]:
    """The host's locally added CA certificates (``/usr/local/share/ca-certificates/**/*.crt``).

    A base trusts them too, so guests work behind the same TLS-inspecting proxy as the host
    (``pip install`` and ``apt-get`` over https in a RUN step). ``LOCALSBX_HOST_CA=0`` turns
    this off.
    """
    if os.environ.get("LOCALSBX_HOST_CA", "1") == "0" or not HOST_CA_DIR.is_dir():
        return []
    return sorted(p for p in HOST_CA_DIR.rglob("*.crt") if p.is_file() and os.access(p, os.R_OK))


def _ca_hook(certs: list[Path]) -> str:
    q = shlex.quote
    dest = '"$1"/usr/local/share/ca-certificates/localsbx-host'
    return (f"mkdir -p {dest} && cp {' '.join(q(str(c)) for c in certs)} {dest}/ && "
            'chroot "$1" update-ca-certificates >/dev/null')


def _mmdebstrap_argv(recipe: Recipe, *, mode: str, stage: Path, agent: Path, ext4: Path,
                     mirror: str, security: str | None) -> list[str]:
    q = shlex.quote
    install = (f"sh {q(str(_GUEST_INSTALL))} install \"$1\" {q(str(stage))} {q(str(agent))} "
               f"{q(recipe.kernel_package)} {q(recipe.busybox_package)} "
               f"{q(' '.join(recipe.build_packages))}")
    mkfs = f"sh {q(str(_GUEST_INSTALL))} mkfs \"$1\" {q(str(ext4))} {q(recipe.rootfs_label)}"
    argv = [
        "mmdebstrap",
        f"--mode={mode}",
        f"--variant={recipe.variant}",
        "--format=null",
        f"--components={','.join(recipe.components)}",
        f"--include={','.join([*recipe.packages, *recipe.build_packages])}",
        "--aptopt=APT::Install-Recommends \"false\"",
        *(f"--dpkgopt=path-exclude={p}" for p in recipe.dpkg_path_exclude),
        *(f"--dpkgopt=path-include={p}" for p in recipe.dpkg_path_include),
        f"--customize-hook={install}",
    ]
    if recipe.keyring:
        argv.append(f"--keyring={recipe.keyring}")
    for script in recipe.customize:
        argv.append(f"--customize-hook=sh {q(str(script))} \"$1\"")
    certs = host_ca_certificates()
    if certs:
        argv.append(f"--customize-hook={_ca_hook(certs)}")
    argv += [f"--customize-hook={mkfs}", recipe.suite, "/dev/null"]
    comps = " ".join(recipe.components)
    for suite in (recipe.suite, *recipe.extra_suites):
        argv.append(f"deb {mirror} {suite} {comps}")
    if recipe.security and security:
        argv.append(f"deb {security} {recipe.suite}-security {comps}")
    return argv


#: Seconds to wait for the archive's ``dists/<suite>/Release`` before giving up.
MIRROR_PROBE_TIMEOUT = 10.0


def check_archive(mirror: str, suite: str, distro: str, *,
                  timeout: float = MIRROR_PROBE_TIMEOUT) -> None:
    """Fail at once, in words, when ``mirror`` does not serve ``suite`` (before mmdebstrap
    spends minutes finding out). Proxies come from the environment, as for apt.

    :raises BaseImageError: unreachable, or no ``dists/<suite>/Release`` there.
    """
    import urllib.error
    import urllib.request

    url = f"{mirror.rstrip('/')}/dists/{suite}/Release"
    try:
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout):
            return
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise BaseImageError(
            f"cannot reach the {distro} archive for {suite}: {url}: {reason}",
            hint="point LOCALSBX_MIRROR (or `localsbx base build NAME --mirror URL`) at a "
                 f"reachable mirror of the {distro} archive, or make the base from a rootfs "
                 "tarball: `localsbx base import NAME ROOTFS.tar`") from exc


def build_base(name: str, *, force: bool = False, progress: Progress | None = None,
               mirror: str | None = None) -> BaseInfo:
    """Build the base ``name`` from ``images/<name>/`` (a no-op when already built).

    Concurrent calls for the same name wait for each other (``flock``).

    :param force: rebuild even when built (see the module warning about images).
    :param progress: called with one line of text per step (for a CLI); ``None``: quiet.
    :param mirror: the archive to build from (default: ``LOCALSBX_MIRROR``, the host's apt
        mirror for the distro, else the recipe's ``mirror``); probed first.
    :returns: the built base.
    :raises BaseImageError: unknown name, or a build step failed (the message carries the
        tail of ``build.log``).
    :raises ConfigError: a host tool or the mirror is missing.
    """
    name = name.removeprefix("tensorlake/")
    recipe = load_recipe(name)
    say = progress or (lambda _text: None)
    with _locked(name):
        current = _info(name)
        if current.built and not force:
            return current
        _require_tools("mmdebstrap", "mkfs.ext4", "qemu-img", "gcc", "tar", "zstd")
        mirror, security = _mirrors(recipe, mirror)
        check_archive(mirror, recipe.suite, recipe.distro)
        if recipe.keyring and not Path(recipe.keyring).is_file():
            raise ConfigError(
                f"base {name}: the {recipe.distro} archive key {recipe.keyring} is not on "
                "this host, so mmdebstrap cannot check the archive",
                hint=f"install the host package that ships it ({recipe.distro}-keyring), or "
                     "make the base from a rootfs: `localsbx base import NAME ROOTFS.tar`")
        final = _bases_dir() / name
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=_bases_dir()))
        # hooks run inside mmdebstrap's user namespace, whose root may be a subordinate
        # uid that cannot enter the data dir (often under a 0700 home): give them a
        # world-traversable work dir in $TMPDIR for the staged files and the raw ext4
        work = Path(tempfile.mkdtemp(prefix=f"localsbx-base-{name}-"))
        try:
            _build_into(recipe, tmp, work, mirror=mirror, security=security, say=say)
            old = None
            if final.exists():
                old = final.with_name(f".old-{name}-{os.getpid()}-{int(time.time())}")
                final.rename(old)
            tmp.rename(final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    info = _info(name)
    say(f"base {name}: {info.size_bytes / 2**20:.0f} MiB, kernel {info.kernel_version}")
    return info


def _build_into(recipe: Recipe, tmp: Path, work: Path, *, mirror: str, security: str | None,
                say: Progress) -> None:
    t0 = time.monotonic()
    log = tmp / BUILD_LOG
    stage = work / "stage"
    stage.mkdir()
    # the mmdebstrap hooks write here as the namespace's root (which is not always us)
    stage.chmod(0o777)
    work.chmod(0o755)

    say(f"compiling the guest agent ({_AGENT_SOURCE.name})")
    agent = stage / "agent"
    _run_logged(["gcc", "-static", "-Os", "-s", "-Wall", "-o", str(agent), str(_AGENT_SOURCE)],
                log, None, step="compiling the guest agent")

    ext4 = work / "rootfs.ext4"
    with open(ext4, "wb") as f:
        f.truncate(recipe.rootfs_size_gib * 2**30)
    ext4.chmod(0o666)

    mode = os.environ.get("LOCALSBX_MMDEBSTRAP_MODE", "unshare")
    say(f"mmdebstrap {recipe.suite} ({recipe.variant}, mode={mode}) from {mirror}")
    argv = _mmdebstrap_argv(recipe, mode=mode, stage=stage, agent=agent, ext4=ext4,
                            mirror=mirror, security=security)
    _run_logged(argv, log, say, step="mmdebstrap")
    t_rootfs = time.monotonic() - t0

    kernel_version = (stage / "kernel-version").read_text().strip()
    say(f"kernel {kernel_version}: vmlinuz -> PVH vmlinux")
    compression = extract_vmlinux(stage / "vmlinuz", tmp / VMLINUX)
    say("initramfs: busybox + " + ", ".join(recipe.initramfs_modules))
    loaded = make_initramfs(stage / "busybox", stage / "modules", tmp / INITRAMFS,
                            kernel_version, modules=recipe.initramfs_modules, kit=stage / "kit")

    say("qemu-img convert -> rootfs.qcow2")
    _run_logged(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(ext4),
                 str(tmp / ROOTFS)], log, None, step="qemu-img convert")
    ext4.unlink()
    (tmp / ROOTFS).chmod(0o444)  # a backing file: nobody writes it

    files = {f: {"sha256": _sha256(tmp / f), "size": (tmp / f).stat().st_size}
             for f in (ROOTFS, VMLINUX, INITRAMFS)}
    meta = {
        "format": _FORMAT,
        "name": recipe.name,
        "distro": recipe.distro,
        "suite": recipe.suite,
        "variant": recipe.variant,
        "kernel_version": kernel_version,
        "kernel_package": (stage / "kernel-package").read_text().strip(),
        "kernel_compression": compression,
        "initramfs_modules": loaded,
        "rootfs_virtual_size": recipe.rootfs_size_gib * 2**30,
        "rootfs_label": recipe.rootfs_label,
        "packages": list(recipe.packages),
        "files": files,
        "mirror": mirror,
        "security_mirror": security if recipe.security else None,
        "mmdebstrap_mode": mode,
        "recipe_digest": recipe.digest,
        "host_ca_certificates": [c.name for c in host_ca_certificates()],
        "build_seconds": round(time.monotonic() - t0, 1),
        "rootfs_seconds": round(t_rootfs, 1),
        "built_at": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    tmp.chmod(0o755)  # mkdtemp made it 0700; the base is readable like the rest of the store


if __name__ == "__main__":  # pragma: no cover - manual use: python -m localsbx.base NAME
    import sys

    logging.basicConfig(level=logging.INFO)
    built = build_base(sys.argv[1] if len(sys.argv) > 1 else "debian-minimal",
                       force="--force" in sys.argv, progress=print)
    print(json.dumps(built.to_json(), indent=2))
