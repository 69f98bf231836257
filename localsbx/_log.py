"""The ``LOCALSBX_LOG`` setting, read the same way by the CLI and the supervisors."""

from __future__ import annotations

import logging
import os

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def env_level(default: str | None = None) -> str | None:
    """The log level ``LOCALSBX_LOG`` asks for: a level name (``debug``, ``INFO``...) as
    given; any other non-empty value (``1``, ``yes``) means ``DEBUG``; unset or empty gives
    ``default``. Never raises, so a typo cannot stop a supervisor from starting."""
    raw = os.environ.get("LOCALSBX_LOG", "").strip()
    if not raw:
        return default
    if raw.upper() in _LEVELS:
        return raw.upper()
    if raw.isdigit() and int(raw) in (logging.DEBUG, logging.INFO, logging.WARNING,
                                      logging.ERROR, logging.CRITICAL):
        return logging.getLevelName(int(raw))
    return "DEBUG"
