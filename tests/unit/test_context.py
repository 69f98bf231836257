"""Build context: .dockerignore, source resolution, digests and the tar stream (no VM)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from localsbx.definition import context as ctxmod
from localsbx.definition.context import BuildContext, IgnoreRules, parse_chown
from localsbx.definition.dockerfile import parse_dockerfile
from localsbx.definition.ops import Add, Copy
from localsbx.errors import DefinitionError, ImageBuildError, SourceLocation

CASES = Path(__file__).resolve().parent.parent / "cases"
PASSWD = ("root:x:0:0:root:/root:/bin/bash\n"
          "appuser:x:1234:1234::/home/appuser:/bin/sh\n"
          "web:x:1000:2000::/srv:/bin/sh\n")
GROUP = "root:x:0:\nappgrp:x:1234:\nwebgrp:x:2000:\n"


def listing(data: bytes) -> dict[str, tuple]:
    """name -> (type, mode, uid, gid, linkname/content)."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf:
            content = tf.extractfile(m).read() if m.isreg() else m.linkname
            out[m.name] = ({tarfile.DIRTYPE: "d", tarfile.SYMTYPE: "l"}.get(m.type, "f"),
                           m.mode, m.uid, m.gid, content)
    return out


def case_ops(case: str):
    d = parse_dockerfile(CASES / case / "Dockerfile")
    return BuildContext(CASES / case / "context"), [o for o in d.ops if isinstance(o, Copy)]


def test_b13_owners_modes_and_created_parents():
    ctx, (app, run) = case_ops("B13")
    t = listing(ctx.make_tar(app, passwd=PASSWD, group=GROUP))
    assert list(t) == ["home", "home/appuser", "home/appuser/data", "home/appuser/data/nested",
                       "home/appuser/data/nested/app.txt"]
    assert t["home/appuser/data"][:4] == ("d", 0o755, 1234, 1234)
    assert t["home/appuser/data/nested"][:4] == ("d", 0o755, 1234, 1234)
    mode = (CASES / "B13" / "context" / "app.txt").stat().st_mode & 0o7777
    assert t["home/appuser/data/nested/app.txt"] == ("f", mode, 1234, 1234, b"app data\n")
    t = listing(ctx.make_tar(run, passwd=PASSWD, group=GROUP))
    assert t["opt/tools"][:4] == ("d", 0o755, 1234, 1234)
    assert t["opt/tools/run.sh"][:4] == ("f", 0o750, 1234, 1234)
    assert t["opt/tools/run.sh"][4] == b"#!/bin/sh\necho run-ok\n"


def test_chown_resolution_rules():
    assert parse_chown(None, PASSWD, GROUP) == (0, 0)
    assert parse_chown("web", PASSWD, GROUP) == (1000, 2000)  # primary group
    assert parse_chown("1234", PASSWD, GROUP) == (1234, 1234)  # same number
    assert parse_chown("web:appgrp", PASSWD, GROUP) == (1000, 1234)
    assert parse_chown("7:8", "", "") == (7, 8)
    with pytest.raises(KeyError):
        parse_chown("nobody", PASSWD, GROUP)


def test_unknown_chown_user_is_located_error():
    ctx, (app, _) = case_ops("B13")
    with pytest.raises(DefinitionError) as exc:
        ctx.make_tar(app, passwd="root:x:0:0::/:/bin/sh\n", group="root:x:0:\n")
    assert exc.value.location.line == 3 and "user 'appuser'" in exc.value.message
    assert "useradd" in exc.value.hint


