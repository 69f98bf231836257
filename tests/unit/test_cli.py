"""CLI pieces that need no VM: loading definitions, option parsing, errors."""

import pytest

from localsbx import cli
from localsbx.definition.loader import default_name, load_definition
from localsbx.errors import ConfigError, DefinitionError


def test_py_file_with_one_image(tmp_path):
    f = tmp_path / "image.py"
    f.write_text('from localsbx import Image\n'
                 'img = Image(name="web", base_image="debian-minimal").env("A", "b c").run("true")\n')
    d = load_definition(f)
    assert d.name == "web" and d.base == "debian-minimal"
    assert d.final_env["A"] == "b c"


def test_py_file_without_or_with_several_images(tmp_path):
    f = tmp_path / "none.py"
    f.write_text("x = 1\n")
    with pytest.raises(DefinitionError) as e:
        load_definition(f)
    assert "expected exactly one Image" in str(e.value) and "-n NAME" in str(e.value)
    g = tmp_path / "two.py"
    g.write_text('from localsbx import Image\na = Image(name="a")\nb = Image(name="b")\n')
    assert load_definition(g, name="b").name == "b"


def test_dockerfile_default_name_is_its_folder(tmp_path):
    d = tmp_path / "My App"
    d.mkdir()
    (d / "Dockerfile").write_text("FROM debian-minimal\nRUN true\n")
    assert default_name(d / "Dockerfile") == "my-app"
    assert default_name(d / "web.Dockerfile") == "web"


def test_key_value_options():
    assert cli._pairs("--env", ["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(ConfigError) as e:
        cli._pairs("--env", ["NOVALUE"])
    assert "--env 'NOVALUE': expected KEY=VALUE" in str(e.value)


def test_no_dsa_deprecation_noise_from_asyncssh():
    """asyncssh's import made cryptography print ten DSA deprecation lines on every CLI
    call (newcomer trial); localsbx silences that one warning from asyncssh alone."""
    import subprocess
    import sys

    code = ("import warnings, localsbx, asyncssh\n"
            "warnings.warn('DSA is deprecated elsewhere', DeprecationWarning)\n")
    r = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                       text=True, check=True)
    assert "asyncssh" not in r.stderr and "DSA is deprecated elsewhere" in r.stderr, r.stderr
