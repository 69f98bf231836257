"""localsbx's pytest plugin: a fresh sandbox (microVM restored from an image snapshot) per test.

Loaded through the ``pytest11`` entry point, so installing localsbx is all a user does::

    import pytest

    @pytest.mark.sandbox(dockerfile="Dockerfile")      # built once, reused while unchanged
    def test_tool(sandbox):
        assert sandbox.run("mytool --version").exit_code == 0

Fixtures: ``sandbox`` (function scope), ``async_sandbox`` (pytest-asyncio), ``sandbox_factory``
(several sandboxes, ``sandbox_factory(image=..., cpus=...)``), ``module_sandbox``,
``session_sandbox``, ``sandbox_image`` (override it in conftest.py) and ``sandbox_spec`` (the
resolved choice, no VM). Options (group "localsbx" in ``pytest --help``): ``--sandbox-image``,
``--sandbox-keep``, ``--sandbox-project``; the same names work as ini keys.

Leaks: sandboxes die with the pytest process (parent-death signal), SIGTERM is turned into
KeyboardInterrupt (from the first sandbox on) so fixture teardown runs, whatever is left is
killed at session end, and
``store.reap()`` at the next session start removes what a SIGKILL left. See
``conftest_plugin/manager.py`` for ``--sandbox-keep``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

import pytest

from conftest_plugin import spec as specmod
from conftest_plugin.manager import KEEP_CHOICES, SandboxManager
from conftest_plugin.report import format_sandbox

MANAGER = pytest.StashKey[SandboxManager]()
_PREV_SIGTERM = pytest.StashKey[object]()


# ---------------------------------------------------------------------------- options

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("localsbx", "localsbx sandboxes (fixtures: sandbox, async_sandbox, "
                            "sandbox_factory, module_sandbox, session_sandbox)")
    group.addoption(
        "--sandbox-image", dest="sandbox_image", default=None, metavar="NAME|PATH",
        help="default image of the sandbox fixtures when no marker and no sandbox_image fixture "
             "override chooses one: a registered image name, or a Dockerfile path (contains a "
             "'/'; built once, reused while unchanged). ini: sandbox_image")
    group.addoption(
        "--sandbox-keep", dest="sandbox_keep", default=None, choices=KEEP_CHOICES,
        help="leave sandboxes running after their tests: 'failed' (those of failing tests), "
             "'always', or 'never' (default); prints `localsbx exec -it ID -- sh` for each. Kept "
             "sandboxes stop at their timeout_secs (default 600). ini: sandbox_keep")
    group.addoption(
        "--sandbox-project", dest="sandbox_project", default=None, metavar="PROJECT",
        help="localsbx project whose images are used and where Dockerfile images are "
             "registered (default: $LOCALSBX_PROJECT, else 'default'). ini: sandbox_project")
    parser.addini("sandbox_image", "default sandbox image name or Dockerfile path "
                  "(relative to the ini file's folder)", default="")
    parser.addini("sandbox_keep", "never | failed | always (see --sandbox-keep)", default="never")
    parser.addini("sandbox_project", "localsbx project (see --sandbox-project)", default="")


def _option(config: pytest.Config, name: str) -> str | None:
    value = config.getoption(name, None)
    if value is None:
        value = config.getini(name) or None
    return value


def _default_image(config: pytest.Config):
    """``--sandbox-image`` (paths from the invocation folder) or the ini value (paths from
    the ini file's folder); ``None`` when neither is set."""
    cli = config.getoption("sandbox_image", None)
    if cli:
        return Path(config.invocation_params.dir) / cli if "/" in cli else cli
    ini = (config.getini("sandbox_image") or "").strip()
    if not ini:
        return None
    if "/" in ini:
        base = Path(config.inipath).parent if config.inipath else Path(config.rootpath)
        return base / ini
    return ini


# ---------------------------------------------------------------------------- lifecycle

def _echo(config: pytest.Config):
    if hasattr(config, "workerinput"):  # an xdist worker: its terminal goes nowhere
        return None

    def echo(text: str) -> None:
        tr = config.pluginmanager.get_plugin("terminalreporter")
        capman = config.pluginmanager.get_plugin("capturemanager")
        if tr is None:
            return
        ctx = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
        with ctx:
            tr.write_line(f"localsbx: {text}")

    return echo


def _on_sigterm(signum, frame):
    # pytest runs no teardown on SIGTERM (pytest-dev/pytest#9150): unwind like Ctrl-C, so every
    # sandbox fixture terminates its VM. A second SIGTERM kills at once (sandboxes still die
    # with the process through their parent-death signal).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise KeyboardInterrupt("SIGTERM: stopping the tests; localsbx sandboxes are terminated")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", specmod.MARKER_DOC)
    keep = _option(config, "sandbox_keep") or "never"
    if keep not in KEEP_CHOICES:
        raise pytest.UsageError(f"sandbox_keep = {keep!r}: use one of {', '.join(KEEP_CHOICES)}")
    config.stash[MANAGER] = SandboxManager(keep, _option(config, "sandbox_project"),
                                           echo=_echo(config),
                                           before_first=lambda: _install_sigterm(config))
    config.pluginmanager.register(_ReportHooks(config), f"localsbx-reports-{id(config)}")


def _install_sigterm(config: pytest.Config) -> None:
    """Before the first sandbox of the run (so runs without sandboxes keep pytest's usual
    SIGTERM behaviour); only from the main thread and over the default disposition."""
    if threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(ValueError, TypeError):
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            config.stash[_PREV_SIGTERM] = signal.signal(signal.SIGTERM, _on_sigterm)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Reap what earlier runs left (sandboxes of dead pytest processes: SIGKILL, OOM...)."""
    if hasattr(session.config, "workerinput"):
        return  # the controller (or each create) does it
    from localsbx import paths

    sdir = paths.sandboxes_dir()
    if not (sdir.is_dir() and any(sdir.iterdir())):
        return
    try:
        from localsbx import store

        store.reap()
    except Exception as exc:  # noqa: BLE001 - never break a test run over housekeeping
        import warnings

        warnings.warn(f"localsbx: reaping stale sandboxes failed: {exc}", stacklevel=1)


def pytest_unconfigure(config: pytest.Config) -> None:
    manager = config.stash.get(MANAGER, None)
    if manager is not None:
        left = manager.cleanup_leftovers()
        if left:
            import warnings

            warnings.warn(f"localsbx: terminated sandboxes left running at exit: "
                          f"{', '.join(left)}", stacklevel=1)
    prev = config.stash.get(_PREV_SIGTERM, None)
    if prev is not None and threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, TypeError):
            if signal.getsignal(signal.SIGTERM) is _on_sigterm:
                signal.signal(signal.SIGTERM, prev)


# ---------------------------------------------------------------------------- reports

class _ReportHooks:
    """Per-config hooks with state (kept sandboxes), registered in pytest_configure, so an
    in-process inner run (pytester) does not share state with the outer one."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        #: [sandbox id, node id] of kept sandboxes (also from xdist workers' reports)
        self.kept: list[list[str]] = []

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = yield
        manager = item.config.stash.get(MANAGER, None)
        if manager is None or not manager.handles:
            return report
        handles = manager.handles_in(getattr(item, "funcargs", {}).values())
        kept_now = []
        for h in handles:
            h.users.add(item.nodeid)
            if report.failed:
                manager.mark_failed(h)
            if report.failed or (h.keep and not h.announced and report.when == "call"):
                kept = h.keep and manager.detached
                inner = h.inner
                section = format_sandbox(
                    h.sandbox_id, inner.image, inner.history, alive=inner.record.alive(),
                    serial_log=inner.serial_log, kept=kept)
                report.sections.append((f"localsbx sandbox {h.sandbox_id} ({report.when})",
                                        section))
                if kept and not h.announced:
                    h.announced = True
                    kept_now.append([h.sandbox_id, item.nodeid])
        if kept_now:
            report.localsbx_kept = kept_now  # plain data: travels through pytest-xdist
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for sid, nodeid in getattr(report, "localsbx_kept", None) or []:
            if [sid, nodeid] not in self.kept:
                self.kept.append([sid, nodeid])

    def pytest_terminal_summary(self, terminalreporter) -> None:
        manager = self.config.stash.get(MANAGER, None)
        if manager is not None and manager.resolver.built:
            terminalreporter.section("localsbx images built", sep="-")
            for name, seconds in manager.resolver.built:
                terminalreporter.write_line(f"{name}: built in {seconds:.1f} s "
                                            "(later runs reuse it while unchanged)")
        if self.kept:
            terminalreporter.section("localsbx: kept sandboxes", sep="-")
            for sid, nodeid in self.kept:
                terminalreporter.write_line(f"{nodeid}: localsbx exec -it {sid} -- sh   "
                                            f"(stop: localsbx terminate {sid})")
            terminalreporter.write_line("kept sandboxes stop by themselves at their timeout "
                                        "(timeout_secs, default 600 s)")


# ---------------------------------------------------------------------------- fixtures

def _manager(request: pytest.FixtureRequest) -> SandboxManager:
    return request.config.stash[MANAGER]


def _base_dir(request: pytest.FixtureRequest) -> Path:
    path = getattr(request.node, "path", None)
    if path is None or request.scope == "session":
        return Path(request.config.rootpath)
    path = Path(path)
    return path.parent if path.is_file() else path


def resolve_spec(request: pytest.FixtureRequest) -> specmod.SandboxSpec:
    """The spec for the requesting node: markers > ``sandbox_image`` fixture > option/ini.

    :raises pytest.fail: a malformed marker, or no image chosen (with how to choose one).
    """
    base = _base_dir(request)
    marks = [(m.args, m.kwargs) for m in request.node.iter_markers("sandbox")]
    try:
        spec = specmod.from_markers(marks, base)
        if not spec.has_source:
            value = request.getfixturevalue("sandbox_image")
            origin = "option" if value == _default_image(request.config) else "fixture"
            spec = specmod.merge(spec, specmod.from_value(value, base, origin))
    except specmod.SpecError as exc:
        pytest.fail(str(exc), pytrace=False)
    if not spec.has_source:
        pytest.fail(specmod.NO_IMAGE_HELP.format(nodeid=request.node.nodeid), pytrace=False)
    return spec


@pytest.fixture(scope="session")
def sandbox_image(pytestconfig: pytest.Config):
    """The default image for sandbox fixtures: ``--sandbox-image`` or the ``sandbox_image``
    ini value, else ``None``. Override it in conftest.py to return an image name, a Dockerfile
    path or an ``Image(...)``; markers still win over it."""
    return _default_image(pytestconfig)


@pytest.fixture
def sandbox_spec(request: pytest.FixtureRequest) -> specmod.SandboxSpec:
    """What this test's sandbox will be (image source and shape), without starting one."""
    return resolve_spec(request)


class SandboxFactory:
    """``sandbox_factory(image=..., dockerfile=..., definition=..., context=..., cpus=...,
    memory_mb=..., timeout_secs=...)`` → a new ``localsbx.Sandbox``; arguments not given come
    from the test's marker / ``sandbox_image``. Every sandbox is terminated (or kept) at the
    end of the test.

    :ivar sandboxes: the sandboxes made so far.
    """

    def __init__(self, manager: SandboxManager, request: pytest.FixtureRequest) -> None:
        self._manager = manager
        self._request = request
        self._default: specmod.SandboxSpec | None = None
        self.sandboxes: list = []

    def _spec(self, kwargs) -> specmod.SandboxSpec:
        base = _base_dir(self._request)
        try:
            explicit = specmod.marker_kwargs((), kwargs, " (sandbox_factory)")
        except specmod.SpecError as exc:
            raise ValueError(str(exc)) from None
        if not any(explicit.get(k) is not None for k in specmod.SOURCE_KEYS):
            if self._default is None:
                self._default = resolve_spec(self._request)
            return specmod.override_kwargs(self._default, kwargs, base)
        marks = [(m.args, m.kwargs) for m in self._request.node.iter_markers("sandbox")]
        shape = specmod.from_markers(marks, base)
        return specmod.override_kwargs(shape, kwargs, base)

    def __call__(self, **kwargs):
        spec = self._spec(kwargs)
        sb = self._manager.create(spec, self._request.node.nodeid)
        self.sandboxes.append(sb)
        return sb

    def close(self) -> None:
        errors = []
        for sb in reversed(self.sandboxes):
            try:
                self._manager.release(sb)
            except Exception as exc:  # noqa: BLE001 - terminate the others, then report
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def sandbox_factory(request: pytest.FixtureRequest):
    """Make several sandboxes in one test: ``sandbox_factory(image="x", cpus=2)``."""
    factory = SandboxFactory(_manager(request), request)
    try:
        yield factory
    finally:
        factory.close()


def _sandbox_fixture(request: pytest.FixtureRequest):
    manager = _manager(request)
    sb = manager.create(resolve_spec(request), request.node.nodeid)
    try:
        yield sb
    finally:
        manager.release(sb)


@pytest.fixture
def sandbox(request: pytest.FixtureRequest):
    """A fresh ``localsbx.Sandbox`` for this test, restored from the image snapshot and
    terminated afterwards whatever happened (``--sandbox-keep`` aside)."""
    yield from _sandbox_fixture(request)


@pytest.fixture(scope="module")
def module_sandbox(request: pytest.FixtureRequest):
    """One ``localsbx.Sandbox`` shared by the tests of a module (module-level markers and
    ``sandbox_image`` choose its image). Tests see each other's changes."""
    yield from _sandbox_fixture(request)


@pytest.fixture(scope="session")
def session_sandbox(request: pytest.FixtureRequest):
    """One ``localsbx.Sandbox`` for the whole session (per xdist worker); its image comes
    from a session-scoped ``sandbox_image`` or ``--sandbox-image``."""
    yield from _sandbox_fixture(request)


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - pytest-asyncio is a dependency of localsbx
    pytest_asyncio = None

if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def async_sandbox(sandbox_spec, request: pytest.FixtureRequest):
        """A fresh ``localsbx.AsyncSandbox`` for an async test (pytest-asyncio)."""
        manager = _manager(request)
        sb = await manager.create_async(sandbox_spec, request.node.nodeid)
        try:
            yield sb
        finally:
            await manager.release_async(sb)
