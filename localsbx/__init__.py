"""localsbx: local, offline emulator and test harness for Tensorlake-style sandbox images.

Public API (names follow Tensorlake's SDK)::

    from localsbx import Image, Sandbox

    Image(name="web", base_image="debian-minimal").run("echo hi > /hi").build(context_dir=".")
    with Sandbox.create(image="web") as sb:
        print(sb.run("cat /hi").stdout)
"""

from __future__ import annotations

import logging
import warnings as _warnings
from importlib import metadata as _metadata

from localsbx.errors import (
    CommandTimeout,
    DefinitionError,
    GuestError,
    ImageBuildError,
    ImageNotFound,
    LocalsbxError,
    SandboxNotFound,
    SnapshotError,
    VMLaunchError,
)

try:
    __version__ = _metadata.version("localsbx")
except _metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0.0.0"

logging.getLogger("localsbx").addHandler(logging.NullHandler())
# asyncssh (2.24) touches cryptography's DSA classes at import, and recent cryptography warns
# about them ten times on every CLI call; localsbx never uses DSA keys (ed25519 only). Only
# that warning, only from asyncssh's modules, is silenced.
_warnings.filterwarnings("ignore", message="DSA is deprecated", module=r"asyncssh(\.|$)")

__all__ = [
    "Image",
    "Sandbox",
    "AsyncSandbox",
    "CommandResult",
    "LocalsbxError",
    "DefinitionError",
    "ImageBuildError",
    "ImageNotFound",
    "SandboxNotFound",
    "SnapshotError",
    "VMLaunchError",
    "GuestError",
    "CommandTimeout",
]


def __getattr__(name: str):
    # Lazy, so `import localsbx` stays cheap for the CLI and the pytest plugin.
    if name == "Image":
        from localsbx.definition.dsl import Image

        return Image
    if name in ("Sandbox", "AsyncSandbox", "CommandResult"):
        from localsbx import sandbox

        return getattr(sandbox, name)
    raise AttributeError(f"module 'localsbx' has no attribute {name!r}")
