"""``FROM`` a registry image: pull (skopeo), cache by digest, unpack (umoci), make a base.

Usage::

    ref = parse_ref("python:3.14-trixie")     # docker.io/library/python:3.14-trixie
    pulled = pull_base(ref, progress=print)    # -> PulledImage(base=BaseInfo, config=ImageConfig)

References are Docker's: ``name[:tag]``, ``registry/repo[:tag]``, ``...@sha256:<hex>``; a
first component with a ``.`` or ``:``, or ``localhost``, is a registry host, anything else is
on Docker Hub (``library/`` added for one-component names), tag ``latest`` by default.

How a pull works (all host tools are Debian packages: ``skopeo``, ``umoci``):

* ``skopeo copy docker://REF oci:<data>/oci/layout:<key>``: one OCI image layout is the
  cache; blobs (layers, configs, manifests) live under ``blobs/sha256/<digest>`` and a blob
  already there is never downloaded again;
* ``<data>/oci/refs.json`` records reference → manifest digest. A reference pulled once is
  used from the cache without asking the registry (as ``docker build`` does without
  ``--pull``), so builds work offline; ``LOCALSBX_PULL=always`` asks every time (and falls
  back to the cache when the registry is unreachable);
* ``umoci raw unpack`` of the manifest into a tree, then :func:`localsbx.rootfs.base_from_tree`
  makes the base ``oci-<manifest digest[:12]>`` (once per digest) with the boot kit of
  ``debian-minimal``.

Registry settings, as Docker: credentials from ``$DOCKER_CONFIG/config.json`` or
``~/.docker/config.json`` (``docker login``; skopeo reads its ``auths``); plain HTTP for
``localhost``/``127.0.0.1``/``[::1]`` registries and those in ``LOCALSBX_INSECURE_REGISTRIES``
(comma-separated ``host:port``); ``LOCALSBX_REGISTRY_MIRROR`` (``host[:port]``) serves
Docker Hub references first, Docker Hub itself being the fallback (dockerd's
``registry-mirrors``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localsbx import paths
from localsbx.errors import BaseImageError, ConfigError

__all__ = ["ImageConfig", "ImageRef", "PulledImage", "looks_like_ref", "names_registry_image",
           "parse_ref", "pull_base"]

DOCKER_HUB = "docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
PULL_TIMEOUT = 1800.0
Progress = Callable[[str], None]

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"sha256:[0-9a-f]{64}"


@dataclass(frozen=True)
class ImageRef:
    """A normalized registry reference (Docker's rules)."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    @property
    def insecure(self) -> bool:
        """Reached over plain HTTP (Docker: localhost registries and configured ones)."""
        host = self.registry.rsplit(":", 1)[0] if not self.registry.startswith("[") \
            else self.registry.split("]")[0] + "]"
        extra = {h.strip() for h in os.environ.get("LOCALSBX_INSECURE_REGISTRIES", "").split(",")}
        return host in {"localhost", "127.0.0.1", "[::1]"} or self.registry in extra


def looks_like_ref(text: str) -> bool:
    """Whether ``text`` parses as a registry reference."""
    try:
        parse_ref(text)
    except BaseImageError:
        return False
    return True


def names_registry_image(text: str) -> bool:
    """Whether a ``FROM`` value is explicitly a registry image: a valid reference with a
    tag, a digest or a ``/`` (``python:3.14-trixie``, ``ghcr.io/org/img``). A bare word is
    checked against the bases first, so a typo in a base name is not sent to Docker Hub."""
    return any(c in text for c in ":/@") and looks_like_ref(text)


def parse_ref(text: str) -> ImageRef:
    """Parse ``text`` as Docker does (see the module docstring).

    :raises BaseImageError: not a valid reference.
    """
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not re.fullmatch(_DIGEST, digest):
            raise BaseImageError(f"invalid image reference {text!r}: bad digest {digest!r}")
    parts = rest.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"
                           or parts[0].startswith("[")):
        registry, parts = parts[0], parts[1:]
    else:
        registry = DOCKER_HUB
    tag = None
    if ":" in parts[-1]:
        parts[-1], tag = parts[-1].rsplit(":", 1)
        if not re.fullmatch(_TAG, tag):
            raise BaseImageError(f"invalid image reference {text!r}: bad tag {tag!r}")
    if not parts or not all(re.fullmatch(_COMPONENT, p) for p in parts):
        raise BaseImageError(f"invalid image reference {text!r}",
                             hint="write name[:tag], registry/repo[:tag] or ...@sha256:<digest>")
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
        if len(parts) == 1:
            parts = ["library", *parts]
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(registry, "/".join(parts), tag, digest)


