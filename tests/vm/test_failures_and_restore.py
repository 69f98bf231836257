"""A failing build registers nothing and leaks no QEMU; restores fix the clock; a snapshot
that cannot be used is detected (B03, B17, B18, B26, B28)."""

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from localsbx import Sandbox, store
from localsbx.errors import ImageBuildError, ImageNotFound, SnapshotError

from .conftest import IMAGES, build, qemu_pids

pytestmark = pytest.mark.vm
CASES = Path(__file__).parent.parent / "cases"


def _assert_failed_build(tmp_path, text, name, *, line, code, output):
    df = tmp_path / "Dockerfile"
    df.write_text(text)
    with pytest.raises(ImageBuildError) as e:
        build(df, name)
    msg = str(e.value)
    assert f"line {line}:" in msg and e.value.exit_code == code
    assert output in e.value.output_tail
    with pytest.raises(ImageNotFound):
        store.lookup_image(name)
    assert not qemu_pids(f"localsbx-build-{name}")  # no QEMU left
    assert not qemu_pids(f"localsbx-snap-{name}")
    assert not list(store.paths.images_dir().glob(".tmp-*"))
    return e.value


def test_failing_run_registers_nothing(base_ready, tmp_path):  # B03 Dockerfile.fails
    _assert_failed_build(tmp_path, "FROM debian-minimal\nRUN echo hello && false && echo never\n",
                         "t-fails", line=2, code=1, output="hello")


def test_dash_semantics_and_pep668(base_ready, tmp_path):  # B18 last line, B17 first failure
    err = _assert_failed_build(
        tmp_path, "FROM debian-minimal\nRUN . /etc/os-release && echo dot-ok\n"
                  "RUN source /etc/os-release\n", "t-b18", line=3, code=127, output="not found")
    assert "dash" in (err.hint or "")
    _assert_failed_build(tmp_path, "FROM debian-minimal\nRUN pip install --no-cache-dir six\n",
                         "t-b17", line=2, code=1, output="externally-managed-environment")


@pytest.fixture(scope="module")
def b28_image(base_ready):
    build(IMAGES / "b28" / "Dockerfile", "t-b28", force=True)
    yield store.lookup_image("t-b28")
    store.remove_image("t-b28")


def test_clock_is_host_time_after_restore(b28_image):  # B26
    made = b28_image.meta.created_at
    if time.time() - made < 20:
        time.sleep(20 - (time.time() - made))
    with Sandbox.create("t-b28") as sb:
        skew = abs(int(sb.run("date -u +%s").stdout) - time.time())
        assert skew <= 5, f"guest clock {skew:.0f} s off after restore"
        time.sleep(15)
        skew = abs(int(sb.run("date -u +%s").stdout) - time.time())
        assert skew <= 5, f"guest clock {skew:.0f} s off after idling"


def test_other_shape_cold_boots_with_a_notice(b28_image):  # B28 step 2
    with Sandbox.create("t-b28", cpus=2, memory_mb=1536) as sb:
        assert not sb.record.restored
        assert "cold-booting" in sb.notice and "vCPUs" in sb.notice and "RAM" in sb.notice
        assert sb.run("nproc").stdout == "2\n"
        assert sb.run("cat /etc/b28").stdout == "built\n"


def test_damaged_or_missing_snapshot_is_a_clear_error(b28_image, tmp_path):  # B28 steps 3-4
    state = b28_image.path / "snap" / "state.mig"
    saved = tmp_path / "state.mig"
    shutil.copy(state, saved)
    before = qemu_pids()
    try:
        state.chmod(0o644)
        with open(state, "r+b") as f:
            f.truncate(state.stat().st_size // 2)
        t = time.monotonic()
        with pytest.raises(SnapshotError) as e:
            Sandbox.create("t-b28")
        assert time.monotonic() - t < 10
        assert "t-b28" in str(e.value) and "state.mig" in str(e.value) and "rebuild" in str(e.value)
        state.unlink()
        with pytest.raises(SnapshotError) as e:
            Sandbox.create("t-b28")
        assert "missing" in str(e.value)
    finally:
        shutil.copy(saved, state)
        state.chmod(0o444)
    assert qemu_pids() <= before
    with Sandbox.create("t-b28") as sb:  # restored again once the file is back
        assert sb.record.restored


def test_no_qemu_left_behind():
    """Every QEMU of this store's sandboxes belongs to a listed, live sandbox."""
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    root = str(store.paths.sandboxes_dir())
    ours = [line for line in out.splitlines() if root in line]
    alive = {r.id for r in store.list_sandboxes()}
    assert all(any(a in line for a in alive) for line in ours), ours
