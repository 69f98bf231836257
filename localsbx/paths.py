"""Where localsbx keeps things on the host.

``data_dir()`` is ``$LOCALSBX_HOME`` when set, else ``platformdirs.user_data_dir("localsbx")``
(``~/.local/share/localsbx`` on Linux). Read lazily, never at import, so tests can point a
whole run at a temporary store with one environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def data_dir() -> Path:
    """The store root (created on first use), private to its owner (0700): it holds guest
    disks and memory, SSH keys and build arguments, so no other local user may enter it,
    whatever the modes of the files inside."""
    env = os.environ.get("LOCALSBX_HOME")
    root = Path(env).expanduser() if env else Path(platformdirs.user_data_dir("localsbx"))
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        st = root.stat()
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            os.chmod(root, 0o700)
    except OSError:
        pass
    return root.resolve()


def bases_dir() -> Path:
    """``<data>/bases``: one folder per built base image."""
    return data_dir() / "bases"


def images_dir() -> Path:
    """``<data>/images``: one folder per built image (by digest)."""
    return data_dir() / "images"


def projects_dir() -> Path:
    """``<data>/projects``: one folder per project, holding its name → image table."""
    return data_dir() / "projects"


def sandboxes_dir() -> Path:
    """``<data>/sandboxes``: one folder per live sandbox."""
    return data_dir() / "sandboxes"


def keys_dir() -> Path:
    """``<data>/keys``: the store's management SSH key."""
    return data_dir() / "keys"
