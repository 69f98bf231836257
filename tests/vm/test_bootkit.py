"""Any rootfs boots (issue 9): the boot kit (agent + SSH server in the initramfs) is not in
the user's filesystem. Real QEMU: a base exported and imported under another name, a
busybox-only rootfs with no libc (Debian's busybox-static), and a rootfs with no shell at
all (one static binary and its files) each build an image and answer in a sandbox."""

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from localsbx import Sandbox, base, rootfs
from localsbx.build.builder import build_image
from localsbx.definition.dockerfile import parse_dockerfile

pytestmark = pytest.mark.vm

HELLO_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "--write")) {
        FILE *f = fopen(argv[2], "w");
        if (!f) return 3;
        fprintf(f, "written by a RUN step\n");
        return fclose(f) ? 4 : 0;
    }
    char buf[256] = "";
    FILE *c = fopen("/etc/hello.conf", "r");
    if (c) { if (!fgets(buf, sizeof buf, c)) buf[0] = 0; fclose(c); }
    const char *g = getenv("GREETING");
    printf("%s from a shell-less rootfs; conf=%s", g ? g : "(no GREETING)", buf);
    return 0;
}
"""


def _tar(tree: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as t:
        for p in sorted(tree.rglob("*")):
            info = t.gettarinfo(str(p), arcname=str(p.relative_to(tree)))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            t.addfile(info, open(p, "rb") if p.is_file() and not p.is_symlink() else None)
    return out


def _build(tmp_path: Path, name: str, dockerfile: str):
    df = tmp_path / f"{name}.Dockerfile"
    df.write_text(dockerfile)
    defn = parse_dockerfile(df, name=name, known_bases=base.known_base_names())
    return build_image(defn, context_dir=tmp_path, name=name, force=True)


def test_exported_base_imported_under_another_name_builds_and_runs(base_ready, tmp_path):
    archive = rootfs.export_base("debian-minimal", tmp_path / "dm.localsbx-base.tar")
    copy = rootfs.import_base("t-dm-copy", archive, force=True)
    assert copy.digest == base_ready.digest  # the same base, under another name
    _build(tmp_path, "t-dm-copy-img", "FROM t-dm-copy\nRUN echo from-the-copy > /made\n")
    with Sandbox.create("t-dm-copy-img") as sb:
        r = sb.run("cat /made; . /etc/os-release; echo $ID")
        assert (r.exit_code, r.stdout) == (0, "from-the-copy\ndebian\n"), r.stderr


def test_busybox_only_rootfs_without_libc(base_ready, tmp_path):
    bb = shutil.which("busybox") or "/bin/busybox"
    tree = tmp_path / "bb"
    (tree / "bin").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "root").mkdir()
    shutil.copy(bb, tree / "bin" / "busybox")
    applets = subprocess.run([bb, "--list"], capture_output=True, text=True, check=True)
    for a in applets.stdout.split():
        if a != "busybox":
            (tree / "bin" / a).symlink_to("busybox")
    (tree / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                         "nobody:x:65534:65534:nobody:/:/bin/false\n")
    (tree / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    rootfs.import_base("t-busybox", _tar(tree, tmp_path / "bb.tar.gz"), force=True)
    _build(tmp_path, "t-busybox-img",
           "FROM t-busybox\nENV WHO=busybox\nRUN echo \"made by $WHO\" > /made && mkdir /app\n"
           "WORKDIR /app\nRUN id -un > whoami\n")
    with Sandbox.create("t-busybox-img") as sb:
        r = sb.run("cat /made whoami; pwd; ls /lib /usr/lib/x86_64-linux-gnu 2>&1 | head -n 1")
        assert r.exit_code == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[:3] == ["made by busybox", "root", "/app"], r.stdout
        assert "No such file" in lines[3], r.stdout  # no libc anywhere
        r = sb.run(["id", "-un"], user="nobody")  # the agent reads the rootfs's /etc/passwd
        assert (r.exit_code, r.stdout) == (0, "nobody\n"), r.stderr


def test_shell_less_rootfs_static_binary_exec_form(base_ready, tmp_path):
    tree = tmp_path / "noshell"
    (tree / "etc").mkdir(parents=True)
    src = tmp_path / "hello.c"
    src.write_text(HELLO_C)
    subprocess.run(["gcc", "-static", "-Os", "-s", "-o", str(tree / "hello"), str(src)], check=True)
    (tree / "etc" / "hello.conf").write_text("its own file\n")
    rootfs.import_base("t-noshell", _tar(tree, tmp_path / "noshell.tar.gz"), force=True)
    _build(tmp_path, "t-noshell-img",
           'FROM t-noshell\nENV GREETING=salut\nRUN ["/hello", "--write", "/made"]\n')
    with Sandbox.create("t-noshell-img") as sb:
        r = sb.run(["/hello"])  # a list: exec form, no shell
        assert (r.exit_code, r.stdout) == (
            0, "salut from a shell-less rootfs; conf=its own file\n"), r.stderr
        assert sb.read_file("/made") == b"written by a RUN step\n"
        r = sb.run("echo no shell here")  # shell form: /bin/sh is not there
        assert r.exit_code == 127, (r.exit_code, r.stdout, r.stderr)
