"""Dockerfile reader: the parse part of the shared cases, and the error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from localsbx.definition.dockerfile import parse_dockerfile
from localsbx.definition.ops import Add, Copy, Env, Run, Workdir
from localsbx.errors import DefinitionError

CASES = Path(__file__).resolve().parent.parent / "cases"
BASES = {"debian-minimal", "ubuntu-minimal"}


def parse(case: str, file: str = "Dockerfile", **kw):
    return parse_dockerfile(CASES / case / file, known_bases=BASES, **kw)


def shell(cmd: str) -> tuple[str, ...]:
    return ("/bin/sh", "-c", cmd)


def test_b01_comments_and_empty_line_inside_continuations():
    d = parse("B01")
    assert [type(o) for o in d.ops] == [Run, Run]
    assert d.ops[0].argv == shell(
        "echo first > /tmp/b01.txt     && echo second >> /tmp/b01.txt"
        "     && echo third >> /tmp/b01.txt")
    assert d.ops[1].argv == shell("echo alpha > /tmp/b01b.txt     && echo beta >> /tmp/b01b.txt")
    assert "comment" not in d.ops[0].argv[2]
    assert [w for w in d.warnings if "empty continuation line" in w] == [
        d.warnings[0]] and d.warnings[0].startswith("line 7:")


def test_b03_heredoc_body_runs_in_sh_without_errexit():
    d = parse("B03")
    assert d.ops[0] == Run(shell("echo hello > /tmp/b03.txt\nfalse\necho world >> /tmp/b03.txt\n"))
    assert d.ops[0].location.line == 2 and d.ops[0].script is None
    assert d.ops[1].argv == shell("cat /tmp/b03.txt") and d.ops[1].location.line == 7
    fails = parse("B03", "Dockerfile.fails")
    assert fails.ops[0].argv == shell("echo hello && false && echo never-printed")
    assert fails.ops[0].describe() == "line 2: RUN echo hello && false && echo never-printed"


def test_b04_shebang_heredoc_is_a_script_tabs_stripped_first():
    raw = (CASES / "B04" / "Dockerfile").read_bytes()
    assert b"\t#!/bin/bash" in raw  # the input really has TABs
    d = parse("B04")
    a, b, c = d.ops
    assert a == Run((), shell=False, script='#!/bin/bash\ndeclare -r GREETING=from-bash\n'
                    'echo "$GREETING" > /tmp/b04-a.txt\n')
    assert b == Run((), shell=False, script='#!/bin/bash\ndeclare -r OTHER=tab-stripped\n'
                    'echo "$OTHER" > /tmp/b04-b.txt\n')
    assert c.argv == shell("cat /tmp/b04-a.txt /tmp/b04-b.txt") and c.location.line == 12


def test_b05_heredoc_with_space_body_is_never_an_instruction():
    d = parse("B05")
    assert [type(o) for o in d.ops] == [Run, Run]  # no Workdir from the body
    assert d.ops[0].argv == shell(
        "cat > /etc/b05.conf << 'EOF'\nhome=$HOME\n"
        "WORKDIR /this/line/is/file/content/not/an/instruction\nEOF\n")
    assert d.ops[1].argv == shell("cat /etc/b05.conf") and d.ops[1].location.line == 6
    assert d.final_workdir == "/"


def test_b06_crlf_dockerfile_is_normalised():
    assert b"\r\n" in (CASES / "B06" / "Dockerfile").read_bytes()
    d = parse("B06")
    assert d.ops[0].argv == shell("set -eu\necho 'Hello, world!' > /tmp/b06.txt\n")
    assert d.ops[1].argv == shell("echo plain > /tmp/b06-plain.txt")
    assert d.ops[2] == Copy(("crlf-script.sh",), "/tmp/crlf-script.sh")
    assert not any("\r" in a for o in d.ops if isinstance(o, Run) for a in o.argv)


B07_ENV = {
    "APP_TITLE": "Hello World", "APP_MODE": "prod", "QUOTED_KEY": "quoted value",
    "SINGLE": "it is single", "ESCAPED": "one two", "EMPTY": "", "AFTER_EMPTY": "yes",
    "JSONISH": '{"a": 1}',
}


def test_b07_env_word_processing():
    d = parse("B07")
    envs = [(o.key, o.value) for o in d.ops if isinstance(o, Env)]
    assert envs == list(B07_ENV.items())
    assert d.final_env["APP_TITLE"] == "Hello World"
    assert d.warnings == ()


def test_b08_legacy_env_is_one_value_with_quotes_removed():
    d = parse("B08")
    envs = [(o.key, o.value) for o in d.ops if isinstance(o, Env)]
    assert envs == [("GREETING", "hello big world"), ("DQ", "one two two three"),
                    ("SQ", "one two two three"), ("PATHLIKE", "/opt/a:/opt/b")]
    assert len(d.warnings) == 4 and "LegacyKeyValueFormat" in d.warnings[0]


def test_b10_arg_scoping_and_substitution():
    d = parse("B10")
    assert d.base == "debian-minimal"
    first, second = d.ops
    assert first.build_env == (("FOO", "DEFAULT_FOO"), ("BAR", "__DEFAULT_FOO__"),
                               ("UNSET_DEFAULT", "fallback"), ("ALT", "present"))
    assert "TOOL_VERSION" not in dict(first.build_env)
    assert dict(second.build_env)["TOOL_VERSION"] == "1.2.3"
    assert not any(isinstance(o, Env) for o in d.ops)  # ARGs never reach the image ENV
    assert "FOO" not in d.final_env


def test_b10_build_args_select_base_and_override():
    d = parse("B10", build_args={"BASE": "ubuntu-minimal", "FOO": "cli", "UNUSED": "x"})
    assert d.base == "ubuntu-minimal"
    assert dict(d.ops[0].build_env)["BAR"] == "__cli__"
    assert any("UNUSED" in w for w in d.warnings)


def test_b10_unknown_base_lists_known_bases():
    with pytest.raises(DefinitionError) as exc:
        parse("B10", build_args={"BASE": "nope"})
    msg = str(exc.value)
    assert exc.value.location.line == 3 and "Dockerfile:3:" in msg
    assert "'nope'" in msg and "debian-minimal, ubuntu-minimal" in msg
    assert "localsbx base build" in msg


def test_b11_workdir_resolution():
    d = parse("B11")
    assert [o.path for o in d.ops if isinstance(o, Workdir)] == [
        "/srv/app", "/srv/app/sub", "/srv/app/other/deep", "/", "/~/tilde", "/srv/app/final"]
    assert d.ops[-1] == Copy(("hello.txt",), "/srv/app/final/")
    assert d.final_workdir == "/srv/app/final"


def test_b13_chown_chmod_are_flags():
    d = parse("B13")
    assert d.ops[1] == Copy(("app.txt",), "/home/appuser/data/nested/app.txt",
                            chown="appuser:appgrp")
    assert d.ops[2] == Copy(("run.sh",), "/opt/tools/run.sh", chown="1234", chmod="0750")
    assert d.ops[3].argv[2].startswith("stat -c '%n %u:%g %a' /home/appuser/data ")


def test_b15_add_and_copy_ops():
    d = parse("B15")
    assert [(type(o).__name__, o.sources, o.dest) for o in d.ops[:6]] == [
        ("Add", ("bundle.tar.gz",), "/opt/"), ("Add", ("xzball.tar.xz",), "/opt/"),
        ("Add", ("plain.txt.gz",), "/opt/gz/"), ("Add", ("fake.tar.gz",), "/opt/fake/"),
        ("Add", ("tarball.dat",), "/opt/dat/"), ("Copy", ("bundle.tar.gz",), "/opt/copied/")]
    url = parse("B15", "Dockerfile.url")
    assert url.ops[0] == Add(("https://ftp.gnu.org/gnu/hello/hello-2.12.tar.gz",), "/dl/")


def test_b16_copy_whole_context():
    assert parse("B16").ops[0] == Copy((".",), "/src/")


def test_b17_failing_step_is_described_with_its_line():
    d = parse("B17")
    assert d.ops[1].describe() == "line 3: RUN pip install --no-cache-dir six"
    assert parse("B17", "Dockerfile.fixed").ops[1].argv[2].endswith(
        "--break-system-packages six")


def test_b18_shell_and_exec_forms():
    d = parse("B18")
    argvs = [o.argv for o in d.ops]
    assert argvs[0] == shell('echo "shell=$0" > /tmp/b18.txt')
    assert argvs[1][:2] == ("/bin/sh", "-c") and argvs[1][2].startswith('[ "$(readlink')
    assert argvs[4] == ("/bin/bash", "-c",
                        "source /tmp/b18.env && echo exec-form:$B18 >> /tmp/b18.txt")
    assert argvs[5] == ("sh", "-c", "echo literal:'$HOME' >> /tmp/b18.txt")
    assert argvs[6] == ("echo", "$HOME") and d.ops[6].shell is False
    assert argvs[7] == shell('source /tmp/b18.env && echo "source:$B18"')
    assert d.ops[7].location.line == 9
    assert d.warnings == ()  # line 3 starts with '[' but is a shell test: no warning


def test_b18_single_quoted_exec_form_falls_back_to_shell_with_hint():
    d = parse("B18", "Dockerfile.singlequote")
    assert d.ops[0].argv == shell("['echo', 'not-json']") and d.ops[0].shell
    assert len(d.warnings) == 1 and "double quotes" in d.warnings[0]
    assert d.warnings[0].startswith("line 2:")


def test_b19_plain_runs():
    d = parse("B19")
    assert [o.argv[2] for o in d.ops] == [
        'read -r answer; echo "got:[$answer]" > /tmp/b19.txt',
        "(test -t 0 && echo stdin-is-tty || echo stdin-not-tty) >> /tmp/b19.txt",
        "apt-get update && apt-get install -y tzdata && echo tz-installed >> /tmp/b19.txt"]


# -- more semantics


def test_env_pairs_see_the_environment_before_the_line():
    d = parse_dockerfile("FROM debian-minimal\nENV A=1\nENV A=2 B=$A C=${A}x\n"
                         "ENV PATH=/opt/bin:$PATH\n")
    assert [(o.key, o.value) for o in d.ops] == [
        ("A", "1"), ("A", "2"), ("B", "1"), ("C", "1x"),
        ("PATH", "/opt/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")]


def test_env_overrides_arg_and_arg_not_in_build_env():
    d = parse_dockerfile("FROM debian-minimal\nARG V=arg\nENV V=env\nRUN echo\n"
                         "WORKDIR /x/$V\n")
    assert d.ops[1].build_env == ()
    assert d.ops[2].path == "/x/env"


def test_heredoc_variants():
    text = ("FROM debian-minimal\nRUN <<A <<B\na\nA\nb\nB\n"
            "RUN cat <<-EOF > /f\n\tx\n\tEOF\nRUN 0<<EOF cat\nhi\nEOF\nRUN echo after\n")
    d = parse_dockerfile(text)
    assert d.ops[0].argv == shell("<<A <<B\na\nA\nb\nB\n")
    assert d.ops[1].argv == shell("cat <<-EOF > /f\n\tx\n\tEOF\n")
    assert d.ops[2].argv == shell("0<<EOF cat\nhi\nEOF\n")
    assert d.ops[3].argv == shell("echo after") and d.ops[3].location.line == 13


def test_copy_json_form_and_relative_dest():
    d = parse_dockerfile('FROM debian-minimal\nWORKDIR /app\nCOPY ["a b.txt", "c", "./"]\n'
                         "ADD --chown=u:g x sub/y\n")
    assert d.ops[1] == Copy(("a b.txt", "c"), "/app/")
    assert d.ops[2] == Add(("x",), "/app/sub/y", chown="u:g")


def test_warned_instructions_keep_line_numbers():
    d = parse_dockerfile("FROM debian-minimal\nEXPOSE 80\nLABEL a=b\nVOLUME /data\n"
                         "STOPSIGNAL SIGTERM\nSHELL [\"/bin/bash\", \"-c\"]\n"
                         "HEALTHCHECK CMD true\nONBUILD RUN x\nRUN true\n")
    assert len(d.ops) == 1
    assert [w.split(":")[0] for w in d.warnings] == [f"line {n}" for n in range(2, 9)]
    assert "EXPOSE ignored" in d.warnings[0]


def test_text_vs_path_input(tmp_path):
    p = tmp_path / "Dockerfile"
    p.write_text("FROM debian-minimal\nRUN true\n")
    assert parse_dockerfile(str(p)).source == str(p)
    assert parse_dockerfile("FROM debian-minimal").source == "<string>"
    assert parse_dockerfile("FROM debian-minimal", source="x/Dockerfile",
                            name="n").name == "n"


# -- errors: each names file:line and what to do


@pytest.mark.parametrize(
    ("text", "line", "needle", "hint"),
    [
        ("FROM debian-minimal\nRUN echo\nECHO hi\n", 3, "unknown instruction: ECHO",
         "missing '\\'"),
        ("RUN echo\n", 1, "RUN before FROM", "add FROM debian-minimal"),
        ("# nothing\n\n", 1, "no FROM instruction", "add FROM"),
        ("ARG X=1\n", 1, "no FROM instruction", "add FROM"),
        ("FROM nope\n", 1, "unknown base image 'nope'", "localsbx base build"),
        ("FROM debian-minimal\nCOPY --from=build a b\n", 2, "--from", "name a stage"),
        ("FROM debian-minimal\nRUN x\nCOPY --from=3 a b\n", 3, "no stage 3", "name a stage"),
        ("FROM debian-minimal AS a\nFROM debian-minimal\nCOPY --from=nope /a b\n", 3,
         "no known image or base", "registry image with its tag"),
        ("FROM debian-minimal\nCOPY --parents a b/\n", 2, "--parents is not supported",
         "--chown=USER[:GROUP]"),
        ("FROM debian-minimal\nCOPY --chmod=u+x a b\n", 2, "not an octal mode", "0755"),
        ("FROM debian-minimal\nRUN --mount=type=nope,target=/x true\n", 2, "--mount",
         "type=cache"),
        ("FROM debian-minimal\nRUN --security=insecure true\n", 2, "--security",
         "--mount=type"),
        ("FROM debian-minimal\nCOPY a b c\n", 2, "ending in '/'", "c/"),
        ("FROM debian-minimal\nRUN x\nENV A\n", 3, "ENV must have two arguments", "fix"),
        ("FROM debian-minimal\nRUN cat << EOF\nbody\n", 2, "unterminated heredoc", "EOF"),
        ("FROM debian-minimal\nENV A=\"open\n", 2, "double quote", "quotes"),
        ("FROM debian-minimal\nRUN\n", 2, "RUN needs a command", "RUN <command>"),
    ],
)
def test_errors_have_location_and_hint(text, line, needle, hint):
    with pytest.raises(DefinitionError) as exc:
        parse_dockerfile(text, known_bases=BASES, source="Dockerfile")
    err = exc.value
    assert err.location is not None and err.location.path == "Dockerfile"
    assert err.location.line == line, str(err)
    assert str(err).startswith(f"Dockerfile:{line}: ")
    assert needle in err.message
    assert err.hint and hint in err.hint


def test_spaced_heredoc_body_that_looks_like_a_heredoc_instruction():
    d = parse_dockerfile("# escape=`\nFROM debian-minimal\nRUN cat > /f << EOF\nRUN <<X\nEOF\n"
                         "ENV B=`$y\nWORKDIR /after\n")
    assert d.ops[0].argv == shell("cat > /f << EOF\nRUN <<X\nEOF\n")
    assert d.ops[1].value == "$y" and d.ops[2].path == "/after"
    assert d.ops[2].location.line == 7


def test_user_shell_cmd_entrypoint_and_copy_heredoc():
    d = parse_dockerfile(
        'FROM debian-minimal\nENV N=v\nUSER app:grp\nSHELL ["/bin/bash", "-ec"]\nRUN echo $0\n'
        'CMD ["serve", "--port", "80"]\nENTRYPOINT /bin/run\nCMD go\n'
        "COPY --chmod=0755 <<A <<'B' /dst/\n$N\nA\n$N\nB\n")
    user, run, copy = d.ops[1], d.ops[2], d.ops[3]
    assert user.user == "app:grp" and d.final_user == "app:grp"
    assert run.argv == ("/bin/bash", "-ec", "echo $0")
    assert d.entrypoint == ("/bin/bash", "-ec", "/bin/run") and d.cmd == ("/bin/bash", "-ec", "go")
    assert copy.sources == ("A", "B") and copy.inline == (("A", "v\n"), ("B", "$N\n"))
    assert any("SHELL applies" in w for w in d.warnings)


def test_multi_stage_stages_needed_and_target():
    text = ("FROM debian-minimal AS a\nENV A=1\nRUN echo a\n"
            "FROM a AS b\nRUN echo b\n"
            "FROM debian-minimal AS unused\nRUN false\n"
            "FROM debian-minimal\nCOPY --from=b /x /y\nCOPY --from=0 /z /w\n")
    d = parse_dockerfile(text)
    assert [st.key for st in d.stages] == ["0", "1"] and d.stages[1].name == "b"
    assert [op.describe() for op in d.stages[1].definition.ops] == [
        "line 2: ENV A=1", "line 3: RUN echo a", "line 5: RUN echo b"]
    assert [op.from_stage for op in d.ops] == ["1", "0"]
    t = parse_dockerfile(text, target="b")
    assert t.stages == () and len(t.ops) == 3 and t.final_env["A"] == "1"
    with pytest.raises(DefinitionError, match="no stage of that name"):
        parse_dockerfile(text, target="nope")


def test_run_mounts():
    d = parse_dockerfile(
        "FROM debian-minimal AS b\nRUN true\nFROM debian-minimal\nWORKDIR /w\n"
        "RUN --mount=type=cache,target=cache --mount=type=secret,id=tok "
        "--mount=type=tmpfs,target=/scratch --mount=type=bind,from=b,source=/etc,target=/m "
        "--network=none cat /run/secrets/tok\n")
    run = d.ops[-1]
    assert [(m.type, m.target, m.id) for m in run.mounts] == [
        ("cache", "/w/cache", "cache"), ("secret", "/run/secrets/tok", "tok"),
        ("tmpfs", "/scratch", ""), ("bind", "/m", "")]
    assert run.mounts[3].from_stage == "0" and [st.key for st in d.stages] == ["0"]
    assert run.argv == ("/bin/sh", "-c", "cat /run/secrets/tok")


def test_copy_from_a_name_that_is_no_stage_names_an_image():
    """BuildKit: ``--from`` that names no earlier stage is an image reference (a registered
    image, a base or a registry image, resolved as FROM is)."""
    d = parse_dockerfile(
        "FROM debian-minimal AS b\nRUN true\nFROM debian-minimal\nCOPY --from=b /x /y\n"
        "COPY --from=tools /t /t\nCOPY --from=127.0.0.1:5000/x/y:1 /u /u\n"
        "COPY --from=debian-minimal /etc/os-release /o\n",
        known_bases={"debian-minimal", "tools"})
    assert [(op.from_stage, op.from_image) for op in d.ops] == [
        ("0", None), (None, "tools"), (None, "127.0.0.1:5000/x/y:1"), (None, "debian-minimal")]
    assert [st.key for st in d.stages] == ["0"]  # images are no stages
    assert d.to_json()["ops"][1]["from_image"] == "tools"
    assert "from_image" not in d.to_json()["ops"][0]


def test_image_refs_lists_stage_bases_and_copied_images():
    from localsbx.build.steps import image_refs, uses_images

    d = parse_dockerfile(
        "FROM img-a AS a\nCOPY --from=tool:1 /x /x\nFROM debian-minimal\n"
        "COPY --from=a /x /x\nCOPY --from=tool:2 /y /y\n")
    assert image_refs(d) == ["img-a", "tool:1", "tool:2"]
    assert uses_images(d.ops) and not uses_images(d.ops[:1])


def test_bare_env_is_an_error_as_in_buildkit():
    """BuildKit: 'ENV requires at least one argument' (it was accepted with a warning)."""
    from localsbx.errors import DefinitionError

    with pytest.raises(DefinitionError, match="^D:2: ENV requires at least one argument"):
        parse_dockerfile("FROM debian-minimal\nENV\n", known_bases=["debian-minimal"],
                         source="D")
