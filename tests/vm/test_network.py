"""Guests reach package indexes through QEMU user networking (B17 Dockerfile.fixed).
Costs about a minute under TCG: pip is slow there."""

import pytest

from localsbx import Sandbox, store

from .conftest import IMAGES, build

pytestmark = pytest.mark.vm


def test_pip_install_with_break_system_packages(base_ready):
    build(IMAGES / "net" / "Dockerfile", "t-net")
    try:
        with Sandbox.create("t-net") as sb:
            r = sb.run("python3", ["-c", "import six; print('six', six.__version__)"])
            assert r.exit_code == 0, r.stderr
            assert r.stdout.startswith("six 1.")
            assert sb.run("ls /usr/lib/python3*/EXTERNALLY-MANAGED").exit_code == 0
    finally:
        store.remove_image("t-net")
