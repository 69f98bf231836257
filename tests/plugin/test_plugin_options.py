"""The plugin as pytest sees it, without starting VMs: options in --help, marker
registration, marker > fixture override > --sandbox-image / ini precedence (through the
``sandbox_spec`` fixture, which resolves but does not start), and clear errors."""

import pytest

INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"


def test_options_are_listed_in_help(pytester):
    pytester.makeini(INI)
    res = pytester.runpytest("--help")
    res.stdout.fnmatch_lines([
        "localsbx sandboxes*",
        "*--sandbox-image=NAME|PATH*",
        "*--sandbox-keep={never,failed,always}*",
        "*--sandbox-project=PROJECT*",
    ])
    res = pytester.runpytest("--markers")
    res.stdout.fnmatch_lines(["@pytest.mark.sandbox(image=NAME | dockerfile=PATH*"])


def test_marker_beats_fixture_beats_option(pytester):
    pytester.makeini(INI + "sandbox_image = from-ini\n")
    pytester.makepyfile(test_a="""
        import pytest

        def test_option(sandbox_spec):
            assert (sandbox_spec.image, sandbox_spec.origin) == ("from-cli", "option")

        @pytest.mark.sandbox(image="from-marker", cpus=2)
        def test_marker(sandbox_spec):
            assert (sandbox_spec.image, sandbox_spec.cpus) == ("from-marker", 2)
    """)
    pytester.mkpydir("sub")
    pytester.path.joinpath("sub", "conftest.py").write_text(
        "import pytest\n\n@pytest.fixture\ndef sandbox_image():\n    return 'from-fixture'\n")
    pytester.path.joinpath("sub", "test_b.py").write_text(
        "import pytest\n"
        "pytestmark = pytest.mark.sandbox(memory_mb=512)\n\n"
        "def test_fixture(sandbox_spec):\n"
        "    assert (sandbox_spec.image, sandbox_spec.origin) == ('from-fixture', 'fixture')\n"
        "    assert sandbox_spec.memory_mb == 512\n\n"
        "@pytest.mark.sandbox(image='m2')\n"
        "def test_marker_over_fixture(sandbox_spec):\n"
        "    assert sandbox_spec.image == 'm2' and sandbox_spec.memory_mb == 512\n\n"
        "class TestC:\n"
        "    pytestmark = pytest.mark.sandbox(dockerfile='img/Dockerfile', cpus=3)\n\n"
        "    @pytest.mark.sandbox(cpus=1)\n"
        "    def test_class_marker(self, sandbox_spec, request):\n"
        "        assert sandbox_spec.dockerfile == request.path.parent / 'img' / 'Dockerfile'\n"
        "        assert sandbox_spec.context == request.path.parent / 'img'\n"
        "        assert sandbox_spec.cpus == 1 and sandbox_spec.memory_mb == 512\n")
    pytester.runpytest("--sandbox-image=from-cli").assert_outcomes(passed=5)


def test_ini_default_and_relative_paths(pytester):
    pytester.makeini(INI + "sandbox_image = images/Dockerfile\n")
    pytester.makepyfile(test_a="""
        def test_ini(sandbox_spec, pytestconfig):
            root = pytestconfig.inipath.parent
            assert sandbox_spec.dockerfile == root / "images" / "Dockerfile"
            assert sandbox_spec.context == root / "images"
    """)
    pytester.runpytest().assert_outcomes(passed=1)


def test_no_image_is_a_clear_setup_error(pytester):
    pytester.makeini(INI)
    pytester.makepyfile(test_a="def test_x(sandbox):\n    pass\n")
    res = pytester.runpytest()
    res.assert_outcomes(errors=1)
    res.stdout.fnmatch_lines([
        "*no sandbox image chosen for test_a.py::test_x*",
        "*@pytest.mark.sandbox(image='NAME')*",
        "*def sandbox_image(): return 'NAME'*",
        "*pytest --sandbox-image=NAME*",
    ])
    assert "Traceback" not in res.stdout.str()


def test_malformed_marker_is_reported_on_the_test(pytester):
    pytester.makeini(INI)
    pytester.makepyfile(test_a="""
        import pytest

        @pytest.mark.sandbox(image="a", dockerfile="Dockerfile")
        def test_x(sandbox_spec):
            pass
    """)
    res = pytester.runpytest()
    res.assert_outcomes(errors=1)
    res.stdout.fnmatch_lines(["*give only one of image=, dockerfile=, definition=*"])


def test_bad_keep_value_is_a_usage_error(pytester):
    pytester.makeini(INI + "sandbox_keep = sometimes\n")
    pytester.makepyfile(test_a="def test_x():\n    pass\n")
    res = pytester.runpytest()
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*sandbox_keep = 'sometimes': use one of never, failed, always*"])


def test_plugin_does_nothing_for_tests_without_sandboxes(pytester):
    pytester.makeini(INI)
    pytester.makepyfile(test_a="def test_x():\n    pass\n")
    # pytest >= 9 warns, in an in-process run, that the already imported plugin modules cannot
    # be rewritten; that warning names them but is pytest's, not output of the plugin
    res = pytester.runpytest("-W", "ignore::pytest.PytestAssertRewriteWarning")
    res.assert_outcomes(passed=1)
    out = res.stdout.str().split("collected", 1)[1]
    assert "localsbx" not in out
