"""The Python DSL: Tensorlake's names, its Dockerfile rendering, and IR equal to the Dockerfile's."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from localsbx.definition.dockerfile import parse_dockerfile
from localsbx.definition.dsl import Image
from localsbx.definition.ops import Add, Copy, Env, Run, Workdir
from localsbx.errors import DefinitionError

CASES = Path(__file__).resolve().parent.parent / "cases"


def b07_image() -> Image:
    img = Image(name="b07", base_image="debian-minimal")
    for key, value in [("APP_TITLE", "Hello World"), ("APP_MODE", "prod"),
                       ("QUOTED_KEY", "quoted value"), ("SINGLE", "it is single"),
                       ("ESCAPED", "one two"), ("EMPTY", ""), ("AFTER_EMPTY", "yes"),
                       ("JSONISH", '{"a": 1}')]:
        img.env(key, value)
    return img.run("printf '[%s]\\n' \"$APP_TITLE\" \"$APP_MODE\" \"$QUOTED_KEY\" \"$SINGLE\" "
                   "\"$ESCAPED\" \"$EMPTY\" \"$AFTER_EMPTY\" \"$JSONISH\" > /tmp/b07.txt")


def test_defaults_and_properties():
    img = Image()
    assert (img.name, img.tag) == ("default", "latest")
    assert img.to_definition().base == "debian-minimal"
    assert img.to_definition().name == "default"


def test_b07_dsl_equals_dockerfile():
    dsl = b07_image().to_definition()
    df = parse_dockerfile(CASES / "B07" / "Dockerfile", name="b07")
    assert dsl.ops == df.ops
    assert dsl.digest() == df.digest()
    assert [(o.key, o.value) for o in dsl.ops if isinstance(o, Env)][-3:] == [
        ("EMPTY", ""), ("AFTER_EMPTY", "yes"), ("JSONISH", '{"a": 1}')]


def test_b07_rendering_is_tensorlakes_and_parses_back_to_the_same_ir():
    img = b07_image()
    text = img.dockerfile()
    assert text.splitlines()[:2] == ["FROM debian-minimal", 'ENV APP_TITLE="Hello World"']
    assert 'ENV JSONISH="{\\"a\\": 1}"' in text and 'ENV EMPTY=""' in text
    assert not text.endswith("\n")
    assert parse_dockerfile(text, name="b07").ops == img.to_definition().ops


def test_run_copy_workdir_match_dockerfile():
    img = (Image(name="x").workdir("/srv/app").workdir("sub").workdir("../other/./deep")
           .workdir("~/tilde").copy("hello.txt", "./").copy("run.sh", "/opt/tools/run.sh",
                                                            {"chown": "1234", "chmod": "0750"})
           .add("bundle.tar.gz", "/opt/").run('["echo", "$HOME"]').run("echo hi"))
    df = parse_dockerfile(img.dockerfile(), name="x")
    dsl = img.to_definition()
    assert dsl.ops == df.ops
    assert [o.path for o in dsl.ops if isinstance(o, Workdir)] == [
        "/srv/app", "/srv/app/sub", "/srv/app/other/deep", "/srv/app/other/deep/~/tilde"]
    assert dsl.ops[4] == Copy(("hello.txt",), "/srv/app/other/deep/~/tilde/")
    assert dsl.ops[5] == Copy(("run.sh",), "/opt/tools/run.sh", chown="1234", chmod="0750")
    assert dsl.ops[6] == Add(("bundle.tar.gz",), "/opt/")
    assert dsl.ops[7] == Run(("echo", "$HOME"), shell=False)  # JSON text = exec form
    assert dsl.ops[8] == Run(("/bin/sh", "-c", "echo hi"))


def test_run_list_is_joined_into_one_command_like_tensorlake():
    img = Image().run(["apt-get update", "&&", "apt-get install -y curl"])
    assert img.dockerfile().splitlines()[-1] == "RUN apt-get update && apt-get install -y curl"
    (op,) = img.to_definition().ops
    assert op.argv == ("/bin/sh", "-c", "apt-get update && apt-get install -y curl")


def test_multiline_run_heredoc_and_error():
    img = Image().run("cat > /f <<'EOF'\nWORKDIR /not/an/instruction\nEOF")
    (op,) = img.to_definition().ops
    assert op.argv == ("/bin/sh", "-c", "cat > /f <<'EOF'\nWORKDIR /not/an/instruction\nEOF\n")
    with pytest.raises(DefinitionError) as exc:
        Image().run("echo a").run("echo b\necho c").to_definition()
    assert exc.value.location.line == 2 and "<dsl>:2" in str(exc.value)
    assert "heredoc" in exc.value.hint


def test_env_values_are_literal_in_the_dsl():
    (op,) = Image().env("PRICE", "$5 and ${X:-y}").to_definition().ops
    assert op == Env("PRICE", "$5 and ${X:-y}")


def test_build_args_in_base_and_run():
    img = Image(base_image="${BASE}").env("B", "env").run("echo")
    assert img.dockerfile({"BASE": "x", "A": "1"}).splitlines() == [
        "ARG A", "ARG BASE", "FROM ${BASE}", "ARG A", "ARG BASE", 'ENV B="env"', "RUN echo"]
    d = img.to_definition({"BASE": "ubuntu-minimal", "A": "1", "B": "arg"})
    assert d.base == "ubuntu-minimal"
    assert d.ops[1].build_env == (("A", "1"), ("BASE", "ubuntu-minimal"))  # ENV B wins
    with pytest.raises(ValueError):
        img.dockerfile({"bad-name": "1"})


def test_bad_options_are_definition_errors():
    with pytest.raises(DefinitionError) as exc:
        Image().copy("a", "b", {"from": "builder"}).to_definition()
    assert "single-stage" in exc.value.message and exc.value.location.path == "<dsl>"
    with pytest.raises(DefinitionError, match="run\\(\\) command #1 options: RUN flag --frob"):
        Image().run("x", {"frob": "1"}).to_definition()
    with pytest.raises(DefinitionError, match="needs type=cache"):
        Image().run("x", {"mount": "type=weird"}).to_definition()
    with pytest.raises(DefinitionError, match="bad variable name"):
        Image().env("A B", "x").to_definition()


def test_run_options_render_as_tensorlake_does_and_mean_what_run_flags_mean():
    """Issue 8: ``options`` become ``--key=value`` flags (Tensorlake's render_op_line), so
    ``run(..., {"mount": "type=cache,target=/root/.cache"})`` is a cache mount."""
    img = Image().run("pip install x", {"mount": "type=cache,target=/root/.cache"})
    assert img.dockerfile().splitlines()[-1] == \
        "RUN --mount=type=cache,target=/root/.cache pip install x"
    [run] = img.to_definition({"A": "1"}).ops
    assert run.argv == ("/bin/sh", "-c", "pip install x") and run.build_env == (("A", "1"),)
    [m] = run.mounts
    assert (m.type, m.target) == ("cache", "/root/.cache")
    d = Image().run("true", {"network": "none"}).to_definition()
    assert d.warnings == ("run() command #1: RUN --network=none ignored (build steps have "
                          "the build VM's network)",)


def test_build_calls_the_builder_lazily(monkeypatch):
    calls = {}

    def build_image(definition, *, context_dir, name=None, project=None):
        calls.update(definition=definition, context_dir=context_dir, name=name,
                     project=project)
        return "record"

    mod = types.ModuleType("localsbx.build.builder")
    mod.build_image = build_image
    monkeypatch.setitem(sys.modules, "localsbx.build.builder", mod)
    img = Image(name="web").run("true")
    assert img.build(context_dir="ctx", cpus=2.5, memory_mb=2048, project="p",
                     is_public=True) == "record"
    assert calls["name"] == "web" and calls["context_dir"] == "ctx"
    assert calls["project"] == "p"
    assert (calls["definition"].build_cpus, calls["definition"].build_memory_mb) == (3, 2048)
    img.build(registered_name="other")
    assert calls["name"] == "other" and calls["definition"].build_cpus == 2


def test_emit_gets_tensorlakes_build_events_and_verbose_prints_them(monkeypatch, capsys):
    from localsbx.build import builder

    def fake_build(definition, *, context_dir, name=None, project=None, reporter):
        reporter.say("[1/1] line 1: RUN true")
        reporter.output(b"hello\npart")
        reporter.output(b"ial\nlast")
        reporter.say("warning: SHELL has no effect at sandbox run time")
        return types.SimpleNamespace(digest="d" * 64, name=name)

    monkeypatch.setattr(builder, "build_image", fake_build)
    events: list[dict] = []
    Image(name="web").run("true").build(emit=events.append)
    assert events == [
        {"type": "status", "message": "[1/1] line 1: RUN true"},
        {"type": "build_log", "stream": "stdout", "message": "hello"},
        {"type": "build_log", "stream": "stdout", "message": "partial"},
        {"type": "build_log", "stream": "stdout", "message": "last"},
        {"type": "status", "message": "warning: SHELL has no effect at sandbox run time"},
        {"type": "image_registered", "image_id": "d" * 64, "name": "web",
         "snapshot_id": "d" * 64},
    ]
    Image(name="web").run("true").build(verbose=True)  # Tensorlake's stderr format
    err = capsys.readouterr().err
    assert "[status] [1/1] line 1: RUN true\n" in err and "[stdout] partial\n" in err

    def boom(event):
        raise RuntimeError("stop the build")

    with pytest.raises(RuntimeError, match="stop the build"):  # as Tensorlake's: propagates
        Image(name="web").run("true").build(emit=boom)
