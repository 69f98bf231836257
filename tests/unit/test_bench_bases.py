"""bench.bases without a VM: which bases are measured, which are listed as skipped and why
(no timing is asserted anywhere: the benchmark only prints figures)."""

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: bench/

import bench.bases as bb


def _info(name, built, state="built"):
    return SimpleNamespace(name=name, built=built, state=state if built else "not built",
                           outdated=False, timings={})


def test_unbuilt_and_registry_bases_are_skipped_with_a_reason(monkeypatch, capsys):
    infos = [_info("debian-minimal", True), _info("ubuntu-vnc", False),
             _info("oci-0123456789ab", True)]
    monkeypatch.setattr("localsbx.base.list_bases", lambda: infos)
    measured = []
    monkeypatch.setattr(bb, "bench_base", lambda info, runs: measured.append((info.name, runs))
                        or {"cold_boot_s": [1.0]})
    res = bb.run(2, pull=False)
    assert measured == [("debian-minimal", 2)]
    assert set(res["bases"]) == {"debian-minimal"}
    assert res["skipped"]["ubuntu-vnc"] == "not built: `localsbx base build ubuntu-vnc`"
    assert "registry image" in res["skipped"]["oci-0123456789ab"]
    out = capsys.readouterr().out
    assert "ubuntu-vnc: skipped (not built: `localsbx base build ubuntu-vnc`)" in out
    assert "pull" not in res


def test_a_failing_base_is_reported_and_the_others_still_run(monkeypatch):
    infos = [_info("a", True), _info("b", True)]
    monkeypatch.setattr("localsbx.base.list_bases", lambda: infos)

    def fake(info, runs):
        if info.name == "a":
            raise RuntimeError("boom")
        return {}

    monkeypatch.setattr(bb, "bench_base", fake)
    res = bb.run(1, pull=False)
    assert res["skipped"]["a"] == "failed: RuntimeError: boom"
    assert "b" in res["bases"]


def test_pull_is_skipped_without_debian_minimal(monkeypatch):
    monkeypatch.setattr("localsbx.base.list_bases", lambda: [_info("debian-minimal", False)])
    res = bb.bench_pull()
    assert "skipped" in res
