"""Issue 10, store damage and modes (no VM): a private store, clear errors naming the
damaged file, snapshot files checked by size and sampled digest before they are used."""

from __future__ import annotations

import json
import os
import stat

import pytest

from localsbx import paths, store
from localsbx.build.builder import Reporter, _intact, _redacted
from localsbx.errors import ConfigError, ImageNotFound, SnapshotError
from localsbx.vm import snapshot


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALSBX_HOME", str(tmp_path / "store"))
    monkeypatch.setenv("LOCALSBX_PROJECT", "p")
    return tmp_path / "store"


def fake_image(digest: str = "d" * 32, ram: bytes = b"\0" * (8 << 20)) -> store.ImageMeta:
    d = store.image_dir(digest)
    (d / "snap").mkdir(parents=True)
    (d / "build.qcow2").write_bytes(b"q")
    (d / "snap" / "disk.qcow2").write_bytes(b"q")
    (d / "snap" / "initrd.cpio").write_bytes(b"i")
    (d / "snap" / "state.mig").write_bytes(b"QEVM" + os.urandom(2000))
    (d / "snap" / "ram").write_bytes(ram)
    meta = store.ImageMeta(
        name="img", digest=digest, base="b", base_digest="x", env={}, workdir="/",
        snapshot=store.SnapshotMeta(
            key={}, host_key="", cpus=1, memory_mib=1024,
            state_size=(d / "snap" / "state.mig").stat().st_size, ram_size=len(ram), format=3,
            state_digest=snapshot.file_digest(d / "snap" / "state.mig"),
            ram_digest=snapshot.file_digest(d / "snap" / "ram")))
    store.write_json_atomic(d / "image.json", meta.to_json())
    return meta


def test_store_is_private(home):
    root = paths.data_dir()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    os.chmod(root, 0o755)  # an old store is made private again
    assert stat.S_IMODE(paths.data_dir().stat().st_mode) == 0o700
    store.write_json_atomic(root / "x" / "m.json", {"a": 1})
    assert stat.S_IMODE((root / "x" / "m.json").stat().st_mode) == 0o600
    with store.locked(root / "x" / ".lock"):
        pass
    assert stat.S_IMODE((root / "x" / ".lock").stat().st_mode) == 0o600
    assert stat.S_IMODE(store.new_image_tmpdir().stat().st_mode) == 0o700


def test_snapshot_garbage_is_named_before_restore():
    meta = fake_image()
    d = store.image_dir(meta.digest)
    snapshot.check_image_snapshot(d, meta.snapshot, "img")  # intact
    state = d / "snap" / "state.mig"
    state.write_bytes(os.urandom(state.stat().st_size))  # same size, garbage
    with pytest.raises(SnapshotError, match="state.mig is damaged") as ei:
        snapshot.check_image_snapshot(d, meta.snapshot, "img")
    assert "--force" in ei.value.hint


def test_ram_file_garbage_or_loss_is_named():
    meta = fake_image()
    ram = store.image_dir(meta.digest) / "snap" / "ram"
    with open(ram, "r+b") as f:  # garbage over a stretch of guest memory
        f.seek(3 << 20)
        f.write(os.urandom(1 << 20))
    with pytest.raises(SnapshotError, match="snap/ram is damaged"):
        snapshot.check_image_snapshot(ram.parent.parent, meta.snapshot, "img")
    ram.unlink()
    with pytest.raises(SnapshotError, match="ram is missing"):
        snapshot.check_image_snapshot(ram.parent.parent, meta.snapshot, "img")
    # and a rebuild does not reuse that build
    said = []
    rep = Reporter()
    rep.say = said.append
    assert not _intact(ram.parent.parent, meta, "img", rep)
    assert "building again" in said[-1]


