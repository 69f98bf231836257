"""The Python image DSL, with Tensorlake's names (``tensorlake.image.Image``).

Usage::

    from localsbx import Image

    image = (
        Image(name="web", base_image="debian-minimal")
        .run("apt-get update && apt-get install -y --no-install-recommends python3")
        .workdir("/srv/app")
        .copy("app.py", "./", {"chown": "1000:1000"})
        .env("APP_MODE", "prod")
    )
    image.build(context_dir="app")      # -> ImageRecord, registered as "web"
    print(image.dockerfile())           # exactly Tensorlake's rendering

Semantics. Tensorlake renders the image to a Dockerfile (``image_to_dockerfile``) and builds
that; :meth:`Image.to_definition` produces the same IR as parsing that rendering, with two
deliberate differences, both for values Tensorlake itself mangles:

- ``env(key, value)`` values are literal. Tensorlake writes ``ENV key=<json.dumps(value)>``,
  which round-trips plain text, spaces, quotes, JSON and ``""`` (B07) but would substitute
  ``$VAR`` and keep ``\\u00e9`` escapes for non-ASCII text.
- ``workdir``/``copy``/``add`` arguments are one literal path each (no ``$VAR``
  substitution, no splitting on spaces); they are resolved with
  :func:`~localsbx.definition.ops.resolve_path` like the Dockerfile's.

``run(commands)``: a list is joined with single spaces into ONE command, exactly as
Tensorlake renders it (``RUN a b``), not run as several steps. The command then follows the
Dockerfile ``RUN`` rules: a JSON array of strings is exec form, anything else
``/bin/sh -c``; a multi-line command must be a heredoc (Tensorlake's rendering makes other
lines separate instructions, which fail there too).

The default base is ``debian-minimal`` (the first base localsbx ships), not Tensorlake's
``python:3.14-trixie``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from localsbx.definition.dockerfile import copy_op, parse_dockerfile, run_from_text
from localsbx.definition.ops import (
    Add,
    Copy,
    Env,
    ImageDefinition,
    Op,
    Workdir,
    resolve_path,
)
from localsbx.errors import DefinitionError, SourceLocation

__all__ = ["Image", "DEFAULT_BASE_IMAGE"]

#: localsbx's default base (Tensorlake's is ``python:3.14-trixie``).
DEFAULT_BASE_IMAGE = "debian-minimal"
_ARG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _OpType(Enum):
    """Tensorlake's ``_ImageBuildOperationType`` (same names and values)."""

    ADD = 1
    COPY = 2
    ENV = 3
    RUN = 4
    WORKDIR = 5


@dataclass
class _BuildOp:
    """Tensorlake's ``_ImageBuildOperation``: type, positional args, ``--key=value`` options."""

    type: _OpType
    args: list[str]
    options: dict[str, str] = field(default_factory=dict)

    def render(self) -> str:
        """One Dockerfile line, as Tensorlake's ``render_op_line``."""
        opts = " " + " ".join(f"--{k}={v}" for k, v in self.options.items()) if self.options \
            else ""
        if self.type is _OpType.ENV:
            return f"ENV{opts} {self.args[0]}={json.dumps(self.args[1])}"
        return f"{self.type.name}{opts} {' '.join(self.args)}"


