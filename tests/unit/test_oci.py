"""Registry references, pull commands and image config (no registry, no VM)."""

import pytest

from localsbx import oci
from localsbx.build.resolve import with_image_config
from localsbx.definition.ops import Env, ImageDefinition, Run, User, Workdir
from localsbx.errors import BaseImageError

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, want", [
    ("python:3.14-trixie", "docker.io/library/python:3.14-trixie"),
    ("node", "docker.io/library/node:latest"),
    ("org/img", "docker.io/org/img:latest"),
    ("index.docker.io/library/debian:13", "docker.io/library/debian:13"),
    ("ghcr.io/org/img:tag", "ghcr.io/org/img:tag"),
    ("127.0.0.1:5000/tools/py:3", "127.0.0.1:5000/tools/py:3"),
    ("localhost/x", "localhost/x:latest"),
    (f"busybox@{D}", f"docker.io/library/busybox@{D}"),
    (f"reg.example:443/a/b:1@{D}", f"reg.example:443/a/b:1@{D}"),
])
def test_parse_ref_like_docker(text, want):
    assert str(oci.parse_ref(text)) == want


@pytest.mark.parametrize("bad", ["Debian", "a//b", "img:", "img@sha256:xyz", "x:bad tag", ""])
def test_parse_ref_refuses(bad):
    with pytest.raises(BaseImageError):
        oci.parse_ref(bad)


def test_which_from_values_name_registry_images():
    assert oci.names_registry_image("python:3.14-trixie")
    assert oci.names_registry_image("ghcr.io/org/img")
    assert not oci.names_registry_image("debian-minmal")  # a typo stays a base error
    assert not oci.names_registry_image("Bad:Tag!")


def test_copy_argv_plain_http_for_localhost_and_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    local = oci.parse_ref("127.0.0.1:5000/a:1")
    argv = oci.copy_argv(local, tmp_path / "layout", "k")
    assert "--src-tls-verify=false" in argv and not any("authfile" in a for a in argv)
    assert argv[-2:] == ["docker://127.0.0.1:5000/a:1", f"oci:{tmp_path / 'layout'}:k"]
    (tmp_path / "config.json").write_text('{"auths": {"ghcr.io": {"auth": "dTpw"}}}')
    argv = oci.copy_argv(oci.parse_ref("ghcr.io/org/img:1"), tmp_path, "k")
    assert f"--src-authfile={tmp_path / 'config.json'}" in argv
    assert "--src-tls-verify=false" not in argv
    monkeypatch.setenv("LOCALSBX_INSECURE_REGISTRIES", "reg.lan:5000")
    assert oci.parse_ref("reg.lan:5000/x").insecure


def test_mirror_serves_docker_hub_first(monkeypatch):
    monkeypatch.setenv("LOCALSBX_REGISTRY_MIRROR", "http://mirror.lan:5000/")
    hub = oci.parse_ref("python:3")
    assert [str(s) for s in oci._sources(hub)] == ["mirror.lan:5000/library/python:3",
                                                   "docker.io/library/python:3"]
    assert [str(s) for s in oci._sources(oci.parse_ref("ghcr.io/o/i:1"))] == ["ghcr.io/o/i:1"]


def test_image_config_becomes_the_first_steps():
    cfg = oci.ImageConfig.from_oci({"config": {
        "Env": ["PATH=/usr/bin:/bin", "A=b=c"], "WorkingDir": "/srv", "User": "1000",
        "Entrypoint": ["/entry"], "Cmd": ["serve"]}})
    assert cfg.env == (("PATH", "/usr/bin:/bin"), ("A", "b=c")) and cfg.cmd == ("serve",)
    assert cfg.to_json()["entrypoint"] == ["/entry"]
    defn = ImageDefinition(name="x", base="reg/x:1", ops=(Run(argv=("true",), shell=False),))
    ops = with_image_config(defn, cfg).ops
    assert ops[:2] == (Env("PATH", "/usr/bin:/bin"), Env("A", "b=c"))
    # WORKDIR first (made as root), then the image's USER, then the Dockerfile's steps
    assert isinstance(ops[2], Workdir) and ops[2].path == "/srv"
    assert isinstance(ops[3], User) and ops[3].user == "1000" and isinstance(ops[4], Run)
    assert with_image_config(defn, oci.ImageConfig(workdir="/")).ops == defn.ops
