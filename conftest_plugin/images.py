"""Turn a :class:`SandboxSpec`'s source into a registered image name, building it at most once.

* An ``image=`` name is used as is.
* A Dockerfile or definition is read, and built under a cross-process ``flock`` keyed by the
  definition digest (``<data>/locks/pytest-build-<key>.lock``): with pytest-xdist, the first
  worker to need it builds; the others wait on the lock and then find the finished build
  (the builder reuses an unchanged definition by digest and only registers the name). Later
  runs reuse it the same way while the definition and its context files are unchanged.
* Within one process the outcome (name or error) is cached, so 20 tests using one Dockerfile
  parse and register it once, and a broken Dockerfile is not rebuilt for every test.

The registered name is stable and readable: ``pytest-<folder>-<hash>`` for a Dockerfile
(hash of its absolute path), ``pytest-<Image.name>-<hash>`` for a definition (hash of its
digest). Real builds are appended to ``<data>/pytest-builds.log`` (one JSON line each:
time, pid, xdist worker, name, digest, seconds), which tells a user what was built when,
and lets the plugin's own tests count builds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest_plugin.spec import SandboxSpec

#: Written to the build log when an image was really built (not reused).
BUILD_LOG_NAME = "pytest-builds.log"


def build_log_path() -> Path:
    from localsbx import paths

    return paths.data_dir() / BUILD_LOG_NAME


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "image"
    return s[:40]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _definition(spec: SandboxSpec):
    """(definition, registered name, build context) for a Dockerfile/definition spec."""
    from localsbx.definition.loader import load_definition

    if spec.dockerfile is not None:
        df = spec.dockerfile.resolve()
        if not df.is_file():
            from localsbx.errors import DefinitionError

            raise DefinitionError(f"sandbox marker: Dockerfile {df} does not exist")
        name = f"pytest-{_slug(df.parent.name)}-{_sha(str(df))[:8]}"
        return load_definition(df, name=name), name, spec.context
    defn = spec.definition
    if hasattr(defn, "to_definition"):
        defn = defn.to_definition()
    name = f"pytest-{_slug(defn.name)}-{defn.digest()[:8]}"
    return defn, name, spec.context


class _Reporter:
    """Builder progress: notes whether a real build happened; echoes status lines."""

    def __init__(self, echo: Callable[[str], None] | None) -> None:
        self.built = False
        self.echo = echo

    def say(self, text: str) -> None:
        if text.startswith(("booting build VM", "restoring build VM")):  # a cold boot, a template
            self.built = True
        if self.echo is not None and self.built or self.echo is not None and text.startswith("warning:"):
            self.echo(text)

    def output(self, chunk: bytes) -> None:
        pass


class ImageResolver:
    """Per-process cache of spec source → registered image name (thread-safe).

    :param project: the localsbx project images are registered in (``None``: current).
    :param echo: called with progress lines while an image is really being built.
    """

    def __init__(self, project: str | None = None,
                 echo: Callable[[str], None] | None = None) -> None:
        self.project = project
        self.echo = echo
        self._cache: dict[Any, tuple[str | None, BaseException | None]] = {}
        self._lock = threading.Lock()
        #: (name, seconds) of images this process really built, for the terminal summary.
        self.built: list[tuple[str, float]] = []

    def _key(self, spec: SandboxSpec) -> Any:
        if spec.dockerfile is not None:
            return ("dockerfile", str(spec.dockerfile.resolve()), str(spec.context))
        d = spec.definition
        if hasattr(d, "to_definition"):
            d = d.to_definition()
        return ("definition", d.digest(), str(spec.context))

    def resolve(self, spec: SandboxSpec) -> str:
        """The registered image name for ``spec`` (building it first when needed).

        :raises DefinitionError: the Dockerfile/definition is invalid.
        :raises ImageBuildError: a build step failed (cached: later tests fail at once).
        """
        if spec.image is not None:
            return spec.image
        key = self._key(spec)
        with self._lock:
            if key in self._cache:
                name, err = self._cache[key]
                if err is not None:
                    raise err
                return name  # type: ignore[return-value]
            try:
                name = self._build(spec)
            except Exception as exc:
                self._cache[key] = (None, exc)
                raise
            self._cache[key] = (name, None)
            return name

    def _build(self, spec: SandboxSpec) -> str:
        from localsbx import paths, store
        from localsbx.build.builder import build_image

        defn, name, context = _definition(spec)
        lock_key = _sha(f"{defn.digest()}|{context}")[:24]
        lock = paths.data_dir() / "locks" / f"pytest-build-{lock_key}.lock"
        rep = _Reporter(self.echo)
        src = str(spec.dockerfile) if spec.dockerfile else defn.source
        with store.locked(lock):
            t0 = time.monotonic()
            rec = build_image(defn, context_dir=context, name=name, project=self.project,
                              reporter=rep)
            seconds = time.monotonic() - t0
        if rep.built:
            self.built.append((name, seconds))
            entry = {"time": time.time(), "pid": os.getpid(),
                     "worker": os.environ.get("PYTEST_XDIST_WORKER"), "name": name,
                     "digest": rec.digest, "source": src, "seconds": round(seconds, 1)}
            with open(build_log_path(), "a") as f:
                f.write(json.dumps(entry) + "\n")
        return name


def read_build_log(digest_or_name: str | None = None) -> list[dict]:
    """Entries of the build log (optionally only those for one digest or name)."""
    try:
        lines = build_log_path().read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if digest_or_name is None or digest_or_name in (e.get("digest"), e.get("name")):
            out.append(e)
    return out