def test_sampled_digest_reads_little_of_a_big_file(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse 1 GiB, like a RAM file
    a = snapshot.file_digest(big)
    assert a.startswith("s256x16k:1073741824:")
    with open(big, "r+b") as f:
        f.seek((1 << 30) - 100)
        f.write(b"x")
    assert snapshot.file_digest(big) != a  # the last block is always sampled


def test_broken_image_metadata_is_reported_not_hidden():
    meta = fake_image()
    store.register_image("p", "img", meta.digest)
    (store.image_dir(meta.digest) / "image.json").write_text("{not json")
    with pytest.raises(ImageNotFound, match="image.json is damaged"):
        store.lookup_image("img")
    assert store.list_images() == []
    [(name, why)] = store.broken_images()
    assert name == "img" and "damaged" in why


def test_broken_project_table_is_a_clear_error():
    meta = fake_image()
    store.register_image("p", "img", meta.digest)
    table = paths.projects_dir() / "p" / "images.json"
    for junk in ("{oops", "[1, 2]", json.dumps({"images": {"img": 3}})):
        table.write_text(junk)
        with pytest.raises(ConfigError, match="image table .*images.json is damaged"):
            store.list_images()


def test_broken_management_key_is_a_clear_error():
    store.management_key()
    (paths.keys_dir() / "id_ed25519").write_text("garbage\n")
    with pytest.raises(ConfigError, match="management SSH key .* is damaged") as ei:
        store.management_key()
    assert "rebuild" in ei.value.hint


def test_old_image_records_without_digests_still_load():
    meta = fake_image()
    data = meta.to_json()
    del data["snapshot"]["state_digest"], data["snapshot"]["ram_digest"]
    old = store.ImageMeta.from_json(data)
    assert old.snapshot.ram_digest == ""
    snapshot.check_image_snapshot(store.image_dir(meta.digest), old.snapshot, "img")


def test_build_arg_values_are_not_kept_in_clear():
    defn = {"base": "b", "ops": [{"op": "run", "argv": ["sh"], "build_env": [["TOKEN", "s3cr3t"]]},
                                 {"op": "env", "key": "A", "value": "1"}]}
    out = json.dumps(_redacted(defn))
    assert "s3cr3t" not in out and "TOKEN" in out and "sha256:" in out


async def test_a_stream_qemu_refuses_is_a_snapshot_error_naming_the_file(tmp_path):
    from localsbx.errors import VMError

    class Refusing:
        proc = None

        async def execute(self, cmd, args=None, *, timeout=30.0):
            if cmd == "query-migrate":
                raise VMError("QMP command query-migrate failed: QMPClient is disconnecting.")
            return {}

        def log_tail(self, lines=30):
            return "[serial.qemu.log]\nqemu: load of migration failed: Invalid argument"

    f = tmp_path / "state.mig"
    with pytest.raises(SnapshotError, match=r"state\.mig failed: QEMU could not restore it") as ei:
        await snapshot.restore(Refusing(), f)
    assert "load of migration failed" in ei.value.message and ei.value.hint


def test_damaged_memory_checkpoint_is_named():
    from localsbx.sandbox import _plan_checkpoint

    d = store.checkpoints_dir() / "ck0123456789abcdef"
    d.mkdir(parents=True)
    for name in ("disk.qcow2", "initrd.cpio", "state.mig"):
        (d / name).write_bytes(b"x" * 100)
    rec = store.CheckpointRecord(
        id=d.name, sandbox_id="s", image="i", project="p", image_digest="d", kind="memory",
        created_at=0, cpus=1, memory_mb=1024, env={}, workdir="/", user=None, kernel="k",
        initrd=str(d / "initrd.cpio"), ram_file=None, host_key="",
        state_digest=snapshot.file_digest(d / "state.mig"))
    store.write_json_atomic(d / "checkpoint.json", rec.to_json())
    (d / "state.mig").write_bytes(b"y" * 100)
    with pytest.raises(SnapshotError, match="state.mig is damaged"):
        _plan_checkpoint(d.name, cpus=None, memory_mb=None, timeout=600)
