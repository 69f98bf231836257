"""Issue 6, egress lists (``allow_out``/``deny_out``) around the VM: records (old ones read
fine), the library and CLI refusing bad entries before anything starts, serve's request and
answer. Enforcement itself is in test_net.py (filtered passt, no VM) and
tests/vm/test_network.py (real guests)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from localsbx import paths, store
from localsbx.errors import ConfigError

CLI = str(Path(sys.executable).parent / "localsbx")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALSBX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LOCALSBX_PROJECT", raising=False)
    return tmp_path / "home"


def _record(**kw) -> dict:
    return {"id": "abcdefabcdef", "image": "i", "project": "default", "image_digest": "d",
            "state": "suspended", "schema": store.SANDBOX_SCHEMA, **kw}


def test_a_record_without_egress_fields_reads_as_unfiltered():
    rec = store.SandboxRecord.from_json(_record(internet=False))
    assert (rec.allow_out, rec.deny_out, rec.allow_nets, rec.deny_nets) == ([], [], [], [])
    assert not rec.extra


def test_egress_fields_round_trip():
    rec = store.SandboxRecord.from_json(_record(allow_out=["pypi.org:443"],
                                                allow_nets=["203.0.113.80/32"],
                                                deny_out=["10.0.0.0/8"], deny_nets=["10.0.0.0/8"]))
    again = store.SandboxRecord.from_json(rec.to_json())
    assert again == rec and again.allow_out == ["pypi.org:443"]
    assert rec.to_json()["deny_nets"] == ["10.0.0.0/8"]


def _no_sandbox_made():
    d = paths.sandboxes_dir()
    return not d.exists() or not [p for p in d.iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("kw,says", [
    ({"allow_out": ["a..b"]}, "allow_out entry 'a..b'"),
    ({"deny_out": ["10.0.0.1/8"]}, "deny_out entry '10.0.0.1/8'"),
    ({"deny_out": ["no-such-host.invalid"]}, "does not resolve"),
    ({"allow_out": "pypi.org"}, "expected a list"),
])
def test_create_refuses_bad_entries_before_anything(kw, says):
    from localsbx import Sandbox

    with pytest.raises(ConfigError, match=says):
        Sandbox.create("no-such-image", **kw)  # the entry fails first, not the image
    assert _no_sandbox_made()


def test_cli_new_refuses_bad_entries(tmp_path):
    env = {**os.environ, "LOCALSBX_HOME": str(tmp_path / "store"), "LOCALSBX_PROJECT": "t"}
    res = subprocess.run([CLI, "new", "--allow-out", "10.0.0.0/8", "--deny-out", "https://x.org/"],
                         capture_output=True, text=True, env=env, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert res.returncode != 0 and "deny_out entry 'https://x.org/'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert "--allow-out" in subprocess.run([CLI, "new", "--help"], capture_output=True,
                                           text=True, env=env, timeout=60).stdout


def test_serve_passes_the_lists_and_reports_them():
    from localsbx.serve import lifecycle, wire

    req = wire.CreateSandbox(image="img", network={"allow_internet_access": False,
                                                   "allow_out": ["8.8.8.8"],
                                                   "deny_out": ["pypi.org"]})
    kw = lifecycle._create_kwargs("ns", req)
    assert (kw["allow_internet_access"], kw["allow_out"], kw["deny_out"]) == (
        False, ("8.8.8.8",), ("pypi.org",))
    lifecycle._check_supported(req)  # no longer refused
    assert lifecycle._create_kwargs("ns", wire.CreateSandbox(image="img"))["allow_out"] == ()
    rec = store.SandboxRecord.from_json(_record(internet=False, allow_out=["8.8.8.8"],
                                                deny_out=["pypi.org"]))
    info = wire.sandbox_info(rec, namespace="ns", sandbox_url=None)
    assert info["network_policy"] == {"allow_internet_access": False, "allow_out": ["8.8.8.8"],
                                      "deny_out": ["pypi.org"]}