@dataclass(frozen=True)
class ImageConfig:
    """What a build takes from the image config (Docker: ``config`` of the OCI image config)."""

    env: tuple[tuple[str, str], ...] = ()
    workdir: str | None = None
    user: str | None = None
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None

    @classmethod
    def from_oci(cls, blob: dict[str, Any]) -> ImageConfig:
        c = blob.get("config") or {}
        env = []
        for item in c.get("Env") or []:
            k, _, v = item.partition("=")
            env.append((k, v))
        ep, cmd = c.get("Entrypoint"), c.get("Cmd")
        return cls(env=tuple(env), workdir=c.get("WorkingDir") or None, user=c.get("User") or None,
                   entrypoint=tuple(ep) if ep else None, cmd=tuple(cmd) if cmd else None)

    def to_json(self) -> dict[str, Any]:
        return {"env": [f"{k}={v}" for k, v in self.env], "workdir": self.workdir,
                "user": self.user, "entrypoint": list(self.entrypoint or []) or None,
                "cmd": list(self.cmd or []) or None}


@dataclass(frozen=True)
class PulledImage:
    """A registry image made into a base. ``cached``: no registry was asked."""

    ref: ImageRef
    digest: str
    config: ImageConfig
    base: Any = field(repr=False)
    cached: bool = False


def _oci_dir() -> Path:
    d = paths.data_dir() / "oci"
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    with open(_oci_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _refs_file() -> Path:
    return _oci_dir() / "refs.json"


def _read_refs() -> dict[str, str]:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(_refs_file().read_text())
    return {}


def _write_refs(refs: dict[str, str]) -> None:
    tmp = _refs_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(refs, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, _refs_file())


def _authfile() -> Path | None:
    base = os.environ.get("DOCKER_CONFIG")
    f = Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"
    return f if f.is_file() else None


def _sources(ref: ImageRef) -> list[ImageRef]:
    """Where to pull ``ref`` from, in order: the mirror first for Docker Hub references."""
    mirror = os.environ.get("LOCALSBX_REGISTRY_MIRROR", "").strip().removeprefix("http://")
    mirror = mirror.removeprefix("https://").rstrip("/")
    if ref.registry == DOCKER_HUB and mirror:
        return [ImageRef(mirror, ref.repository, ref.tag, ref.digest), ref]
    return [ref]


def copy_argv(src: ImageRef, layout: Path, key: str) -> list[str]:
    """The ``skopeo copy`` command pulling ``src`` into the cache layout under ``key``."""
    argv = ["skopeo", "copy", "--quiet"]
    if src.insecure:
        argv.append("--src-tls-verify=false")
    auth = _authfile()
    if auth is not None:
        argv.append(f"--src-authfile={auth}")
    return [*argv, f"docker://{src}", f"oci:{layout}:{key}"]


def _key(ref: ImageRef) -> str:
    return "r-" + hashlib.sha256(str(ref).encode()).hexdigest()[:24]


def _run(argv: list[str], what: str) -> None:
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=PULL_TIMEOUT)
    except FileNotFoundError as exc:
        raise ConfigError(f"{argv[0]} is not installed ({what})",
                          hint="apt-get install skopeo umoci") from exc
    except subprocess.TimeoutExpired as exc:
        raise BaseImageError(f"{what}: timed out after {PULL_TIMEOUT:.0f} s") from exc
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-6:])
        raise BaseImageError(f"{what} failed (exit status {p.returncode}):\n{tail}")


def _manifest_digest(layout: Path, key: str) -> str:
    index = json.loads((layout / "index.json").read_text())
    for m in index.get("manifests", []):
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == key:
            return m["digest"]
    raise BaseImageError(f"pulled image not found in the cache layout {layout} ({key})")


