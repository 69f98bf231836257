"""The image API's build bookkeeping: builds whose context never came are dropped with their
folders; build errors name paths of the user's context, not the server's copy
(localsbx.serve.images)."""

from localsbx.serve import images, wire


def _build(tmp_path, bid: str, status: str, updated: float) -> images.Build:
    d = tmp_path / bid
    (d / "context").mkdir(parents=True)
    b = images.Build(bid, wire.CreateBuild(name="web"), "default", "tok", d, status=status)
    b.updated = updated
    return b


def test_stale_pending_and_old_finished_builds_are_dropped(tmp_path):
    now = 1_000_000.0
    builds = {b.id: b for b in [
        _build(tmp_path, "fresh", "pending", now - 60),
        _build(tmp_path, "stale", "pending", now - images.PENDING_BUILD_TTL - 1),
        _build(tmp_path, "running", "running", now - images.FINISHED_BUILD_TTL - 1),
        _build(tmp_path, "old-done", "succeeded", now - images.FINISHED_BUILD_TTL - 1),
        _build(tmp_path, "new-done", "failed", now - 5),
    ]}
    assert images.expire_builds(builds, now=now) == 2
    assert sorted(builds) == ["fresh", "new-done", "running"]
    assert not (tmp_path / "stale").exists() and not (tmp_path / "old-done").exists()
    assert (tmp_path / "fresh" / "context").is_dir()


def test_build_errors_show_context_relative_paths(tmp_path):
    b = _build(tmp_path, "b1", "running", 0)
    ctx = b.dir / "context"
    text = f"{ctx}/Dockerfile:3: COPY missing.txt: not found in {ctx}"
    assert images._client_paths(text, b) == "Dockerfile:3: COPY missing.txt: not found in ."
