"""Wall time of an inner pytest suite of 20 tests that each use a fresh ``sandbox``:
restored from the snapshot, cold-booted per test (``LOCALSBX_COLD_BOOT=1``), and restored
with ``-n 2`` (pytest-xdist)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = '''
import pytest

pytestmark = pytest.mark.sandbox(image="{image}")


@pytest.mark.parametrize("i", range(20))
def test_fresh(sandbox, i):
    sandbox.write_file("/tmp/mark", str(i))
    assert sandbox.run("cat /tmp/mark; ls /tmp | wc -l").stdout == f"{{i}}1\\n"
'''


def _run(folder: Path, extra: list[str], env: dict) -> tuple[float, int]:
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        *extra, str(folder)], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        print(p.stdout[-2000:], p.stderr[-2000:])
    return time.monotonic() - t, p.returncode


def run(image: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="lsbx-bench-suite-") as tmp:
        folder = Path(tmp)
        (folder / "test_suite.py").write_text(TESTS.format(image=image))
        env = dict(os.environ)
        restore, rc1 = _run(folder, [], env)
        cold, rc2 = _run(folder, [], {**env, "LOCALSBX_COLD_BOOT": "1"})
        par, rc3 = _run(folder, ["-n", "2"], env)
    print(f"plugin suite, 20 tests, fresh sandbox each: restore {restore:.1f} s, "
          f"cold boot per test {cold:.1f} s, ratio {restore / cold:.2f}; "
          f"with -n 2: {par:.1f} s   (exit codes {rc1} {rc2} {rc3})")
    return {"restore_s": restore, "cold_s": cold, "xdist2_s": par, "exit_codes": [rc1, rc2, rc3]}
