"""Helpers for the plugin's tests: ``pytester`` (loaded here, since ``pytest_plugins`` is only
allowed in the top-level conftest), one small image built once per session, inner runs in
a dedicated localsbx project, and checks that a sandbox left nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from plugin_helpers import IMAGE, PROJECT

HERE = Path(__file__).parent
INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"


def pytest_configure(config):
    if not config.pluginmanager.has_plugin("pytester"):
        config.pluginmanager.import_plugin("pytester")


@pytest.fixture(scope="session")
def plugin_image() -> str:
    """``plugintest`` in the plugin test project: built on first use, reused while unchanged."""
    from localsbx.base import get_base
    from localsbx.build.builder import build_image
    from localsbx.definition.dockerfile import parse_dockerfile
    from localsbx.errors import BaseImageError

    if os.environ.get("LOCALSBX_SKIP_VM") == "1":
        pytest.skip("LOCALSBX_SKIP_VM=1: VM tests skipped on request")
    try:
        get_base("debian-minimal")
    except BaseImageError as exc:
        pytest.fail(f"{exc} (run `make setup`)")
    df = HERE / "images" / "small" / "Dockerfile"
    build_image(parse_dockerfile(df, name=IMAGE), context_dir=df.parent, name=IMAGE,
                project=PROJECT)
    return IMAGE


@pytest.fixture(scope="session")
def store_root() -> Path:
    """The real store, fixed before pytester points HOME (hence platformdirs) elsewhere."""
    from localsbx import paths

    return paths.data_dir()


@pytest.fixture
def inner(store_root, plugin_image, pytester, monkeypatch):
    """A pytester folder set up for inner runs on real QEMU (store, project, ini)."""
    monkeypatch.setenv("LOCALSBX_HOME", str(store_root))
    monkeypatch.setenv("LOCALSBX_PROJECT", PROJECT)
    pytester.makeini(INI)
    return pytester
