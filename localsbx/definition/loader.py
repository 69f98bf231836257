"""Loading an image definition from a file (a Dockerfile or a Python file with an ``Image``),
the one loader behind ``localsbx image build``, the pytest plugin and the benchmarks."""

from __future__ import annotations

import contextlib
import runpy
from pathlib import Path

from localsbx.definition.ops import ImageDefinition
from localsbx.errors import DefinitionError, SourceLocation


def load_definition(path: Path, *, name: str | None = None,
                    build_args: dict[str, str] | None = None,
                    target: str | None = None) -> ImageDefinition:
    """Read an image definition file: a ``.py`` file defining exactly one ``Image`` (or
    several, one of them named ``name``), or a Dockerfile (registered as ``name``, default
    :func:`default_name`). What ``localsbx image build PATH`` and the pytest plugin read.

    :raises DefinitionError: the file does not run, defines no or several images, or the
        Dockerfile is wrong (file and line in the error).
    """
    path = Path(path)
    if path.suffix == ".py":
        from localsbx.definition.dsl import Image

        try:
            ns = runpy.run_path(str(path))
        except SyntaxError as exc:
            raise DefinitionError(f"{exc.msg}", location=SourceLocation(str(path), exc.lineno),
                                  hint="fix the Python syntax error") from None
        except Exception as exc:  # noqa: BLE001 - any error in the file is the definition's
            import traceback

            tb = traceback.extract_tb(exc.__traceback__)
            line = next((f.lineno for f in reversed(tb) if f.filename == str(path)), None)
            raise DefinitionError(f"running it raised {type(exc).__name__}: {exc}",
                                  location=SourceLocation(str(path), line),
                                  hint="the file must define an Image without errors") from None
        images = [v for v in ns.values() if isinstance(v, Image)]
        if name:
            match = [i for i in images if i.name == name]
            images = match or images
        if len(images) != 1:
            found = ", ".join(i.name for i in images) or "none"
            raise DefinitionError(f"{path}: expected exactly one Image (found: {found})",
                                  hint="define one Image, or pass -n NAME to pick one")
        return images[0].to_definition(build_args=build_args or None)
    from localsbx.base import known_base_names
    from localsbx.definition.dockerfile import parse_dockerfile

    default = name or default_name(path)
    from localsbx import store

    # FROM may name a registered image of the project (looked up first) or a base
    known = set(known_base_names())
    with contextlib.suppress(Exception):
        known |= {i.name for i in store.list_images()}
    return parse_dockerfile(path, name=default, build_args=build_args or None,
                            known_bases=known, target=target)


def default_name(path: Path) -> str:
    """The image name for a Dockerfile given no ``-n``: its folder's name for
    ``Dockerfile``, else the file's stem, made a valid name."""
    stem = path.parent.resolve().name if path.name.lower() == "dockerfile" else path.stem
    clean = "".join(c if c.isalnum() or c in "_.-" else "-" for c in stem.lower()).strip("-.")
    return clean or "default"
