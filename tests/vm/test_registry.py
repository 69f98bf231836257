"""FROM a registry image (issue 9), on a real local registry: Debian's docker-registry on
127.0.0.1 (plain HTTP), images made here with umoci (a Python one from the debian-minimal
tree, a busybox-only one) pushed with skopeo, then built FROM, then built again with the
registry stopped (layers cached by digest, offline once pulled)."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from localsbx import Sandbox, base
from localsbx.build.builder import build_image
from localsbx.definition.dockerfile import parse_dockerfile
from localsbx.errors import BaseImageError

pytestmark = pytest.mark.vm
HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, REGISTRY_HTTP_ADDR=self.addr,
                   REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY=str(self.root / "data"))
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(HERE / "registry" / "config.yml")], env=env,
            stdin=subprocess.DEVNULL, stdout=open(self.root / "registry.log", "ab"),
            stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            assert self.proc.poll() is None, (self.root / "registry.log").read_text()
            time.sleep(0.1)
        raise AssertionError("registry did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    if not shutil.which("docker-registry"):
        pytest.fail("docker-registry is not installed (apt-get install docker-registry skopeo umoci)")
    reg = Registry(tmp_path_factory.mktemp("registry"))
    reg.start()
    yield reg
    reg.stop()


@pytest.fixture
def made_here():
    """Removes, after the test, the images it registers and the oci-* bases it pulled
    (each run pushes new digests: without this the store grows by a base per run)."""
    from localsbx import store

    before = {p.name for p in base.paths.bases_dir().glob("oci-*")}
    images: list[str] = []
    yield images
    for name in images:
        with contextlib.suppress(Exception):
            store.remove_image(name)
    for p in base.paths.bases_dir().glob("oci-*"):
        if p.name not in before:
            shutil.rmtree(p, ignore_errors=True)


def push_tree(tree: Path, work: Path, dest: str, *, env=(), workdir=None, cmd=None) -> None:
    """An OCI image of ``tree`` (one layer) with a config, made by umoci, pushed by skopeo."""
    layout, bundle = work / "layout", work / "bundle"
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("umoci", "init", "--layout", str(layout))
    run("umoci", "new", "--image", f"{layout}:t")
    run("umoci", "unpack", "--image", f"{layout}:t", str(bundle))
    run("cp", "-a", f"{tree}/.", str(bundle / "rootfs"))
    run("umoci", "repack", "--image", f"{layout}:t", str(bundle))
    cfg = [f"--config.env={e}" for e in env]
    if workdir:
        cfg.append(f"--config.workingdir={workdir}")
    for c in cmd or ():
        cfg.append(f"--config.cmd={c}")
    run("umoci", "config", "--image", f"{layout}:t", *cfg)
    run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:t",
        f"docker://{dest}")


def debian_tree(base_info, work: Path) -> Path:
    """The debian-minimal tree (python3 included), read out of its ext4 without mounting."""
    raw, tree = work / "raw", work / "tree"
    tree.mkdir()
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(base_info.rootfs), str(raw)], check=True)
    subprocess.run(["debugfs", "-R", f"rdump / {tree}", str(raw)], check=True, capture_output=True)
    raw.unlink()
    shutil.rmtree(tree / "usr" / "lib" / "localsbx", ignore_errors=True)  # not needed: the kit
    return tree


def build(tmp_path: Path, name: str, text: str):
    df = tmp_path / f"{name}.Dockerfile"
    df.write_text(text)
    defn = parse_dockerfile(df, name=name, known_bases=base.known_base_names())
    return build_image(defn, context_dir=tmp_path, name=name, force=True)


def test_from_registry_python_image_then_offline(base_ready, registry, tmp_path, monkeypatch,
                                                  made_here):
    made_here += ["t-reg-py", "t-reg-py-offline"]
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))  # no host credentials
    ref = f"{registry.addr}/tools/py:3"
    work = tmp_path / "py"
    work.mkdir()
    push_tree(debian_tree(base_ready, work), work, ref,
              env=["PATH=/usr/local/bin:/usr/bin:/bin", "APP_MODE=from-registry"],
              workdir="/srv/app", cmd=["python3", "-V"])

    t0 = time.monotonic()
    build(tmp_path, "t-reg-py", f"FROM {ref}\nRUN python3 -c 'import os; "
          "print(os.environ[\"APP_MODE\"], os.getcwd())' > made.txt\n")
    first = time.monotonic() - t0
    with Sandbox.create("t-reg-py") as sb:
        r = sb.run("cat made.txt; pwd; echo $APP_MODE")
        assert (r.exit_code, r.stdout) == (
            0, "from-registry /srv/app\n/srv/app\nfrom-registry\n"), r.stderr
    refs = json.loads((base.paths.data_dir() / "oci" / "refs.json").read_text())
    digest = refs[ref]
    meta = base.get_base(f"oci-{digest.split(':')[1][:12]}").meta
    assert meta["oci_config"]["cmd"] == ["python3", "-V"]
    assert meta["oci_config"]["workdir"] == "/srv/app"

    registry.stop()  # offline: the cached image is used, nothing is pulled
    t0 = time.monotonic()
    build(tmp_path, "t-reg-py-offline", f"FROM {ref}\nRUN echo offline > /offline\n")
    print(f"\nbuild FROM registry image: first (pull + unpack) {first:.1f} s, "
          f"cached (registry stopped) {time.monotonic() - t0:.1f} s")
    with Sandbox.create("t-reg-py-offline") as sb:
        r = sb.run("cat /offline; python3 -c 'print(6 * 7)'")
        assert (r.exit_code, r.stdout) == (0, "offline\n42\n"), r.stderr

    # an image never pulled, with the registry down: one clear error
    with pytest.raises(BaseImageError, match="cannot pull .* not in the local cache"):
        build(tmp_path, "t-reg-missing", f"FROM {registry.addr}/tools/never:1\nRUN true\n")
    registry.start()


def test_from_registry_busybox_image_by_digest(base_ready, registry, tmp_path, made_here):
    made_here.append("t-reg-bb")
    tree = tmp_path / "bb" / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "etc").mkdir()
    bb = shutil.which("busybox") or "/bin/busybox"
    shutil.copy(bb, tree / "bin" / "busybox")
    for a in ("sh", "cat", "echo", "pwd"):
        (tree / "bin" / a).symlink_to("busybox")
    (tree / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    ref = f"{registry.addr}/tools/bb:1"
    push_tree(tree, tmp_path / "bb", ref, env=["PATH=/bin", "FLAVOUR=busybox"], workdir="/")
    out = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"],
                         check=True, capture_output=True, text=True)
    digest = json.loads(out.stdout)["Digest"]
    build(tmp_path, "t-reg-bb", f"FROM {registry.addr}/tools/bb@{digest}\n"
          "RUN echo \"$FLAVOUR via digest\" > /made\n")
    with Sandbox.create("t-reg-bb") as sb:
        r = sb.run("cat /made")
        assert (r.exit_code, r.stdout) == (0, "busybox via digest\n"), r.stderr


def test_registry_image_as_stage_base_and_copy_from_source(base_ready, registry, tmp_path,
                                                           made_here):
    """Issue 8: a stage FROM a registry image (its config's ENV as the stage's start) while
    the image is FROM debian-minimal, and ``COPY --from=REGISTRY/REPO:TAG`` (BuildKit: a
    --from naming no stage is an image; a symlink source is followed)."""
    made_here.append("t-reg-stage")
    tree = tmp_path / "bb2" / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "etc").mkdir()
    shutil.copy(shutil.which("busybox") or "/bin/busybox", tree / "bin" / "busybox")
    for a in ("sh", "cat", "echo"):
        (tree / "bin" / a).symlink_to("busybox")
    (tree / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    ref = f"{registry.addr}/tools/bbstage:1"
    push_tree(tree, tmp_path / "bb2", ref, env=["PATH=/bin", "FLAVOUR=busybox"], workdir="/")
    build(tmp_path, "t-reg-stage", f"FROM {ref} AS bb\nRUN echo \"$FLAVOUR stage\" > /made\n"
          "FROM debian-minimal\nCOPY --from=bb /made /from-stage\n"
          f"COPY --from={ref} /bin/busybox /bin/sh /bb/\n")
    with Sandbox.create("t-reg-stage") as sb:
        r = sb.run("cat /from-stage; cmp /bb/busybox /bb/sh && test ! -L /bb/sh && echo same; "
                   "test -e /bin/busybox || echo no-busybox-in-image")
        assert (r.exit_code, r.stdout) == (0, "busybox stage\nsame\nno-busybox-in-image\n"), \
            (r.stdout, r.stderr)
