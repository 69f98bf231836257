"""Testing with localsbx: each test gets a fresh microVM restored from the image snapshot.

Run it from the repository root (the first run builds the image, later runs reuse it):

    pytest images/examples/pytest -v
    pytest images/examples/pytest -n 2            # with pytest-xdist: one build, shared
    pytest images/examples/pytest --sandbox-keep=failed
"""

import pytest

# Every test in this module uses the image built from the Dockerfile next to this file
# (the build context is that folder too).
pytestmark = pytest.mark.sandbox(dockerfile="Dockerfile")


def test_the_app_runs(sandbox):
    res = sandbox.run("./greet.sh", args=["pytest"])
    assert res.exit_code == 0, res.stderr
    assert res.stdout == "hello from the sandbox, pytest\n"


def test_image_env_and_workdir_apply(sandbox):
    assert sandbox.run("pwd").stdout == "/srv/app\n"
    assert sandbox.read_file("/srv/app/build-check.txt") == b"hello from the sandbox\n"


def test_each_test_has_its_own_vm(sandbox):
    # nothing an earlier test did is visible here
    assert sandbox.run("test -e /tmp/scratch").exit_code == 1
    sandbox.write_file("/tmp/scratch", "mine")
    assert sandbox.run("cat /tmp/scratch").stdout == "mine"


@pytest.mark.sandbox(timeout_secs=120)  # shape keys merge with the module's marker
def test_two_sandboxes(sandbox_factory):
    server, client = sandbox_factory(), sandbox_factory()
    server.run("echo only-here > /tmp/flag")
    assert client.run("test -e /tmp/flag").exit_code == 1


@pytest.mark.asyncio  # pytest-asyncio; not needed with asyncio_mode = auto
async def test_async_twin(async_sandbox):
    res = await async_sandbox.run(["sh", "-c", "echo $APP_GREETING"])
    assert res.stdout == "hello from the sandbox\n"