class Image:
    """An image definition with Tensorlake's ``Image`` API; every method returns ``self``.

    :param name: image name, used by :meth:`build` when no ``registered_name`` is given.
    :param tag: kept for API compatibility (Tensorlake's default ``"latest"``).
    :param base_image: a localsbx base name; default ``debian-minimal``.
    """

    def __init__(self, name: str = "default", tag: str = "latest",
                 base_image: str = DEFAULT_BASE_IMAGE) -> None:
        self._name = name
        self._tag = tag
        self._base_image = base_image
        self._build_operations: list[_BuildOp] = []

    def __repr__(self) -> str:
        return (f"Image(name={self._name!r}, base_image={self._base_image!r}, "
                f"ops={len(self._build_operations)})")

    @property
    def name(self) -> str:
        """The image name."""
        return self._name

    @property
    def tag(self) -> str:
        """The image tag (informational)."""
        return self._tag

    def _add(self, op: _BuildOp) -> Image:
        self._build_operations.append(op)
        return self

    def run(self, commands: str | list[str], options: dict[str, str] | None = None) -> Image:
        """Add a build command (Tensorlake: a list is joined with spaces into one command).

        :param commands: shell command, or a list of words joined with single spaces.
        :param options: ``RUN --key=value`` flags, rendered as Tensorlake does
            (``{"mount": "type=cache,target=/root/.cache"}`` is ``RUN --mount=...``).
        """
        args = list(commands) if isinstance(commands, list) else [commands]
        return self._add(_BuildOp(_OpType.RUN, args, dict(options or {})))

    def copy(self, src: str, dest: str, options: dict[str, str] | None = None) -> Image:
        """Copy ``src`` (relative to the build context) to ``dest`` in the image.

        :param options: ``{"chown": "user[:group]", "chmod": "0755"}``.
        """
        return self._add(_BuildOp(_OpType.COPY, [src, dest], dict(options or {})))

    def add(self, src: str, dest: str, options: dict[str, str] | None = None) -> Image:
        """Like :meth:`copy`, with Docker ``ADD`` rules (local tar archives are extracted,
        ``http(s)://`` sources downloaded)."""
        return self._add(_BuildOp(_OpType.ADD, [src, dest], dict(options or {})))

    def env(self, key: str, value: str) -> Image:
        """Set an environment variable for later steps and sandbox commands (literal)."""
        return self._add(_BuildOp(_OpType.ENV, [key, value]))

    def workdir(self, directory: str) -> Image:
        """Set the working directory (relative paths join the previous one)."""
        return self._add(_BuildOp(_OpType.WORKDIR, [directory]))

    # -- rendering and IR

    def dockerfile(self, build_args: dict[str, str] | None = None) -> str:
        """The Dockerfile Tensorlake would generate (``image_to_dockerfile``), byte for byte.

        :param build_args: only the names are rendered (``ARG NAME``), sorted, before and
            after ``FROM``.
        :raises ValueError: for a build-arg name that is not ``[A-Za-z_][A-Za-z0-9_]*``.
        """
        names = list(build_args or {})
        for n in names:
            if not isinstance(n, str) or not _ARG_NAME.fullmatch(n):
                raise ValueError(f"Invalid build argument name: {n!r}")
        decl = [f"ARG {n}" for n in sorted(names)]
        lines = list(decl)
        if self._base_image:
            lines.append(f"FROM {self._base_image}")
            lines.extend(decl)
        lines.extend(op.render() for op in self._build_operations)
        return "\n".join(lines)

    def to_definition(self, build_args: dict[str, str] | None = None) -> ImageDefinition:
        """The IR of this image (see the module notes for the two literal-value rules).

        :param build_args: values for ``$NAME`` in ``base_image`` (Tensorlake declares them
            as ``ARG`` before ``FROM``) and build-time variables of every ``run`` step.
        :returns: the definition; ``source`` is ``<dsl>``, locations carry the op index.
        :raises DefinitionError: bad base name, unsupported option, empty or malformed run.
        """
        args = dict(build_args or {})
        # only the ARG/FROM head of Tensorlake's rendering: resolves ${NAME} in base_image
        head_text = "\n".join(Image(base_image=self._base_image).dockerfile(args).splitlines())
        head = parse_dockerfile(head_text + "\n", build_args=args, source="<dsl>")
        benv = tuple(sorted(args.items()))
        workdir = "/"
        ops: list[Op] = []
        warnings: list[str] = list(w for w in head.warnings if "not consumed" not in w)
        for i, op in enumerate(self._build_operations, 1):
            loc = SourceLocation("<dsl>", i)
            if op.type is _OpType.RUN:  # ENV wins over a build arg of the same name
                env_keys = {o.key for o in ops if isinstance(o, Env)}
                run_env = tuple(p for p in benv if p[0] not in env_keys)
                ops.extend(self._run_ops(op, loc, run_env, head.base, warnings))
            elif op.type is _OpType.ENV:
                key, value = op.args
                if not key or "=" in key or any(c.isspace() for c in key):
                    raise DefinitionError(f"env(): bad variable name {key!r}", location=loc,
                                          hint="use a name like APP_MODE")
                ops.append(Env(key, str(value), location=loc, text=f"{key}={value}"))
            elif op.type is _OpType.WORKDIR:
                if not op.args[0]:
                    raise DefinitionError("workdir() needs a path", location=loc,
                                          hint="e.g. .workdir('/srv/app')")
                workdir = resolve_path(workdir, op.args[0]).rstrip("/") or "/"
                ops.append(Workdir(workdir, location=loc, text=op.args[0]))
            else:
                kind = Add if op.type is _OpType.ADD else Copy
                opts = {k.lower(): str(v) for k, v in op.options.items()}
                ops.append(copy_op(kind, [op.args[0]], op.args[1], opts, workdir=workdir,
                                   location=loc, text=op.render().split(" ", 1)[1]))
        return ImageDefinition(name=self._name, base=head.base, ops=tuple(ops),
                               source="<dsl>", warnings=tuple(warnings))

    @staticmethod
    def _run_ops(op: _BuildOp, loc: SourceLocation, benv: tuple[tuple[str, str], ...],
                 base: str, warnings: list[str]) -> list[Op]:
        command = " ".join(op.args)
        if "\n" not in command and not op.options:
            return [replace(run_from_text(command, location=loc, warnings=warnings),
                            build_env=benv)]
        # options (``{"mount": "type=cache,target=/root/.cache"}``) or several lines: the
        # line Tensorlake renders (``RUN --key=value ... command``) read by the Dockerfile
        # front end, so RUN --mount and heredocs mean what they mean in a Dockerfile
        try:
            sub = parse_dockerfile(f"FROM {base}\n{op.render()}\n", source="<dsl>")
        except DefinitionError as exc:
            what = "options" if op.options else "spans several lines"
            hint = (exc.hint if op.options else
                    "a multi-line command must be a heredoc (<<EOF ... EOF), or join the "
                    "lines with && / ;")
            inner = exc.message.split(": ", 1)[1] if exc.location else exc.message
            raise DefinitionError(f"run() command #{loc.line} {what}: {inner}",
                                  location=loc, hint=hint) from exc
        warnings.extend(w.replace("line 2: ", f"run() command #{loc.line}: ", 1)
                        for w in sub.warnings)
        return [replace(o, location=loc, build_env=benv) for o in sub.ops]

    def build(
        self,
        *,
        registered_name: str | None = None,
        context_dir: str | Path | None = None,
        cpus: float = 2.0,
        memory_mb: int = 4096,
        project: str | None = None,
        build_args: dict[str, str] | None = None,
        verbose: bool = False,
        emit: Any = None,
        **ignored: Any,
    ) -> Any:
        """Build the image in a local VM and register it (Tensorlake's ``Image.build``).

        :param registered_name: name to register; default :attr:`name`.
        :param context_dir: build context for ``copy``/``add`` (``docker build <dir>``).
        :param cpus: vCPUs of the build VM (Tensorlake default 2.0; rounded up).
        :param memory_mb: RAM of the build VM in MiB (default 4096).
        :param project: localsbx project to register in (default project when ``None``).
        :param build_args: build-time variables (see :meth:`to_definition`).
        :param verbose: print the build events to stderr as Tensorlake's does (``[status]
            ...``, ``[stdout] <step output line>``); ignored when ``emit`` is given.
        :param emit: called with each build event, a dict of Tensorlake's kinds: ``status``
            (``message``), ``build_log`` (``stream``, ``message``: one line of step output),
            ``image_registered`` (``image_id``, ``name``, ``snapshot_id``); see
            :class:`localsbx.build.builder.EmitReporter`. An exception it raises stops the
            build and propagates.
        :param ignored: Tensorlake-only options (``disk_mb``, ``is_public``, ``cas``, ...),
            accepted and ignored.
        :returns: the ``ImageRecord`` of the registered image.
        :raises DefinitionError: the definition is invalid.
        :raises ImageBuildError: a build step failed.
        """
        import importlib

        builder = importlib.import_module("localsbx.build.builder")  # lazy: no VM code before

        cpu_count = int(cpus) if float(cpus).is_integer() else int(cpus) + 1
        definition = replace(self.to_definition(build_args), build_cpus=max(1, cpu_count),
                             build_memory_mb=int(memory_mb))
        if emit is None and verbose:
            emit = builder.print_event
        if emit is None:
            return builder.build_image(definition, context_dir=context_dir, project=project,
                                       name=registered_name or self._name)
        rep = builder.EmitReporter(emit)
        rec = builder.build_image(definition, context_dir=context_dir, project=project,
                                  name=registered_name or self._name, reporter=rep)
        rep.flush()
        emit(builder.registered_event(rec))
        return rec