def test_b15_add_extracts_archives_by_content():
    ctx, ops = case_ops("B15")
    files = {}
    for op in ops:
        for name, entry in listing(ctx.make_tar(op, passwd=PASSWD, group=GROUP)).items():
            files[name] = entry
    kinds = {n: e[0] for n, e in files.items()}
    assert kinds == {
        "opt": "d", "opt/bundle": "d", "opt/bundle/hello.txt": "f", "opt/bundle/bin": "d",
        "opt/bundle/bin/tool.sh": "f", "opt/bundle/link": "l", "opt/xzdir": "d",
        "opt/xzdir/inside-xz.txt": "f", "opt/gz": "d", "opt/gz/plain.txt.gz": "f",
        "opt/fake": "d", "opt/fake/fake.tar.gz": "f", "opt/dat": "d", "opt/dat/inside.txt": "f",
        "opt/copied": "d", "opt/copied/bundle.tar.gz": "f"}
    assert files["opt/bundle/bin/tool.sh"][1:4] == (0o755, 0, 0)
    assert files["opt/bundle/hello.txt"][1] == 0o644
    assert files["opt/bundle/link"][4] == "hello.txt"
    # non-archives are byte-exact copies, COPY never extracts
    ctxdir = CASES / "B15" / "context"
    assert files["opt/gz/plain.txt.gz"][4] == (ctxdir / "plain.txt.gz").read_bytes()
    assert files["opt/copied/bundle.tar.gz"][4] == (ctxdir / "bundle.tar.gz").read_bytes()


