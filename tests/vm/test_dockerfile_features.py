"""Dockerfile features on real QEMU (issue 8): USER at build and run time, SHELL, a
three-stage build, an image FROM another registered image. Byte-level agreement with
BuildKit is the differential suite's job (tests/diff)."""

import time

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


def test_cp_of_a_folder_into_an_image_with_user_writes_as_root(user_image, tmp_path):
    """``docker cp`` extracts as root whatever the image's USER: a folder into /root and
    into the USER's own home both arrive whole, with their modes (the folder upload used to
    run tar as the USER: 'Cannot change ownership', 'Cannot mkdir: Permission denied')."""
    src = tmp_path / "dirin"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "y").write_text("why\n")
    (src / "x.sh").write_text("#!/bin/sh\n")
    (src / "x.sh").chmod(0o750)
    with Sandbox.create(user_image) as sb:
        sb.upload(src, "/root/dirin")
        sb.upload(src, "/home/app/dirin")
        for d in ("/root/dirin", "/home/app/dirin"):
            r = sb.run(f"cat {d}/sub/y; stat -c %a {d}/x.sh", user="root")
            assert r.stdout == "why\n750\n", r.stderr


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


# ---- other images' roots (COPY --from=IMAGE, stages FROM other images, resuming)

SRC_IMAGE = """\
FROM debian-minimal
RUN mkdir -p /opt/tool/sub && echo {v} > /opt/tool/v && ln -s v /opt/tool/link \\
    && echo s > /opt/tool/sub/s && chown -R 1234:2345 /opt/tool/sub
ENV SRC_IMG=1
WORKDIR /srcwd
"""

COPY_FROM_IMAGE = """\
FROM debian-minimal
RUN echo before > /before
COPY --from=t-src-img /opt/tool /tool/
COPY --from=t-src-img --chown=5:6 --chmod=640 /opt/tool/link /v2
COPY --from=debian-minimal /etc/debian_version /bin/sh /from-base/
"""


@pytest.fixture(scope="module")
def src_image(base_ready, tmp_path_factory):
    _build(SRC_IMAGE.format(v="v1"), "t-src-img", tmp_path_factory.mktemp("src"))
    return "t-src-img"


def test_copy_from_a_registered_image_and_a_base(src_image, tmp_path):
    """BuildKit: --from naming no stage is an image; owners kept, --chown/--chmod applied,
    a named symlink followed."""
    _build(COPY_FROM_IMAGE, "t-copy-from-img", tmp_path)
    with Sandbox.create("t-copy-from-img") as sb:
        r = sb.run("cat /tool/v /tool/sub/s /v2; readlink /tool/link; stat -c '%u:%g %a' "
                   "/tool/sub/s /v2; cmp /from-base/debian_version /etc/debian_version && "
                   "cmp /from-base/sh /usr/bin/dash && test ! -L /from-base/sh && echo same; "
                   "ls /srcwd 2>&1 >/dev/null; echo rc=$?")
        assert r.stdout.startswith("v1\ns\nv1\nv\n1234:2345 644\n5:6 640\nsame\n"), r.stdout
        assert r.stdout.endswith("rc=2\n"), r.stdout  # only the files copied, not the image
    # a new build of the source image changes the key of the COPY (its digest is in it)
    (tmp_path / "v2").mkdir()
    v2 = f"v2-{time.time_ns()}"  # new in every run: the step cache outlives a test run
    _build(SRC_IMAGE.format(v=v2), "t-src-img", tmp_path / "v2")
    rep = _Lines()
    (tmp_path / "Dockerfile").write_text(COPY_FROM_IMAGE)
    build_image(parse_dockerfile(tmp_path / "Dockerfile", name="t-copy-from-img"),
                context_dir=tmp_path, name="t-copy-from-img", reporter=rep)
    assert any("[1/4] CACHED" in ln for ln in rep.lines), rep.lines
    assert not any("[2/4] CACHED" in ln for ln in rep.lines), rep.lines
    with Sandbox.create("t-copy-from-img") as sb:
        assert sb.run("cat /tool/v").stdout == v2 + "\n"


def test_copy_from_an_unknown_image_is_a_located_error(base_ready, tmp_path):
    from localsbx.errors import DefinitionError

    (tmp_path / "Dockerfile").write_text("FROM debian-minimal\nRUN true\n"
                                         "COPY --from=t-no-such-image /x /y\n")
    with pytest.raises(DefinitionError) as exc:  # known names not checked at parse here
        build_image(parse_dockerfile(tmp_path / "Dockerfile", name="t-bad-from"),
                    context_dir=tmp_path, name="t-bad-from")
    assert f"{tmp_path / 'Dockerfile'}:3: COPY --from=t-no-such-image" in str(exc.value)
    assert exc.value.hint
    with pytest.raises(Exception, match="no image named"):
        store.lookup_image("t-bad-from")


STAGES_ON_OTHER_ROOTS = """\
FROM t-src-img AS a
RUN cat /opt/tool/v > got-v && echo "$SRC_IMG" > got-env && pwd > got-pwd
FROM debian-minimal AS b
RUN echo b > /b
FROM t-src-img
COPY --from=a /srcwd/ /from-a/
COPY --from=b /b /from-b
RUN test ! -e /b && cat /from-b > /b-seen
"""


def test_stages_on_other_bases(src_image, tmp_path):
    """A stage FROM a registered image while the image is FROM debian-minimal, and the
    other way round: each stage RUNs chrooted in an overlay of its own base's root."""
    _build(STAGES_ON_OTHER_ROOTS, "t-stage-roots", tmp_path)
    with Sandbox.create("t-stage-roots") as sb:
        r = sb.run("cat /from-a/got-v /from-a/got-env /from-a/got-pwd /b-seen; cat /opt/tool/v")
        v = store.lookup_image(src_image)  # whichever version the module built last
        assert r.stdout.split("\n")[1:4] == ["1", "/srcwd", "b"], r.stdout
        assert r.stdout.split("\n")[0] == r.stdout.split("\n")[4], (r.stdout, v.digest)


STAGED_RESUME = """\
FROM debian-minimal AS b
RUN echo stage > /s
FROM debian-minimal
RUN echo one > /one
RUN echo {step} > /two
COPY --from=b /s /s
"""


class _Lines:
    def __init__(self):
        self.lines = []

    def say(self, text):
        self.lines.append(text)

    def output(self, chunk):
        pass


def test_resumed_build_reading_a_stage_keeps_its_cached_prefix(base_ready, tmp_path):
    _build(STAGED_RESUME.format(step="a"), "t-stage-resume", tmp_path)
    rep = _Lines()
    step = f"b{time.time_ns()}"  # new in every run: the step cache outlives a test run
    (tmp_path / "Dockerfile").write_text(STAGED_RESUME.format(step=step))
    build_image(parse_dockerfile(tmp_path / "Dockerfile", name="t-stage-resume"),
                context_dir=tmp_path, name="t-stage-resume", reporter=rep)
    assert any(ln.startswith("[1/3] CACHED") for ln in rep.lines), rep.lines
    assert any("resuming after step 1" in ln for ln in rep.lines), rep.lines
    with Sandbox.create("t-stage-resume") as sb:
        assert sb.run("cat /one /two /s").stdout == f"one\n{step}\nstage\n"
