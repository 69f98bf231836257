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
    store.write_json_atomic(tmp / "image.json", {"digest": digest, "env": {"A": "1"}, **meta})
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
    base = dict(id="abc", image="i", project="default", image_digest="d", pid=pid,
                pid_start=proc_start_time(pid), qemu_pid=pid, ssh_port=1, host_key="k", env={},
                workdir="/", user=None, cpus=1, memory_mb=1024, created_at=time.time(),
                timeout_secs=600, restored=True)
    base.update(kw)
    return store.SandboxRecord(**base)


def test_dead_sandbox_is_never_listed_and_is_cleaned_up():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    rec = _record(child.pid)
    store.write_sandbox(rec)
    assert [r.id for r in store.list_sandboxes()] == ["abc"]
    child.kill()
    child.wait()
    assert store.list_sandboxes() == []
    assert not rec.dir.exists()
    with pytest.raises(SandboxNotFound):
        store.read_sandbox("abc")


def test_sandbox_of_a_dead_owner_is_killed():
    owner = subprocess.Popen([sys.executable, "-c", "pass"])
    owner.wait()
    vm = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    store.write_sandbox(_record(vm.pid, owner_pid=owner.pid, owner_start=12345))
    assert store.list_sandboxes() == []
    assert vm.wait(timeout=10) == -9


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
