"""Shared fixtures. VM tests use the real store (where `make test` built the base image) and
a dedicated project, so they never touch a user's `default` project."""

import os

import pytest

TEST_PROJECT = "pytest-localsbx"


def pytest_configure(config):
    os.environ.setdefault("LOCALSBX_PROJECT", TEST_PROJECT)


@pytest.fixture(scope="session")
def base_ready():
    """The debian-minimal base must be built (`make test` does it); fail, don't skip."""
    from localsbx.base import get_base
    from localsbx.errors import BaseImageError

    if os.environ.get("LOCALSBX_SKIP_VM") == "1":
        pytest.skip("LOCALSBX_SKIP_VM=1: VM tests skipped on request")
    try:
        return get_base("debian-minimal")
    except BaseImageError as exc:
        pytest.fail(f"{exc} (run `make setup`)")
