"""The build loop (localsbx.build.steps.run_ops) against an in-memory guest: no VM.

The fake keeps the guest's files and directories in memory, records every call, and
answers ``mkdir -p`` / ``test -d`` / ``rm -f`` itself; RUN results come from a table.
"""

from __future__ import annotations

import inspect
import io
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from localsbx.build import builder
from localsbx.build.steps import BuildState, Guest, run_ops
from localsbx.definition.context import BuildContext
from localsbx.definition.dockerfile import parse_dockerfile
from localsbx.definition.ops import DEFAULT_PATH
from localsbx.errors import ConfigError, DefinitionError, ImageBuildError
from localsbx.guest.ssh import ExecResult, GuestConnection

PASSWD = b"root:x:0:0:root:/root:/bin/bash\napp:x:1500:1600::/home/app:/bin/sh\n"
GROUP = b"root:x:0:\nappgrp:x:1600:\nstaff:x:50:\n"
TIMEOUT = 77.0


@dataclass
class Call:
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    user: str | None
    stdin: bytes | None
    timeout: float | None
    kill_tree: bool
    streamed: bool


class FakeGuest:
    """An in-memory :class:`Guest`.

    :param results: ``{argv[-1] substring: (status, stdout, stderr)}`` for commands the
        fake does not implement itself; default ``(0, b"", b"")``.
    """

    def __init__(self, results: dict[str, tuple[int | None, bytes, bytes]] | None = None,
                 *, timed_out: set[str] = frozenset()) -> None:
        self.files: dict[str, bytes] = {"/etc/passwd": PASSWD, "/etc/group": GROUP}
        self.modes: dict[str, int] = {}
        self.dirs = {"/", "/etc", "/tmp", "/opt", "/usr", "/usr/bin"}
        self.calls: list[Call] = []
        self.tars: list[bytes] = []
        self.results = results or {}
        self.timed_out = timed_out

    async def exec(self, argv, *, env=None, cwd=None, user=None, stdin=None, timeout=None,
                   stdout_cb=None, stderr_cb=None, kill_tree=False) -> ExecResult:
        argv = list(argv)
        self.calls.append(Call(argv, dict(env or {}), cwd, user, stdin, timeout, kill_tree,
                               stdout_cb is not None))
        if argv[:2] == ["mkdir", "-p"]:
            p = argv[2].rstrip("/")
            while p:
                self.dirs.add(p)
                p = p.rsplit("/", 1)[0]
            return ExecResult(0, None, b"", b"")
        if argv[:2] == ["test", "-d"]:
            return ExecResult(0 if argv[2] in self.dirs else 1, None, b"", b"")
        if argv[:2] == ["rm", "-f"]:
            self.files.pop(argv[2], None)
            return ExecResult(0, None, b"", b"")
        status, out, err = next((r for k, r in self.results.items() if k in argv[-1]),
                                (0, b"", b""))
        if stdout_cb:
            stdout_cb(out)
            out = b""
        if stderr_cb:
            stderr_cb(err)
            err = b""
        if any(k in argv[-1] for k in self.timed_out):
            return ExecResult(None, 9, out, err, timed_out=True)
        return ExecResult(status, None, out, err)

    async def put_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        self.files[path] = data
        self.modes[path] = mode

    async def get_file(self, path: str) -> bytes:
        return self.files[path]

    async def extract_tar(self, tar_bytes: bytes, *, timeout: float | None = None) -> ExecResult:
        self.tars.append(tar_bytes)
        self.calls.append(Call(["<extract_tar>"], {}, None, None, None, timeout, False, False))
        return ExecResult(0, None, b"", b"")

    def runs(self) -> list[Call]:
        """The calls that are RUN steps (not the loop's own probes)."""
        return [c for c in self.calls if c.kill_tree]


class Rep:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.out = bytearray()

    def say(self, text: str) -> None:
        self.lines.append(text)

    def output(self, chunk: bytes) -> None:
        self.out.extend(chunk)


def defn(text: str, **kw):
    return parse_dockerfile("FROM debian-minimal\n" + text, known_bases=["debian-minimal"],
                            source="/src/Dockerfile", **kw)


