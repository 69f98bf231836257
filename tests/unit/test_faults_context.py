"""Issue 10 items 9, 10 and the context "Poor" items: special files in the build context
never hang, spin or trace back (no VM). Each call runs under a bound."""

from __future__ import annotations

import io
import os
import socket
import tarfile
import threading

import pytest

from localsbx.definition.context import BuildContext
from localsbx.definition.ops import Add, Copy
from localsbx.errors import DefinitionError

PASSWD, GROUP = "root:x:0:0:root:/root:/bin/sh\n", "root:x:0:\n"


def bounded(fn, seconds: float = 10.0):
    """Run fn in a thread; fail (not hang) if it takes longer than ``seconds``."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            out["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s (hang)"
    if "exc" in out:
        raise out["exc"]
    return out["value"]


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: m for m in tf}


@pytest.fixture
def ctx_dir(tmp_path):
    d = tmp_path / "ctx"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "a.txt").write_text("a\n")
    os.mkfifo(d / "sub" / "fifo")
    return d


def test_fifo_is_sent_as_a_header_never_opened(ctx_dir):  # item 9
    ctx = BuildContext(ctx_dir)
    for op in (Copy(("sub",), "/x/"), Copy(("sub/fifo",), "/y"), Add(("sub/fifo",), "/z")):
        bounded(lambda op=op: ctx.digest(op))
        tar = bounded(lambda op=op: ctx.make_tar(op, passwd=PASSWD, group=GROUP))
        fifos = [m for m in members(tar).values() if m.isfifo()]
        assert len(fifos) == 1 and fifos[0].size == 0
    assert "x/a.txt" in members(ctx.make_tar(Copy(("sub",), "/x/"), passwd=PASSWD, group=GROUP))


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a character device needs root")
def test_character_device_is_sent_as_a_header_never_read(ctx_dir):  # item 10
    os.mknod(ctx_dir / "zero", 0o666 | 0o020000, os.makedev(1, 5))  # like /dev/zero
    ctx = BuildContext(ctx_dir)
    op = Copy((".",), "/app/")
    bounded(lambda: ctx.digest(op))
    tar = bounded(lambda: ctx.make_tar(op, passwd=PASSWD, group=GROUP))
    m = members(tar)["app/zero"]
    assert m.ischr() and (m.devmajor, m.devminor) == (1, 5) and m.size == 0


def test_socket_is_left_out_without_a_traceback(ctx_dir):  # Poor: socket
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(ctx_dir / "sub" / "ctl.sock"))
        ctx = BuildContext(ctx_dir)
        assert "sub/ctl.sock" not in ctx.index()
        tar = bounded(lambda: ctx.make_tar(Copy(("sub",), "/x/"), passwd=PASSWD, group=GROUP))
        assert "x/ctl.sock" not in members(tar)
        bounded(lambda: ctx.digest(Copy(("sub",), "/x/")))
        with pytest.raises(DefinitionError, match="not found"):
            ctx.digest(Copy(("sub/ctl.sock",), "/y"))
    finally:
        s.close()


def test_symlink_loop_is_a_clear_error(ctx_dir):  # Poor: symlink loop
    os.symlink("loop", ctx_dir / "loop")
    os.symlink("b", ctx_dir / "a")
    os.symlink("a", ctx_dir / "b")
    ctx = BuildContext(ctx_dir)
    for src in ("loop", "a", "loop/x"):
        with pytest.raises(DefinitionError, match="symlink loop") as ei:
            bounded(lambda src=src: ctx.digest(Copy((src,), "/y")))
        assert ei.value.hint
    # a whole-context copy keeps the loops as links, as BuildKit does
    tar = bounded(lambda: ctx.make_tar(Copy((".",), "/c/"), passwd=PASSWD, group=GROUP))
    assert members(tar)["c/loop"].issym() and members(tar)["c/loop"].linkname == "loop"


def test_dangling_symlink_source_is_a_clear_error(ctx_dir):
    os.symlink("nowhere", ctx_dir / "dangling")
    with pytest.raises(DefinitionError, match="dangling symlink"):
        BuildContext(ctx_dir).digest(Copy(("dangling",), "/y"))


def test_source_through_an_in_context_symlinked_folder_is_followed(ctx_dir):  # Poor
    os.symlink(".", ctx_dir / "self")
    ctx = BuildContext(ctx_dir)
    tar = ctx.make_tar(Copy(("self/self/sub/",), "/y/"), passwd=PASSWD, group=GROUP)
    assert "y/a.txt" in members(tar)
    tar = ctx.make_tar(Copy(("self/sub/a.txt",), "/z"), passwd=PASSWD, group=GROUP)
    assert members(tar)["z"].isreg()


def test_bad_character_class_is_a_clear_error(ctx_dir):  # found by fuzzing
    (ctx_dir / ".dockerignore").write_text("sub/a.txt\n[]\n")
    with pytest.raises(DefinitionError, match=r"\.dockerignore: invalid pattern '\[\]'"):
        BuildContext(ctx_dir)
    (ctx_dir / ".dockerignore").unlink()
    with pytest.raises(DefinitionError, match="COPY source '.z-a.' *: invalid pattern"):
        BuildContext(ctx_dir).digest(Copy(("[z-a]",), "/y"))