def _blob(layout: Path, digest: str) -> dict[str, Any]:
    algo, hexd = digest.split(":", 1)
    return json.loads((layout / "blobs" / algo / hexd).read_text())


def _tag_digest(layout: Path, key: str, digest: str, media_type: str, size: int) -> None:
    """Point ``key`` at ``digest`` in the layout's index (so umoci can unpack it by name)."""
    index = json.loads((layout / "index.json").read_text())
    manifests = [m for m in index.get("manifests", [])
                 if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != key]
    manifests.append({"mediaType": media_type, "digest": digest, "size": size,
                      "annotations": {"org.opencontainers.image.ref.name": key}})
    index["manifests"] = manifests
    tmp = layout / "index.json.tmp"
    tmp.write_text(json.dumps(index))
    os.replace(tmp, layout / "index.json")


def pull_base(ref: ImageRef, *, progress: Progress | None = None) -> PulledImage:
    """The base made from registry image ``ref``, pulling it unless cached.

    :raises BaseImageError: the registry is unreachable and the image was never pulled, the
        image does not exist, or unpacking failed (the message says which and how to fix).
    :raises ConfigError: skopeo or umoci is missing.
    """
    from localsbx import base as _base
    from localsbx import rootfs

    say = progress or (lambda _text: None)
    layout = _oci_dir() / "layout"
    with _locked():
        refs = _read_refs()
        digest = ref.digest or refs.get(str(ref))
        cached = digest is not None and (layout / "blobs" / "sha256" / digest.split(":")[1]).is_file()
        errors: list[str] = []
        asked = False  # was a registry contacted successfully?
        if not cached or os.environ.get("LOCALSBX_PULL") == "always":
            for src in _sources(ref):
                say(f"pulling {src}")
                try:
                    _run(copy_argv(src, layout, _key(ref)), f"pulling {src}")
                except BaseImageError as exc:
                    errors.append(exc.message)
                    continue
                digest = _manifest_digest(layout, _key(ref))
                if ref.digest is None:
                    refs[str(ref)] = digest
                    _write_refs(refs)
                asked = True
                break
            else:
                if not cached:
                    raise BaseImageError(
                        f"cannot pull {ref}, and it is not in the local cache:\n" + "\n".join(errors),
                        hint="check the registry is reachable (or set LOCALSBX_REGISTRY_MIRROR), "
                             "`docker login` for a private one, or use a localsbx base "
                             "(`localsbx base ls`)")
                say(f"registry unreachable; using the cached {ref} ({digest[:19]})")
        assert digest is not None
        manifest = _blob(layout, digest)
        if "manifests" in manifest:  # an index that skopeo resolved to the host platform
            raise BaseImageError(f"{ref}: {digest} is a multi-platform index, not an image")
        config = ImageConfig.from_oci(_blob(layout, manifest["config"]["digest"]))
        name = f"oci-{digest.split(':')[1][:12]}"
        info = _base._info(name)
        if not info.built:
            key = f"d-{digest.split(':')[1][:24]}"
            size = (layout / "blobs" / "sha256" / digest.split(":")[1]).stat().st_size
            _tag_digest(layout, key, digest,
                        manifest.get("mediaType", "application/vnd.oci.image.manifest.v1+json"),
                        size)
            work = Path(tempfile.mkdtemp(prefix="localsbx-oci-"))
            try:
                tree = work / "rootfs"
                say(f"unpacking {ref} ({len(manifest.get('layers', []))} layers)")
                _run(["umoci", "raw", "unpack", *([] if os.geteuid() == 0 else ["--rootless"]),
                      "--image", f"{layout}:{key}", str(tree)], f"unpacking {ref}")
                info = rootfs.base_from_tree(
                    name, tree, source={"oci": str(ref), "digest": digest},
                    extra={"kind": "oci", "oci_ref": str(ref), "oci_digest": digest,
                           "oci_config": config.to_json()}, progress=say)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        return PulledImage(ref=ref, digest=digest, config=config, base=info, cached=not asked)
