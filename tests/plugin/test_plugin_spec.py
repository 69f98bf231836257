"""The marker / fixture / option merge (conftest_plugin/spec.py): pure, no VM."""

from pathlib import Path

import pytest

from conftest_plugin import spec as S
from localsbx.definition.dsl import Image

HERE = Path("/proj/tests")


def test_closest_marker_source_wins_and_shape_merges_key_by_key():
    marks = [
        ((), {"cpus": 2}),                                   # the test
        ((), {"image": "cls-img", "memory_mb": 2048}),       # its class
        ((), {"dockerfile": "Dockerfile", "cpus": 4, "timeout_secs": 30}),  # its module
    ]
    spec = S.from_markers(marks, HERE)
    assert spec.image == "cls-img" and spec.dockerfile is None
    assert (spec.cpus, spec.memory_mb, spec.timeout_secs) == (2, 2048, 30)
    assert spec.create_kwargs() == {"cpus": 2, "memory_mb": 2048, "timeout_secs": 30}


def test_relative_dockerfile_and_context_are_from_the_test_folder():
    spec = S.from_markers([((), {"dockerfile": "img/Dockerfile"})], HERE)
    assert spec.dockerfile == HERE / "img/Dockerfile"
    assert spec.context == HERE / "img"  # the Dockerfile's folder by default
    spec = S.from_markers([((), {"dockerfile": "/abs/Dockerfile", "context": "ctx"})], HERE)
    assert spec.dockerfile == Path("/abs/Dockerfile") and spec.context == HERE / "ctx"


def test_positional_argument_is_the_image_name():
    assert S.from_markers([(("web",), {})], HERE).image == "web"


@pytest.mark.parametrize("args,kwargs,message", [
    ((), {"image": "a", "dockerfile": "D"}, "only one of image=, dockerfile=, definition="),
    ((), {"imgae": "a"}, "unknown argument(s) imgae"),
    ((), {"image": "a", "context": "."}, "context= only applies"),
    ((), {"cpus": "2"}, "cpus= must be an int"),
    ((), {"memory_mb": 0}, "memory_mb=0 is out of range"),
    (("a", "b"), {}, "at most one positional"),
    ((), {"image": Path("x")}, "image= must be a registered image name"),
])
def test_malformed_markers_say_what_is_wrong(args, kwargs, message):
    with pytest.raises(S.SpecError) as ei:
        S.from_markers([(args, kwargs)], HERE)
    assert message in str(ei.value)


def test_fallback_only_when_no_marker_names_a_source():
    fixture = S.from_value("fix-img", HERE, "fixture")
    shaped = S.merge(S.from_markers([((), {"cpus": 2})], HERE), fixture)
    assert shaped.image == "fix-img" and shaped.cpus == 2 and shaped.origin == "fixture"
    marked = S.merge(S.from_markers([((), {"image": "m"})], HERE), fixture)
    assert marked.image == "m" and marked.origin == "marker"


def test_fixture_values_name_path_or_definition():
    assert S.from_value("web", HERE, "option").image == "web"
    assert S.from_value("sub/Dockerfile", HERE, "option").dockerfile == HERE / "sub/Dockerfile"
    assert S.from_value(Path("/x/Dockerfile"), HERE, "fixture").context == Path("/x")
    img = Image(name="t").run("true")
    assert S.from_value(img, HERE, "fixture").definition is img
    assert not S.from_value(None, HERE, "option").has_source
    assert not S.from_value("  ", HERE, "option").has_source
    with pytest.raises(S.SpecError, match="must be an image name"):
        S.from_value(42, HERE, "fixture")


def test_factory_arguments_override_the_test_spec():
    base = S.SandboxSpec(image="a", cpus=2, timeout_secs=60)
    s = S.override_kwargs(base, {"memory_mb": 512}, HERE)
    assert (s.image, s.cpus, s.memory_mb, s.timeout_secs) == ("a", 2, 512, 60)
    s = S.override_kwargs(base, {"image": "b", "cpus": 1}, HERE)
    assert (s.image, s.cpus, s.timeout_secs) == ("b", 1, 60)
    s = S.override_kwargs(base, {"dockerfile": "D"}, HERE)
    assert s.image is None and s.dockerfile == HERE / "D" and s.cpus == 2


def test_registered_names_are_valid_and_stable(tmp_path):
    from conftest_plugin.images import _definition
    from localsbx import store

    df = tmp_path / "my app!" / "Dockerfile"
    df.parent.mkdir()
    df.write_text("FROM debian-minimal\nRUN true\n")
    _, n1, ctx = _definition(S.SandboxSpec(dockerfile=df, context=df.parent))
    _, n2, _ = _definition(S.SandboxSpec(dockerfile=df, context=df.parent))
    assert n1 == n2 and n1.startswith("pytest-my-app-") and ctx == df.parent
    store.check_name("image", n1)
    _, n3, _ = _definition(S.SandboxSpec(definition=Image(name="web").run("true")))
    _, n4, _ = _definition(S.SandboxSpec(definition=Image(name="web").run("false")))
    assert n3.startswith("pytest-web-") and n3 != n4
    store.check_name("image", n3)


def test_report_section_text():
    from conftest_plugin.report import format_sandbox
    from localsbx.sandbox import HistoryEntry

    hist = [
        HistoryEntry(["/bin/sh", "-c", "echo hi"], 0, "exited", "hi\n", "", 0.1),
        HistoryEntry(["ls", "/nope"], 2, "exited", "", "ls: cannot access '/nope'\n", 0.05),
        HistoryEntry(["sleep", "9"], 137, "signaled", "", "", 1.0),
        HistoryEntry(["sh", "-c", "yes | head -50"], None, "timed_out",
                     "".join(f"y{i}\n" for i in range(50)), "", 2.0),
    ]
    text = format_sandbox("abc123", "img", hist, alive=False, serial_log=Path("/nonexistent/s"),
                          kept=True)
    assert "sandbox abc123 (image img): its VM is gone" in text
    assert "$ echo hi\n    -> exit 0" in text
    assert "$ ls /nope\n    -> exit 2" in text and "| ls: cannot access '/nope'" in text
    assert "killed by SIGKILL (exit 137)" in text
    assert "timed out" in text and "| y49" in text and "(38 earlier lines)" in text
    assert "serial log tail (/nonexistent/s)" in text and "is gone" in text
    assert "localsbx exec -it abc123 -- sh" in text
