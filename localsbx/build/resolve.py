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
from localsbx.definition.ops import Env, ImageDefinition, Workdir

__all__ = ["resolve_from", "with_image_config"]


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
