import subprocess
from pathlib import Path

import pytest

from localsbx.build.builder import build_image
from localsbx.definition.dockerfile import parse_dockerfile

HERE = Path(__file__).parent
IMAGES = HERE / "images"


def qemu_pids(pattern: str | None = None) -> set[int]:
    """Pids of QEMU processes whose command line contains ``pattern`` (default: this
    store's path, which every QEMU localsbx starts names in its disk or RAM file, so that
    other stores' VMs on the same machine are not counted)."""
    from localsbx import paths

    def pgrep(pat: str) -> set[int]:
        out = subprocess.run(["pgrep", "-f", pat], capture_output=True, text=True)
        return {int(p) for p in out.stdout.split()}

    ours = pgrep(f"qemu-system-x86_64.*{paths.data_dir()}")
    return ours & pgrep(pattern) if pattern else ours


def build(path: Path, name: str, **kw):
    d = parse_dockerfile(path, name=name)
    return build_image(d, context_dir=path.parent, name=name, **kw)


@pytest.fixture(scope="session")
def main_image(base_ready) -> str:
    """tests/vm/images/main/Dockerfile, built once per run (reused while unchanged)."""
    build(IMAGES / "main" / "Dockerfile", "t-main")
    return "t-main"


@pytest.fixture(scope="module")
def shared_sandbox(main_image):
    """One sandbox for read-only checks in a module (restored from the snapshot)."""
    from localsbx import Sandbox

    with Sandbox.create(main_image) as sb:
        yield sb


@pytest.fixture
def fresh_sandbox(main_image):
    from localsbx import Sandbox

    with Sandbox.create(main_image) as sb:
        yield sb
