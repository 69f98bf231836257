"""The systemd and desktop recipes (issue 9) render from the shared recipe code; the
Ubuntu ones fail fast where Ubuntu's archive is unreachable; the desktop's key mapping."""

import time

import pytest

from localsbx import base
from localsbx.errors import BaseImageError


def _argv(recipe, tmp_path):
    return base._mmdebstrap_argv(recipe, mode="unshare", stage=tmp_path, agent=tmp_path / "a",
                                 ext4=tmp_path / "e", mirror=recipe.mirror or "http://m/debian",
                                 security=None)


@pytest.mark.parametrize("name", ["debian-systemd", "tensorlake/debian-systemd"])
def test_debian_systemd_extends_debian_minimal(name, tmp_path):
    r = base.load_recipe(name)
    m = base.load_recipe("debian-minimal")
    assert r.name == "debian-systemd" and r.extends == "debian-minimal"
    assert (r.suite, r.kernel_package) == ("trixie", "linux-image-cloud-amd64")
    assert r.packages[: len(m.packages)] == m.packages
    assert {"systemd", "systemd-sysv", "dbus"} <= set(r.packages)
    assert [p.parent.name for p in r.customize] == ["debian-minimal", "debian-systemd"]
    hooks = [a for a in _argv(r, tmp_path) if a.startswith("--customize-hook=sh ")]
    assert [h for h in hooks if "images/" in h] == [
        f"--customize-hook=sh {p} \"$1\"" for p in r.customize]
    assert r.digest != m.digest


def test_debian_vnc_has_the_desktop_and_firefox_esr():
    r = base.load_recipe("debian-vnc")
    assert r.extends == "debian-systemd"
    assert {"xfce4", "tigervnc-standalone-server", "firefox-esr", "systemd"} <= set(r.packages)
    assert [p.parent.name for p in r.customize] == ["debian-minimal", "debian-systemd",
                                                    "debian-vnc"]
    script = r.customize[-1].read_text()
    assert "-rfbport 5901" in script and "echo tensorlake | tigervncpasswd -f" in script


@pytest.mark.parametrize("name", ["ubuntu-systemd", "ubuntu-vnc", "tensorlake/ubuntu-vnc"])
def test_ubuntu_systemd_and_vnc_render_and_fail_fast_offline(name, tmp_path, monkeypatch):
    r = base.load_recipe(name)
    assert (r.distro, r.suite, r.kernel_package) == ("ubuntu", "noble", "linux-image-virtual")
    assert "systemd" in r.packages
    argv = _argv(r, tmp_path)
    assert "deb http://archive.ubuntu.com/ubuntu noble main universe" in argv
    assert any("debian-systemd/customize.sh" in a for a in argv)  # the same systemd set-up
    if r.name == "ubuntu-vnc":
        assert "firefox" not in r.packages  # Ubuntu's is the snap stub
        assert "packages.mozilla.org" in r.customize[-1].read_text()
        assert any("debian-vnc/customize.sh" in a for a in
                   [r.customize[-1].read_text()])
    monkeypatch.setenv("LOCALSBX_HOME", str(tmp_path / "store"))
    monkeypatch.setenv("LOCALSBX_MIRROR", "http://127.0.0.1:9/ubuntu")
    t0 = time.monotonic()
    with pytest.raises(BaseImageError, match="cannot reach the ubuntu archive for noble"):
        base.build_base(name)
    assert time.monotonic() - t0 < base.MIRROR_PROBE_TIMEOUT + 5


def test_an_extends_cycle_is_an_error(tmp_path, monkeypatch):
    for a, b in (("x-a", "x-b"), ("x-b", "x-a")):
        (tmp_path / a).mkdir()
        (tmp_path / a / "recipe.toml").write_text(f'extends = "{b}"\n')
    monkeypatch.setattr(base, "RECIPES_DIR", tmp_path)
    with pytest.raises(BaseImageError, match="cycle"):
        base.load_recipe("x-a")


def test_timings_are_recorded_beside_the_base(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALSBX_HOME", str(tmp_path))
    d = tmp_path / "bases" / "debian-minimal"
    d.mkdir(parents=True)
    (d / "base.json").write_text("{}")
    base.record_timings("debian-minimal", cold_boot_s=5.1, restore_s=0.9)
    info = base.BaseInfo(name="debian-minimal", path=d, built=True, meta={}, size_bytes=0,
                         recipe_digest=None, current_recipe_digest=None)
    assert info.timings["cold_boot_s"] == 5.1 and info.timings["restore_s"] == 0.9


def test_desktop_key_names_and_keysyms():
    from localsbx.desktop import _key_name, _keysym

    assert _key_name("ctrl+c") == "ctrl-c" and _key_name("Enter") == "enter"
    assert _key_name("+") == "+" and _key_name("A") == "A"
    assert _keysym("a") == 0x61 and _keysym("\n") == 0xFF0D and _keysym("é") == 0xE9
    assert _keysym("€") == 0x01000000 | 0x20AC
