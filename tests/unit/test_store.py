"""The project store: atomic registration, clear errors, reaping of dead sandboxes."""

import json
import os
import subprocess
import sys
import time

import pytest

from localsbx import store
from localsbx.errors import ConfigError, ImageNotFound, SandboxNotFound
from localsbx.vm.qemu import proc_start_time


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALSBX_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LOCALSBX_PROJECT", raising=False)
    return tmp_path / "home"


def _fake_image(digest="d" * 32, **meta):
    tmp = store.new_image_tmpdir()
    snap = store.SnapshotMeta(key={}, host_key="ssh-ed25519 AAAA", cpus=1, memory_mib=1024,
                              state_size=1, ram_size=1, format=3)
    full = store.ImageMeta(name="x", digest=digest, base="debian-minimal", base_digest="b",
                           env={"A": "1"}, workdir="/", snapshot=snap).to_json()
    store.write_json_atomic(tmp / "image.json", {**full, **meta})
    return store.commit_image_dir(tmp, digest)


def test_register_lookup_and_projects(monkeypatch):
    _fake_image()
    rec = store.register_image("default", "web", "d" * 32)
    assert rec.env == {"A": "1"} and rec.project == "default"
    assert store.lookup_image("web").digest == "d" * 32
    with pytest.raises(ImageNotFound) as e:
        store.lookup_image("web", project="other")
    assert "other" in str(e.value) and "localsbx image build" in str(e.value)
    monkeypatch.setenv("LOCALSBX_PROJECT", "other")
    assert store.current_project() == "other"
    with pytest.raises(ImageNotFound):
        store.lookup_image("web")


def test_registration_needs_a_complete_image_folder():
    with pytest.raises(ImageNotFound):
        store.register_image("default", "x", "e" * 32)
    assert store.list_images() == []


def test_tmp_build_folders_of_dead_builders_are_reaped(home):
    tmp = store.new_image_tmpdir()
    (tmp / "owner").write_text("999999999")
    store.reap()
    assert not tmp.exists()


def test_bad_names_are_refused():
    for bad in ("", "../x", "a b", "-x"):
        with pytest.raises(ConfigError):
            store.check_name("image", bad)


def test_remove_image_deletes_unused_files():
    path = _fake_image()
    store.register_image("default", "a", "d" * 32)
    store.register_image("default", "b", "d" * 32)
    store.remove_image("a")
    assert path.exists()  # still used by b
    store.remove_image("b")
    assert not path.exists()
    with pytest.raises(ImageNotFound):
        store.remove_image("b")


def _record(pid, **kw):
    base = dict(id="abcabcabcabc", image="i", project="default", image_digest="d",
                state=store.SandboxState.RUNNING, qemu_pid=pid, qemu_start=proc_start_time(pid),
                ssh_port=1, host_key="k", created_at=time.time(), timeout_secs=600,
                running_since=time.time(), restored=True)
    base.update(kw)
    rec = store.SandboxRecord(**base)
    rec.dir.mkdir(parents=True, exist_ok=True)
    return rec


def test_dead_sandbox_is_never_listed_and_is_cleaned_up():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    rec = _record(child.pid)
    store.write_sandbox(rec)
    assert [r.id for r in store.list_sandboxes()] == ["abcabcabcabc"]
    child.kill()
    child.wait()
    assert store.list_sandboxes() == []
    assert not rec.dir.exists()
    with pytest.raises(SandboxNotFound):
        store.read_sandbox("abcabcabcabc")


def test_sandbox_of_a_dead_owner_is_killed():
    owner = subprocess.Popen([sys.executable, "-c", "pass"])
    owner.wait()
    vm = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    store.write_sandbox(_record(vm.pid, owner_pid=owner.pid, owner_start=12345))
    assert store.list_sandboxes() == []
    assert vm.wait(timeout=10) in (-9, -15)  # SIGTERM first (store.stop_pid)


