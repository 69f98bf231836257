"""``localsbx serve``: Tensorlake's HTTP API on localhost (see :mod:`localsbx.serve.app`)."""

from localsbx.serve.app import DEFAULT_PORT, create_app, serve

__all__ = ["DEFAULT_PORT", "create_app", "serve"]
