"""The guest agent gives a new clone its machine-id and hostname itself (no shell, no extra
round trip): the real agent, compiled here, run in its own mount and UTS namespace."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from localsbx.guest.ssh import GuestConnection, agent_sets_identity

AGENT_C = Path(__file__).resolve().parents[2] / "localsbx" / "guest" / "agent.c"
MID = "0123456789abcdef0123456789abcdef"

pytestmark = pytest.mark.skipif(
    not shutil.which("gcc") or not shutil.which("unshare"),
    reason="needs gcc (make apt installs it) and util-linux unshare")


@pytest.fixture(scope="module")
def agent(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("agent") / "agent"
    subprocess.run(["gcc", "-static", "-Os", "-s", "-Wall", "-o", str(out), str(AGENT_C)],
                   check=True)
    return out


def in_namespace(agent: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``agent ARGS`` with a private /run and hostname, then print what it left."""
    script = ('mount -t tmpfs none /run && mkdir /run/localsbx && '
              'echo old > /run/localsbx/hostname && "$@"; rc=$?; '
              'for f in machine-id hostname hosts; do echo "== $f"; '
              'cat /run/localsbx/$f 2>/dev/null; done; echo "== uname"; hostname; exit $rc')
    return subprocess.run(["unshare", "--mount", "--uts", "--propagation", "private",
                           "sh", "-c", script, "sh", str(agent), *args],
                          capture_output=True, text=True, timeout=30)


def test_fixup_writes_the_identity_files_in_place_and_sets_the_hostname(agent):
    res = in_namespace(agent, "fixup", "--machine-id", MID, "--hostname", "sbx-1")
    assert res.returncode == 0, res.stderr
    assert res.stdout == (
        f"== machine-id\n{MID}\n== hostname\nsbx-1\n== hosts\n127.0.0.1\tlocalhost\n"
        "127.0.1.1\tsbx-1\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\n"
        "ff02::2\tip6-allrouters\n== uname\nsbx-1\n")


def test_exec_sets_the_identity_before_the_command_runs(agent):
    res = in_namespace(agent, "exec", "--fixup-machine-id", MID, "--fixup-hostname", "c2",
                       "--", "sh", "-c", "echo ran as $(hostname) $(cat /run/localsbx/machine-id)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"ran as c2 {MID}\n")


@pytest.mark.parametrize("args", [
    ["--machine-id", "XYZ", "--hostname", "a"],          # not 32 hex digits
    ["--machine-id", MID.upper(), "--hostname", "a"],    # upper case
    ["--machine-id", MID, "--hostname", "-a"],           # not a DNS label
    ["--machine-id", MID, "--hostname", "a.b"],
    ["--machine-id", MID],                               # one without the other
])
def test_a_malformed_identity_is_a_usage_error_that_changes_nothing(agent, args):
    res = in_namespace(agent, "fixup", *args)
    assert res.returncode == 2
    assert "usage: fixup" in res.stderr
    assert res.stdout.startswith("== machine-id\n== hostname\nold\n== hosts\n== uname\n")


def test_the_host_tells_a_new_agent_from_an_old_one_by_its_bytes(agent, tmp_path):
    cpio = tmp_path / "initrd.cpio"
    cpio.write_bytes(b"070701" + b"\0" * 100 + agent.read_bytes() + b"TRAILER!!!")
    assert agent_sets_identity(cpio)
    old = AGENT_C.read_text().replace('"--fixup-machine-id"', '"--fixup-other"')
    (tmp_path / "old.c").write_text(old)
    subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(tmp_path / "old"),
                    str(tmp_path / "old.c")], check=True)
    assert not agent_sets_identity(tmp_path / "old")
    assert not agent_sets_identity(tmp_path / "missing.cpio")


def test_the_pending_identity_rides_once_on_the_first_command():
    g = GuestConnection.__new__(GuestConnection)
    g.fixup_pending, g.identity_pending = False, None
    with pytest.raises(ValueError, match="32 lowercase hex"):
        g.set_identity("abc", "x")
    with pytest.raises(ValueError, match="DNS label"):
        g.set_identity(MID, "a_b")
    g.set_identity(MID, "sbx")
    assert g.fixup_pending
    assert g._identity_opts("--fixup-") == ["--fixup-machine-id", MID, "--fixup-hostname", "sbx"]
    assert g._identity_opts("--fixup-") == []