def test_json_writes_are_atomic(home):
    p = home / "x.json"
    store.write_json_atomic(p, {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1}
    assert [f for f in os.listdir(home) if f.endswith(".tmp")] == []


def test_unregistered_image_goes_with_its_last_sandbox():
    path = _fake_image()
    store.register_image("default", "a", "d" * 32)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    rec = _record(child.pid, image_digest="d" * 32)
    store.write_sandbox(rec)
    store.remove_image("a")
    assert path.exists()  # a sandbox still uses it
    child.kill()
    child.wait()
    store.cleanup_sandbox(rec)
    assert not path.exists()


#: A record as localsbx 0.1 (schema 1, before the supervisor) wrote it.
V1_RECORD = {
    "id": "abcdefghijkl", "image": "web", "project": "default", "image_digest": "d" * 32,
    "pid": 0, "pid_start": None, "qemu_pid": 0, "ssh_port": 40022,
    "host_key": "ssh-ed25519 AAAA", "env": {"A": "1"}, "workdir": "/app", "user": None,
    "cpus": 1, "memory_mb": 1024, "created_at": 1000.0, "timeout_secs": 600,
    "restored": True, "owner_pid": None, "owner_start": None, "name": "old",
}


def test_a_schema_1_record_is_read_without_loss_while_its_qemu_runs():
    vm = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        d = store.sandbox_dir(V1_RECORD["id"])
        d.mkdir(parents=True)
        old = {**V1_RECORD, "pid": vm.pid, "pid_start": proc_start_time(vm.pid),
               "qemu_pid": vm.pid, "future_field": [1, 2]}
        store.write_json_atomic(d / "sandbox.json", old)
        [rec] = store.list_sandboxes()
        assert rec.state is store.SandboxState.RUNNING
        assert (rec.qemu_pid, rec.qemu_start) == (vm.pid, proc_start_time(vm.pid))
        assert (rec.ssh_port, rec.env, rec.workdir, rec.name) == (40022, {"A": "1"}, "/app", "old")
        assert rec.source == "legacy" and rec.schema == store.SANDBOX_SCHEMA
        assert rec.extra["future_field"] == [1, 2]
        assert store.read_sandbox("old").id == V1_RECORD["id"]  # by name too
        # written back with the unknown key kept and the folder untouched
        store.update_sandbox(rec.id, name="renamed")
        again = store.read_json(d / "sandbox.json")
        assert again["future_field"] == [1, 2] and again["name"] == "renamed"
        assert vm.poll() is None
    finally:
        vm.kill()
        vm.wait()


def test_an_unreadable_record_is_kept_while_its_qemu_runs():
    vm = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        d = store.sandbox_dir("zzzzzzzzzzzz")
        d.mkdir(parents=True)
        (d / "sandbox.json").write_text("{not json")
        (d / "qemu.pid").write_text(f"{vm.pid} {proc_start_time(vm.pid)}")
        os.utime(d / "sandbox.json", (0, 0))  # old: not a write in progress
        assert store.list_sandboxes() == []
        assert d.exists() and vm.poll() is None
        vm.kill()
        vm.wait()
        store.list_sandboxes()
        assert not d.exists()
    finally:
        vm.kill()


def test_timeout_counts_running_time_only():
    rec = store.SandboxRecord(id="t", image="i", project="p", image_digest="d",
                              timeout_secs=100, used_secs=30.0, running_since=None,
                              state=store.SandboxState.SUSPENDED)
    assert rec.remaining_secs(now=10_000) == 70.0  # suspended: the clock stands still
    assert rec.deadline is None
    rec.running_since = 1000.0
    assert rec.remaining_secs(now=1010.0) == 60.0
    rec.timeout_secs = 0
    assert rec.remaining_secs() is None


def test_update_keeps_what_other_processes_wrote():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store.write_sandbox(_record(child.pid))
        store.update_sandbox("abcabcabcabc", owner_pid=123)
        store.update_sandbox("abcabcabcabc", ports={"80": 4000})
        rec = store.load_sandbox("abcabcabcabc")
        assert rec.owner_pid == 123 and rec.ports == {"80": 4000}
        with pytest.raises(AttributeError):
            store.update_sandbox("abcabcabcabc", no_such_field=1)
    finally:
        child.kill()
        child.wait()


def test_suspended_sandbox_is_listed_without_a_qemu():
    rec = store.SandboxRecord(id="sssssssssssss"[:12], image="i", project="default",
                              image_digest="d", state=store.SandboxState.SUSPENDED,
                              created_at=time.time())
    rec.dir.mkdir(parents=True)
    store.write_sandbox(rec)
    assert [r.id for r in store.list_sandboxes()] == [rec.id]
    assert store.read_sandbox(rec.id).state is store.SandboxState.SUSPENDED


def test_image_metadata_round_trips_and_keeps_unknown_keys():
    _fake_image(future={"x": 1})
    store.register_image("default", "a", "d" * 32)
    img = store.lookup_image("a")
    assert img.meta.snapshot.memory_mib == 1024 and img.env == {"A": "1"}
    assert img.meta.to_json()["future"] == {"x": 1}
    with pytest.raises(ValueError, match="incomplete image record"):
        store.ImageMeta.from_json({"digest": "d"})


def test_a_planted_record_never_names_a_path(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    d = store.sandbox_dir("plantedplant")
    d.mkdir(parents=True)
    store.write_json_atomic(d / "sandbox.json", {**V1_RECORD, "id": "../../../precious"})
    with pytest.raises(SandboxNotFound):
        store.read_sandbox("../../x")
    with pytest.raises(SandboxNotFound):
        store.load_sandbox("plantedplant")
    store.list_sandboxes()
    store.reap()
    assert outside.exists()
