"""Sizes, timeouts and environments are checked before anything starts, with errors that say
the range (localsbx.sandbox.check_resources, _check_env)."""

import pytest

from localsbx.errors import ConfigError
from localsbx.sandbox import (
    DEFAULT_TIMEOUT_SECS,
    MAX_CPUS,
    MAX_TIMEOUT_SECS,
    _check_env,
    check_resources,
)


@pytest.mark.parametrize("kw,words", [
    ({"cpus": 0}, "give 1 to 64 vCPUs"),
    ({"cpus": 10**9}, "give 1 to 64 vCPUs"),
    ({"memory_mb": 64}, "at least 128 MiB"),
    ({"memory_mb": 10**9}, "at most the host's"),
    ({"disk_mb": 0}, "give a size in MiB"),
    ({"timeout_secs": -1}, r"0 \(never\) or positive"),
    ({"timeout_secs": 10**18}, "at most 2147483647 s"),
    ({"timeout_secs": "soon"}, "expected whole seconds"),
])
def test_out_of_range_sizes_are_refused(kw, words):
    with pytest.raises(ConfigError, match=words):
        check_resources(**kw)


def test_in_range_sizes_pass_and_give_the_timeout():
    assert check_resources() == DEFAULT_TIMEOUT_SECS
    assert check_resources(cpus=MAX_CPUS, memory_mb=128, disk_mb=1024,
                           timeout_secs=MAX_TIMEOUT_SECS) == MAX_TIMEOUT_SECS
    assert check_resources(timeout_secs=0) == 0


@pytest.mark.parametrize("env", [{"": "x"}, {"A=B": "x"}, {"A\0": "x"}, {"A": "x\0y"}])
def test_bad_environment_names_and_values_are_refused(env):
    with pytest.raises(ConfigError, match="environment variable"):
        _check_env(env)


def test_environment_is_passed_as_strings():
    assert _check_env({"A": 1, "B_2": "x y"}) == {"A": "1", "B_2": "x y"}
    assert _check_env(None) == {}


@pytest.mark.parametrize("value,level", [
    ("", None), ("debug", "DEBUG"), ("INFO", "INFO"), ("1", "DEBUG"), ("yes", "DEBUG"),
    ("30", "WARNING"),
])
def test_localsbx_log_values_never_break_start_up(monkeypatch, value, level):
    from localsbx._log import env_level

    monkeypatch.setenv("LOCALSBX_LOG", value)
    assert env_level() == level


def test_an_outdated_base_is_still_the_default_image(monkeypatch):
    """A base built from an earlier recipe (state ``outdated``) still boots, so it stays the
    default image (found by CI: the TypeScript template build asked for one after an
    upgrade changed the recipe digest)."""
    from types import SimpleNamespace

    import localsbx.base
    from localsbx.errors import BaseImageError
    from localsbx.sandbox import default_image

    bases = [SimpleNamespace(name="debian-minimal", built=True, state="outdated"),
             SimpleNamespace(name="ubuntu-minimal", built=False, state="not built")]
    monkeypatch.setattr(localsbx.base, "list_bases", lambda: bases)
    assert default_image() == "debian-minimal"
    bases[0].built = False
    with pytest.raises(BaseImageError, match="no base image is built"):
        default_image()


@pytest.mark.parametrize("port,words", [
    (0, "must be 1-65535"), (99999, "must be 1-65535"), (-1, "must be 1-65535"),
    ("http", "not a number"), (10022, "management SSH port cannot be exposed"),
])
def test_a_port_that_cannot_be_exposed_is_refused(port, words):
    from localsbx.vm.net import check_guest_port

    with pytest.raises(ConfigError, match=words):
        check_guest_port(port)
    assert check_guest_port("8000") == check_guest_port(8000) == 8000


def test_create_refuses_a_bad_exposed_port_before_anything_starts(monkeypatch, tmp_path):
    """``new --expose 99999`` was accepted and its forward vanished later."""
    from localsbx import Sandbox, supervisor

    monkeypatch.setenv("LOCALSBX_HOME", str(tmp_path))

    def no_launch(*a, **kw):
        raise AssertionError("nothing may start")

    monkeypatch.setattr(supervisor.Launch, "start", no_launch)
    for bad in (99999, 10022):
        with pytest.raises(ConfigError, match=str(bad)):
            Sandbox.create("debian-minimal", exposed_ports=[8000, bad])
    assert not (tmp_path / "sandboxes").exists() or not any((tmp_path / "sandboxes").iterdir())