async def build(text: str, guest: FakeGuest | None = None, ctx: Path | None = None,
                **kw) -> tuple[BuildState, FakeGuest, Rep]:
    guest = guest or FakeGuest()
    rep = Rep()
    state = await run_ops(guest, defn(text, **kw), BuildContext(ctx) if ctx else None, rep,
                          timeout=TIMEOUT)
    return state, guest, rep


def tar_listing(data: bytes) -> dict[str, tuple]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf:
            body = tf.extractfile(m).read() if m.isreg() else b""
            out[m.name] = ("d" if m.isdir() else "f", m.mode, m.uid, m.gid, body)
    return out


@pytest.mark.parametrize("method", ["exec", "put_file", "get_file", "extract_tar"])
def test_guest_connection_has_the_protocol_signature(method):
    want = inspect.signature(getattr(Guest, method)).parameters
    have = inspect.signature(getattr(GuestConnection, method)).parameters
    for name, p in want.items():
        assert name in have, f"GuestConnection.{method} lacks {name}"
        assert have[name].kind == p.kind, name
        assert (have[name].default is inspect.Parameter.empty) == (
            p.default is inspect.Parameter.empty), name


async def test_copy_tar_is_built_off_the_event_loop_thread(tmp_path):
    (tmp_path / "f").write_text("x")
    seen = []

    class Ctx(BuildContext):
        def make_tar(self, *a, **kw):
            seen.append(threading.get_ident())
            return super().make_tar(*a, **kw)

    await run_ops(FakeGuest(), defn("COPY f /f\n"), Ctx(tmp_path), Rep(), timeout=None)
    assert seen and seen[0] != threading.get_ident()


async def test_run_gets_exact_argv_env_cwd_user_and_options():
    state, g, rep = await build("ENV A=1\nWORKDIR /srv/app\nARG V=7\nRUN echo $A $V\n"
                                'RUN ["/usr/bin/env", "x y"]\n')
    shell, exec_form = g.runs()
    assert shell.argv == ["/bin/sh", "-c", "echo $A $V"]
    assert shell.env == {"HOME": "/root", "PATH": DEFAULT_PATH, "A": "1", "V": "7"}
    assert shell.cwd == "/srv/app"
    assert shell.user is None
    assert shell.stdin is None
    assert shell.timeout == TIMEOUT
    assert shell.streamed
    assert exec_form.argv == ["/usr/bin/env", "x y"]
    assert state == BuildState(env={"PATH": DEFAULT_PATH, "A": "1"}, workdir="/srv/app")
    assert rep.lines == ["[1/4] line 2: ENV A=1", "[2/4] line 3: WORKDIR /srv/app",
                         "[3/4] line 5: RUN echo $A $V",
                         '[4/4] line 6: RUN ["/usr/bin/env", "x y"]']


async def test_env_and_workdir_carry_to_later_steps_only():
    state, g, _ = await build("RUN one\nENV A=1 HOME=/home/x\nRUN two\nWORKDIR /w\nENV A=2\n"
                              "RUN three\nWORKDIR sub\nRUN four\n")
    one, two, three, four = g.runs()
    assert (one.env, one.cwd) == ({"HOME": "/root", "PATH": DEFAULT_PATH}, "/")
    assert (two.env, two.cwd) == ({"HOME": "/home/x", "PATH": DEFAULT_PATH, "A": "1"}, "/")
    assert (three.env["A"], three.cwd) == ("2", "/w")
    assert four.cwd == "/w/sub"
    assert state.env == {"PATH": DEFAULT_PATH, "A": "2", "HOME": "/home/x"}
    assert state.workdir == "/w/sub"


async def test_arg_values_reach_their_step_but_not_the_image():
    state, g, _ = await build("ARG TOKEN\nRUN use-token\n", build_args={"TOKEN": "s3cret"})
    (run,) = g.runs()
    assert run.env["TOKEN"] == "s3cret"
    assert "TOKEN" not in state.env


async def test_workdir_is_created_as_root_from_slash():
    _, g, _ = await build("ENV X=1\nWORKDIR /a/b/c\n")
    (mk,) = g.calls
    assert mk.argv == ["mkdir", "-p", "/a/b/c"]
    assert (mk.cwd, mk.user) == ("/", None)
    assert mk.env == {"HOME": "/root", "PATH": DEFAULT_PATH, "X": "1"}
    assert {"/a", "/a/b", "/a/b/c"} <= g.dirs


