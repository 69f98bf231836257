"""Which image and shape a test's sandbox gets: the ``sandbox`` marker, the ``sandbox_image``
fixture and the ``--sandbox-image`` / ``sandbox_image`` ini default, merged into one
:class:`SandboxSpec`. Pure: no VM, no store, so it is unit-tested without QEMU.

Precedence, per key:

1. ``@pytest.mark.sandbox(...)`` markers, closest first (test, then class, then module).
   The image *source* (``image=``, ``dockerfile=`` or ``definition=``, with its ``context=``)
   comes whole from the closest marker that names one; ``cpus``, ``memory_mb`` and
   ``timeout_secs`` are taken key by key from the closest marker that sets them.
2. the ``sandbox_image`` fixture (a user's override in conftest.py), only when no marker
   names a source;
3. whose default is ``--sandbox-image`` on the command line, else the ``sandbox_image`` ini
   value;
4. otherwise a :class:`SpecError` that says the three ways to choose one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

SOURCE_KEYS = ("image", "dockerfile", "definition")
SHAPE_KEYS = ("cpus", "memory_mb", "timeout_secs")
MARKER_KEYS = (*SOURCE_KEYS, "context", *SHAPE_KEYS)

MARKER_DOC = (
    "sandbox(image=NAME | dockerfile=PATH | definition=Image(...), context=DIR, cpus=N, "
    "memory_mb=N, timeout_secs=N): the localsbx image and shape of this test's sandbox "
    "(closest marker wins; a relative dockerfile/context is taken from the test file's folder)"
)

NO_IMAGE_HELP = (
    "no sandbox image chosen for {nodeid}. Choose one of:\n"
    "  - a marker: @pytest.mark.sandbox(image='NAME') or "
    "@pytest.mark.sandbox(dockerfile='Dockerfile')\n"
    "  - a fixture in conftest.py:  @pytest.fixture(scope='session')\n"
    "                               def sandbox_image(): return 'NAME'\n"
    "  - a default:  pytest --sandbox-image=NAME  (or `sandbox_image = NAME` in the [pytest] ini)\n"
    "`localsbx image ls` lists the images of the current project."
)


class SpecError(Exception):
    """A marker or default is malformed, or no image was chosen (message says how to fix)."""


@dataclass(frozen=True)
class SandboxSpec:
    """What to start: exactly one image source, plus the sandbox shape.

    :param image: a registered image name in the project.
    :param dockerfile: an absolute Dockerfile path (built on first use).
    :param definition: a DSL ``Image`` or an ``ImageDefinition`` (built on first use).
    :param context: absolute build-context folder (default: the Dockerfile's folder; none
        for a definition).
    :param cpus: vCPUs (``None``: localsbx's default, 1).
    :param memory_mb: RAM in MiB (``None``: 1024).
    :param timeout_secs: the sandbox stops after this many seconds (``None``: 600).
    :param origin: where the source came from, for messages ("marker", "fixture", "option").
    """

    image: str | None = None
    dockerfile: Path | None = None
    definition: Any = None
    context: Path | None = None
    cpus: int | None = None
    memory_mb: int | None = None
    timeout_secs: int | None = None
    origin: str = "marker"

    @property
    def has_source(self) -> bool:
        return any(v is not None for v in (self.image, self.dockerfile, self.definition))

    def describe(self) -> str:
        if self.image is not None:
            return f"image {self.image!r}"
        if self.dockerfile is not None:
            return f"Dockerfile {self.dockerfile}"
        return f"definition {self.definition!r}"

    def create_kwargs(self) -> dict[str, int]:
        """The shape as ``Sandbox.create`` keyword arguments (unset keys left out)."""
        return {k: getattr(self, k) for k in SHAPE_KEYS if getattr(self, k) is not None}


def _check_int(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"sandbox marker: {key}= must be an int, got {value!r}")
    if value < (0 if key == "timeout_secs" else 1):
        raise SpecError(f"sandbox marker: {key}={value} is out of range")
    return value


def marker_kwargs(args: tuple, kwargs: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Validate one marker's arguments; a single positional argument means ``image=``.

    :raises SpecError: unknown keyword, several sources, a bad type.
    """
    kw = dict(kwargs)
    if args:
        if len(args) > 1 or "image" in kw:
            raise SpecError(f"sandbox marker{where}: at most one positional argument "
                            "(the image name)")
        kw["image"] = args[0]
    unknown = sorted(set(kw) - set(MARKER_KEYS))
    if unknown:
        raise SpecError(f"sandbox marker{where}: unknown argument(s) {', '.join(unknown)}; "
                        f"allowed: {', '.join(MARKER_KEYS)}")
    sources = [k for k in SOURCE_KEYS if kw.get(k) is not None]
    if len(sources) > 1:
        raise SpecError(f"sandbox marker{where}: give only one of image=, dockerfile=, "
                        f"definition= (got {', '.join(sources)})")
    if kw.get("context") is not None and kw.get("image") is not None:
        raise SpecError(f"sandbox marker{where}: context= only applies to dockerfile= or "
                        "definition=")
    if kw.get("image") is not None and not isinstance(kw["image"], str):
        raise SpecError(f"sandbox marker{where}: image= must be a registered image name "
                        f"(str), got {kw['image']!r}; use dockerfile= or definition=")
    for key in SHAPE_KEYS:
        kw[key] = _check_int(key, kw.get(key))
    return kw


def _abs(path: str | os.PathLike, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p)


def _source_spec(kw: Mapping[str, Any], base_dir: Path, origin: str) -> SandboxSpec:
    context = _abs(kw["context"], base_dir) if kw.get("context") is not None else None
    if kw.get("image") is not None:
        return SandboxSpec(image=kw["image"], origin=origin)
    if kw.get("dockerfile") is not None:
        df = _abs(kw["dockerfile"], base_dir)
        return SandboxSpec(dockerfile=df, context=context or df.parent, origin=origin)
    if kw.get("definition") is not None:
        return SandboxSpec(definition=kw["definition"], context=context, origin=origin)
    return SandboxSpec(origin=origin)


def from_markers(marks: Iterable[tuple[tuple, Mapping[str, Any]]], test_dir: Path) -> SandboxSpec:
    """Merge ``sandbox`` markers given closest first as ``(args, kwargs)`` pairs.

    :param test_dir: the test file's folder; relative ``dockerfile``/``context`` paths are
        taken from it.
    :raises SpecError: a malformed marker.
    """
    spec: SandboxSpec | None = None
    shape: dict[str, int] = {}
    for args, kwargs in marks:
        kw = marker_kwargs(args, kwargs)
        if spec is None and any(kw.get(k) is not None for k in SOURCE_KEYS):
            spec = _source_spec(kw, test_dir, "marker")
        for key in SHAPE_KEYS:
            if key not in shape and kw.get(key) is not None:
                shape[key] = kw[key]
    return replace(spec or SandboxSpec(), **shape)


def from_value(value: Any, base_dir: Path, origin: str) -> SandboxSpec:
    """A ``sandbox_image`` fixture value or the option/ini default, as a spec.

    Accepted: an image name (``str`` without ``/``); a Dockerfile path (``os.PathLike``, or a
    ``str`` containing ``/`` — image names cannot); a DSL ``Image`` / ``ImageDefinition``;
    ``None`` (nothing chosen).

    :param base_dir: folder that relative paths are taken from.
    :raises SpecError: anything else.
    """
    if value is None:
        return SandboxSpec(origin=origin)
    if isinstance(value, os.PathLike) or (isinstance(value, str) and "/" in value):
        return _source_spec({"dockerfile": value}, base_dir, origin)
    if isinstance(value, str):
        if not value.strip():
            return SandboxSpec(origin=origin)
        return SandboxSpec(image=value.strip(), origin=origin)
    if hasattr(value, "to_definition") or hasattr(value, "ops"):
        return SandboxSpec(definition=value, origin=origin)
    raise SpecError(f"sandbox_image ({origin}) must be an image name, a Dockerfile path, or an "
                    f"Image/ImageDefinition; got {value!r}")


def merge(marker: SandboxSpec, fallback: SandboxSpec) -> SandboxSpec:
    """The marker's source when it names one, else the fallback's; the marker's shape."""
    if marker.has_source:
        return marker
    return replace(fallback, cpus=marker.cpus, memory_mb=marker.memory_mb,
                   timeout_secs=marker.timeout_secs)


def override_kwargs(spec: SandboxSpec, kwargs: Mapping[str, Any], base_dir: Path) -> SandboxSpec:
    """``sandbox_factory(image=..., cpus=...)``: explicit arguments over the test's spec."""
    kw = marker_kwargs((), kwargs, " (sandbox_factory)")
    if any(kw.get(k) is not None for k in SOURCE_KEYS):
        base = _source_spec(kw, base_dir, "factory")
    else:
        base = spec
    shape = {k: kw[k] for k in SHAPE_KEYS if kw.get(k) is not None}
    keep = {k: getattr(spec, k) for k in SHAPE_KEYS if k not in shape}
    return replace(base, **keep, **shape)