def test_add_archive_keeps_archive_ids_even_with_chown(tmp_path):
    """BuildKit (checked by tests/diff add-tar-chown): --chown sets the created
    destination's owner, the extracted members keep the archive's ids."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        ti = tarfile.TarInfo("d/f.txt")
        ti.size, ti.uid, ti.gid, ti.mode = 2, 42, 43, 0o640
        tf.addfile(ti, io.BytesIO(b"hi"))
    (tmp_path / "a.bin").write_bytes(buf.getvalue())
    ctx = BuildContext(tmp_path)
    t = listing(ctx.make_tar(Add(("a.bin",), "/x"), passwd=PASSWD, group=GROUP))
    assert t["x/d/f.txt"] == ("f", 0o640, 42, 43, b"hi")
    t = listing(ctx.make_tar(Add(("a.bin",), "/x/", chown="web"), passwd=PASSWD, group=GROUP))
    assert t["x/d/f.txt"][2:4] == (42, 43) and t["x"][2:4] == (1000, 2000)


def test_add_url_downloads_mode_0600_never_extracts(monkeypatch, tmp_path):
    archive = (CASES / "B15" / "context" / "bundle.tar.gz").read_bytes()

    class Resp(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    seen = {}

    def urlopen(req, timeout):
        seen.update(url=req.full_url, timeout=timeout)
        return Resp(archive)

    monkeypatch.setattr(ctxmod.urllib.request, "urlopen", urlopen)
    op = parse_dockerfile(CASES / "B15" / "Dockerfile.url").ops[0]
    t = listing(BuildContext(None).make_tar(op, passwd=PASSWD, group=GROUP))
    assert t["dl/hello-2.12.tar.gz"] == ("f", 0o600, 0, 0, archive)
    assert seen == {"url": "https://ftp.gnu.org/gnu/hello/hello-2.12.tar.gz", "timeout": 60.0}


def test_add_url_failure_names_the_url(monkeypatch):
    def urlopen(req, timeout):
        raise ctxmod.urllib.error.URLError("no network")

    monkeypatch.setattr(ctxmod.urllib.request, "urlopen", urlopen)
    op = Add(("https://example.invalid/x.tgz",), "/dl/", location=SourceLocation("D", 3))
    with pytest.raises(ImageBuildError) as exc:
        BuildContext(None).make_tar(op, passwd="", group="")
    assert "https://example.invalid/x.tgz" in str(exc.value) and "no network" in str(exc.value)
    assert exc.value.step == "line 3: ADD https://example.invalid/x.tgz /dl/"
    assert str(exc.value).startswith("D:3: ADD could not download")  # located, as others


def test_add_url_http_error_says_its_status(monkeypatch):
    def urlopen(req, timeout):
        raise ctxmod.urllib.error.HTTPError(req.full_url, 404, "File not found", {}, None)

    monkeypatch.setattr(ctxmod.urllib.request, "urlopen", urlopen)
    op = Add(("http://127.0.0.1:9/x",), "/dl/", location=SourceLocation("D", 3))
    with pytest.raises(ImageBuildError, match="^D:3: ADD could not download http://127.0.0.1:9/x: "
                                              "HTTP 404 File not found"):
        BuildContext(None).make_tar(op, passwd="", group="")


def test_b16_dockerignore_result():
    ctx, (op,) = case_ops("B16")
    files = sorted(n for n, e in listing(ctx.make_tar(op, passwd="", group="")).items()
                   if e[0] == "f")
    # BuildKit (tests/diff B16): !**/*.py does not re-include pkg/deep/mod.py under the
    # excluded pkg/ (an exception only opens a folder its text starts with)
    assert files == ["src/app.py", "src/lib/util.py"]


def test_ignore_rules_last_match_wins():
    rules = IgnoreRules(["# c", "", "*.log", "!keep.log", "build/", "**/tmp", "!build/out/**",
                         "/abs.txt", "docs/[ab]*.md", "x\\*y"])
    assert rules.excluded("a.log") and not rules.excluded("keep.log")
    assert rules.excluded("build/x.o") and not rules.excluded("build/out/a/b.bin")
    assert rules.excluded("deep/er/tmp/file") and rules.excluded("tmp")
    assert rules.excluded("abs.txt") and rules.excluded("docs/a1.md")
    assert not rules.excluded("docs/c.md") and not rules.excluded("sub/a.log")  # root only
    assert rules.excluded("x*y") and not rules.excluded("xzy")
    assert not rules.excluded("src/main.py")


def test_dest_rules_and_directory_contents(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "f").write_text("f")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    os.symlink("a.txt", tmp_path / "ln")
    ctx = BuildContext(tmp_path)
    mk = lambda *src, dest: listing(ctx.make_tar(Copy(src, dest), passwd="", group=""))  # noqa: E731
    assert set(mk("a.txt", dest="/x/y")) == {"x", "x/y"}  # single file -> that file name
    assert "x/y/a.txt" in mk("a.txt", dest="/x/y/")
    assert "x/y/a.txt" in listing(ctx.make_tar(Copy(("a.txt",), "/x/y"), passwd="", group="",
                                               dest_is_dir=True))
    assert {"x/a.txt", "x/b.txt"} <= set(mk("*.txt", dest="/x"))  # glob of several -> dir
    assert set(mk("d", dest="/x")) == {"x", "x/sub", "x/sub/f"}  # contents, not d itself
    t = mk(".", dest="/c/")
    assert t["c/ln"][0] == "l" and t["c/ln"][4] == "a.txt"


def test_missing_and_escaping_sources_are_located_errors(tmp_path):
    (tmp_path / "ok").write_text("x")
    ctx = BuildContext(tmp_path)
    loc = SourceLocation("Dockerfile", 4)
    with pytest.raises(DefinitionError) as exc:
        ctx.make_tar(Copy(("nope.txt",), "/x", location=loc), passwd="", group="")
    assert str(exc.value).startswith("Dockerfile:4: COPY source 'nope.txt' not found")
    assert str(tmp_path) in exc.value.message and ".dockerignore" in exc.value.hint
    with pytest.raises(DefinitionError, match="outside the build context"):
        ctx.resolve(Copy(("../etc/passwd",), "/x", location=loc))
    assert ctx.resolve(Copy(("*.none",), "/x/", location=loc)) == []  # BuildKit: no error
    with pytest.raises(DefinitionError, match="use ADD"):
        ctx.resolve(Copy(("http://x/y",), "/x/", location=loc))


def test_digest_tracks_content_not_mtime(tmp_path):
    (tmp_path / "f").write_text("one")
    op = Copy(("f",), "/f")
    first = BuildContext(tmp_path).digest(op)
    os.utime(tmp_path / "f", (1, 1))
    assert BuildContext(tmp_path).digest(op) == first
    (tmp_path / "f").write_text("two")
    assert BuildContext(tmp_path).digest(op) != first
    assert BuildContext(tmp_path).digest("f") != first  # as ADD of a source string
    assert BuildContext(tmp_path).digest([op]) == BuildContext(tmp_path).digest(op)


def test_b06_copy_is_byte_exact():
    ctx, (op,) = case_ops("B06")
    t = listing(ctx.make_tar(op, passwd="", group=""))
    assert t["tmp/crlf-script.sh"][4] == b"#!/bin/sh\r\necho from-crlf-script\r\n"