async def test_workdir_creation_failure_is_a_step_error():
    g = FakeGuest()

    async def failing_exec(argv, **kw):
        return ExecResult(1, None, b"", b"mkdir: cannot create directory '/ro': Read-only\n")

    g.exec = failing_exec
    with pytest.raises(ImageBuildError) as ei:
        await build("WORKDIR /ro\n", g)
    assert ei.value.step == "line 2: WORKDIR /ro"
    assert "creating WORKDIR: exit code 1" in ei.value.message
    assert "Read-only" in ei.value.output_tail


async def test_copy_tar_names_owners_modes(tmp_path):
    (tmp_path / "app.py").write_text("print(1)\n")
    (tmp_path / "app.py").chmod(0o640)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "m.py").write_text("x = 1\n")
    (tmp_path / "lib" / "m.py").chmod(0o600)
    _, g, _ = await build("COPY --chown=app:staff app.py /opt/srv/\n"
                          "COPY --chmod=0755 lib /usr/lib/x\n", ctx=tmp_path)
    first, second = (tar_listing(t) for t in g.tars)
    # parents are in the stream with the --chown owner; existing ones keep their own
    # metadata in the guest (tar --no-overwrite-dir)
    assert first == {"opt": ("d", 0o755, 1500, 50, b""),
                     "opt/srv": ("d", 0o755, 1500, 50, b""),
                     "opt/srv/app.py": ("f", 0o640, 1500, 50, b"print(1)\n")}
    assert second["usr/lib/x/m.py"] == ("f", 0o755, 0, 0, b"x = 1\n")
    assert [c.timeout for c in g.calls if c.argv == ["<extract_tar>"]] == [TIMEOUT, TIMEOUT]


async def test_copy_into_an_existing_directory_probes_it(tmp_path):
    (tmp_path / "f.txt").write_text("hi")
    _, g, _ = await build("COPY f.txt /opt\nCOPY f.txt /newfile\nCOPY f.txt /opt/\n",
                          ctx=tmp_path)
    probes = [c.argv for c in g.calls if c.argv[0] == "test"]
    assert probes == [["test", "-d", "/opt"], ["test", "-d", "/newfile"]]  # none for /opt/
    assert [list(tar_listing(t)) for t in g.tars] == [["opt", "opt/f.txt"], ["newfile"],
                                                      ["opt", "opt/f.txt"]]


async def test_copy_with_an_unknown_chown_name(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DefinitionError, match="--chown=nobody: the image has no"):
        await build("COPY --chown=nobody f /f\n", ctx=tmp_path)


async def test_copy_without_context():
    with pytest.raises(DefinitionError, match="no build context"):
        await build("COPY f /f\n")


async def test_failing_run_gives_step_line_exit_code_and_tail():
    out = b"".join(b"line %d\n" % i for i in range(1, 41))
    g = FakeGuest({"make all": (2, out, b"make: *** [all] Error 2\n")})
    with pytest.raises(ImageBuildError) as ei:
        await build("RUN true\nRUN make all\nRUN never\n", g)
    err = ei.value
    assert err.step == "line 3: RUN make all"
    assert err.exit_code == 2
    assert err.message == "build failed at /src/Dockerfile, line 3: RUN make all: exit code 2"
    tail = err.output_tail.splitlines()
    assert len(tail) == 25 and tail[-1] == "make: *** [all] Error 2" and tail[0] == "line 17"
    assert err.hint is None
    assert [c.argv[-1] for c in g.runs()] == ["true", "make all"]  # stopped at the failure


async def test_exit_127_hints_at_dash_and_source():
    g = FakeGuest({"source": (127, b"", b"/bin/sh: 1: source: not found\n")})
    with pytest.raises(ImageBuildError) as ei:
        await build("RUN source /opt/venv/bin/activate\n", g)
    assert ei.value.exit_code == 127
    assert "dash: no `source`, use `.`" in ei.value.hint
    assert "source: not found" in ei.value.output_tail
    assert "hint: command not found" in str(ei.value)


