"""``FROM`` resolution: which base a build starts from (the one place that decides).

Tensorlake's order: a localsbx image of that name, then a base, then a registry image.
Images as ``FROM`` are the Dockerfile branch's (``FROM <registered image>``) and slot in
before the base step here. A base is a recipe base or an imported one (``tensorlake/``
prefix allowed, as Tensorlake writes its bases); anything else that parses as a registry
reference is pulled (:mod:`localsbx.oci`: cached by digest, offline once pulled) and made
into a base, and its image config's ``Env`` and ``WorkingDir`` become the build's first
steps (``User`` too once the IR has a USER op), as Docker starts a build from the
image's config. ``Entrypoint``/``Cmd`` are kept in the base's ``base.json``
(``oci_config``): sandboxes run commands, not a main process.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from localsbx.definition import ops as _ops
from localsbx.definition.ops import Env, ImageDefinition, Op, Workdir

__all__ = ["ImageRoot", "resolve_from", "resolve_root", "with_image_config"]


def with_image_config(definition: ImageDefinition, config: Any) -> ImageDefinition:
    """``definition`` with the image config's ENV, WORKDIR (and USER) as leading ops."""
    head: list[Any] = [Env(k, v, text=f"{k}={v} (image config)") for k, v in config.env]
    if config.workdir and config.workdir != "/":  # "/" is where a build starts anyway
        head.append(Workdir(config.workdir, text=f"{config.workdir} (image config)"))
    user_op = getattr(_ops, "User", None)  # last: the WORKDIR is made as root, as BuildKit does
    if config.user and user_op is not None:  # pragma: no cover - with the USER instruction
        head.append(user_op(config.user))
    return dataclasses.replace(definition, ops=(*head, *definition.ops))


async def resolve_from(definition: ImageDefinition, *, say=None) -> tuple[Any, ImageDefinition]:
    """The :class:`~localsbx.base.BaseInfo` to build ``definition`` on, and the definition
    to build (with a registry image's config applied).

    :raises BaseImageError: not a base and not a pullable registry image (the message lists
        the known bases and what the registry said).
    """
    from localsbx.base import get_base, known_base_names
    from localsbx.oci import looks_like_ref, parse_ref, pull_base

    name = definition.base
    short = name.removeprefix("tensorlake/")
    known = known_base_names()
    if short in known or not looks_like_ref(name):
        return get_base(short if short in known else name), definition
    pulled = await asyncio.to_thread(pull_base, parse_ref(name), progress=say)
    return pulled.base, with_image_config(definition, pulled.config)


@dataclasses.dataclass(frozen=True)
class ImageRoot:
    """The root file system of an image other than the build VM's own, attached to the
    build VM read-only (a throwaway qcow2 overlay on ``disk``): what ``COPY --from=IMAGE``
    reads and what a stage ``FROM`` another image or base is built on.

    :param ref: the name as the Dockerfile wrote it.
    :param kind: ``image`` (a registered localsbx image), ``base`` or ``registry``.
    :param digest: the image's or base's digest (part of the build's cache keys).
    :param disk: its qcow2 (an image's ``build.qcow2``, a base's ``rootfs.qcow2``; never
        written: the VM writes to an overlay of it).
    :param env: ENV a stage FROM it starts with (an image's; ``None`` = Docker's default);
    :param workdir: its WORKDIR; :param user: its USER (``None`` = root).
    :param head: the ops a stage FROM it starts with (a registry image's config ENV and
        WORKDIR, as :func:`with_image_config`).
    """

    ref: str
    kind: str
    digest: str
    disk: Any
    env: dict[str, str] | None = None
    workdir: str = "/"
    user: str | None = None
    head: tuple[Op, ...] = ()


async def resolve_root(name: str, *, project: str | None = None, say=None) -> ImageRoot:
    """Resolve ``name`` as ``FROM`` does (Tensorlake's order: a registered localsbx image of
    the project, then a base, then a registry image, pulled unless cached).

    :raises BaseImageError: none of these (the message lists the known bases and what the
        registry said).
    """
    import contextlib

    from localsbx import store
    from localsbx.errors import ImageNotFound
    from localsbx.sandbox import _stale_base_image

    img = None
    with contextlib.suppress(ImageNotFound):
        img = store.lookup_image(name, project=project)
    if img is not None and not _stale_base_image(img):
        return ImageRoot(name, "image", img.digest, img.path / "build.qcow2",
                         env=dict(img.env), workdir=img.workdir, user=img.user)
    from localsbx.base import known_base_names

    kind = "base" if name.removeprefix("tensorlake/") in known_base_names() else "registry"
    base, defn = await resolve_from(ImageDefinition(name="root", base=name, ops=()), say=say)
    return ImageRoot(name, kind, base.digest, base.rootfs, head=tuple(defn.ops))
