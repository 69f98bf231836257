"""Dockerfile features on real QEMU (issue 8): USER at build and run time, SHELL, a
three-stage build, an image FROM another registered image. Byte-level agreement with
BuildKit is the differential suite's job (tests/diff)."""

import pytest

from localsbx import Sandbox, store
from localsbx.build.builder import build_image
from localsbx.definition.dockerfile import parse_dockerfile

pytestmark = pytest.mark.vm

USER_SHELL = """\
FROM debian-minimal
RUN useradd -m -u 1234 app
USER app
RUN id -un > /home/app/built-by
SHELL ["/bin/bash", "-c"]
RUN echo "bash ${BASH_VERSINFO[0]}" > /home/app/shell
WORKDIR /home/app/work
CMD ["sleep", "infinity"]
"""

THREE_STAGES = """\
FROM debian-minimal AS one
RUN mkdir /out && echo one > /out/one
FROM one AS two
RUN echo two > /out/two && chown 1234:1234 /out/two
FROM debian-minimal AS never
RUN false
FROM debian-minimal
COPY --from=two /out /from-two/
COPY --from=one /out/one /from-one
"""


def _build(text, name, tmp_path, **kw):
    (tmp_path / "Dockerfile").write_text(text)
    return build_image(parse_dockerfile(tmp_path / "Dockerfile", name=name, **kw),
                       context_dir=tmp_path, name=name)


@pytest.fixture(scope="module")
def user_image(base_ready, tmp_path_factory):
    _build(USER_SHELL, "t-user-shell", tmp_path_factory.mktemp("user"))
    return "t-user-shell"


def test_user_at_build_and_run_time(user_image):
    rec = store.lookup_image(user_image)
    assert rec.user == "app" and rec.meta.definition["cmd"] == ["sleep", "infinity"]
    with Sandbox.create(user_image) as sb:
        assert sb.run("cat /home/app/built-by").stdout == "app\n"
        r = sb.run("id -un; echo $HOME; pwd")
        assert r.stdout == "app\n/home/app\n/home/app/work\n", r.stderr
        assert sb.run("id -un", user="root").stdout == "root\n"
        assert sb.run("stat -c %U /home/app/work").stdout == "app\n"  # WORKDIR as USER


def test_shell_applies_to_later_steps(user_image):
    with Sandbox.create(user_image) as sb:
        out = sb.run("cat /home/app/shell").stdout
        assert out.startswith("bash ") and out.strip()[5:].isdigit(), out


def test_three_stage_build(base_ready, tmp_path):
    _build(THREE_STAGES, "t-three-stages", tmp_path)
    with Sandbox.create("t-three-stages") as sb:
        r = sb.run("cat /from-two/one /from-two/two /from-one; stat -c '%u:%g' /from-two/two;"
                   " ls /out 2>&1; echo rc=$?")
        assert r.stdout.startswith("one\ntwo\none\n1234:1234\n"), r.stdout
        assert r.stdout.endswith("rc=2\n"), r.stdout  # the stages' own files are not in it


def test_image_from_a_registered_image(user_image, tmp_path):
    _build("FROM t-user-shell\nENV CHILD=1\nRUN cat /home/app/built-by > child-saw\n",
           "t-child", tmp_path)
    rec = store.lookup_image("t-child")
    assert rec.meta.base == "debian-minimal" and rec.user == "app"
    with Sandbox.create("t-child") as sb:
        r = sb.run("cat child-saw; echo $CHILD; pwd; id -un")
        assert r.stdout == "app\n1\n/home/app/work\napp\n", r.stderr
    store.remove_image(user_image)  # the child does not need the parent's folder
    with Sandbox.create("t-child") as sb:
        assert sb.run("cat /home/app/shell").exit_code == 0


def test_secret_readable_in_its_step_and_absent_from_the_image(base_ready, tmp_path):
    (tmp_path / "tok.txt").write_text("s3cret-value-4711")
    text = ("FROM debian-minimal\nRUN --mount=type=secret,id=tok wc -c < /run/secrets/tok"
            " > /seen\n")
    (tmp_path / "Dockerfile").write_text(text)
    build_image(parse_dockerfile(tmp_path / "Dockerfile", name="t-secret"),
                context_dir=tmp_path, name="t-secret", secrets={"tok": tmp_path / "tok.txt"})
    rec = store.lookup_image("t-secret")
    assert "s3cret-value-4711" not in (rec.path / "image.json").read_text()
    with Sandbox.create("t-secret") as sb:
        r = sb.run("cat /seen; ls /run/secrets 2>&1; grep -rs s3cret-value-4711 /etc /root /tmp"
                   " /var /seen; echo rc=$?")
        assert r.stdout.startswith("17\n") and r.stdout.endswith("rc=1\n"), r.stdout
        assert "tok" not in r.stdout


def test_cache_mount_survives_builds_not_in_the_image(base_ready, tmp_path):
    first = ("FROM debian-minimal\nRUN --mount=type=cache,id=t-cache-vm,target=/cache "
             "echo kept > /cache/n\n")
    _build(first, "t-cache-1", tmp_path)
    second = ("FROM debian-minimal\nRUN --mount=type=cache,id=t-cache-vm,target=/cache "
              "cp /cache/n /seen\n")
    _build(second, "t-cache-2", tmp_path)
    with Sandbox.create("t-cache-2") as sb:
        r = sb.run("cat /seen; ls /cache >/dev/null 2>&1; echo rc=$?")
        assert r.stdout == "kept\nrc=2\n", r.stdout