async def test_timed_out_run_names_the_timeout():
    g = FakeGuest(timed_out={"apt-get"})
    with pytest.raises(ImageBuildError) as ei:
        await build("RUN apt-get install vim\n", g)
    assert ei.value.exit_code == 128 + 9
    assert "LOCALSBX_STEP_TIMEOUT (77 s)" in ei.value.hint
    assert "timed out" in ei.value.message


async def test_step_output_is_streamed_to_the_reporter():
    g = FakeGuest({"echo": (0, b"to-stdout\n", b"to-stderr\n")})
    _, _, rep = await build("RUN echo hi\n", g)
    assert bytes(rep.out) == b"to-stdout\nto-stderr\n"


async def test_heredoc_script_is_written_run_and_removed():
    g = FakeGuest()
    await build("RUN <<EOF\n#!/usr/bin/env python3\nprint('hi')\nEOF\n", g)
    (run,) = g.runs()
    path = run.argv[-1]
    assert path.startswith("/tmp/.localsbx-run-")
    assert g.modes[path] == 0o755
    assert path not in g.files  # removed after the step
    assert ["rm", "-f", path] in [c.argv for c in g.calls]


@pytest.mark.parametrize("value", ["abc", "-5", "nan", "inf", ""])
def test_bad_step_timeout_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv("LOCALSBX_STEP_TIMEOUT", value)
    with pytest.raises(ConfigError) as ei:
        builder.step_timeout()
    assert f"LOCALSBX_STEP_TIMEOUT={value!r}" in str(ei.value)


def test_step_timeout_values(monkeypatch):
    monkeypatch.delenv("LOCALSBX_STEP_TIMEOUT", raising=False)
    assert builder.step_timeout() == 3600
    monkeypatch.setenv("LOCALSBX_STEP_TIMEOUT", "0")
    assert builder.step_timeout() is None
    monkeypatch.setenv("LOCALSBX_STEP_TIMEOUT", " 12.5 ")
    assert builder.step_timeout() == 12.5


async def test_bad_step_timeout_fails_before_anything_boots(monkeypatch):
    booted = []

    async def no_boot(*a, **kw):
        booted.append(a)
        raise AssertionError("must not be reached")

    monkeypatch.setenv("LOCALSBX_STEP_TIMEOUT", "1h")
    monkeypatch.setattr(builder, "choose_accel", no_boot)
    monkeypatch.setattr(builder.Machine, "cold_boot", no_boot)
    with pytest.raises(ConfigError, match="LOCALSBX_STEP_TIMEOUT='1h'"):
        await builder.build_image_async(defn("RUN true\n"), name="x")
    assert booted == []


def test_context_reads_skip_stage_copies_and_heredocs_but_see_stages_and_binds():
    from localsbx.build.builder import _context_reads
    from localsbx.definition.dockerfile import parse_dockerfile

    d = parse_dockerfile(
        "FROM debian-minimal AS b\nCOPY a.txt /a\nFROM debian-minimal\nCOPY --from=b /a /a\n"
        "COPY <<EOF /h\nx\nEOF\nRUN --mount=type=bind,source=dir,target=/d true\nCOPY c /c\n")
    reads = _context_reads(d)
    assert [r if isinstance(r, str) else r.sources for r in reads] == ["dir", ("c",), ("a.txt",)]


async def test_copy_from_source_symlinks_resolve_inside_the_source_root():
    """BuildKit follows symlinks on a COPY --from source path inside the source's own file
    system: merged-/usr links, absolute targets (from the root, not the VM's) and ``..``
    stopping at the root."""
    from localsbx.build.steps import _real_path

    g = FakeGuest({"/r/bin": (0, b"usr/bin\n", b""), "/r/usr/bin/sh": (0, b"dash\n", b""),
                   "/r/opt/abs": (0, b"/../../etc/x\n", b""),
                   "/r/loop": (0, b"loop\n", b"")})
    assert await _real_path(g, "/r", "bin/sh") == "usr/bin/dash"
    assert await _real_path(g, "/r", "opt/abs") == "etc/x"
    assert await _real_path(g, "/r", "etc/apt") == "etc/apt"
    assert await _real_path(g, "/r", ".") == "."
    assert await _real_path(g, "/r", "loop") == "loop"  # a loop ends after 40 hops
