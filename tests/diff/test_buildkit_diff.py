"""The differential suite: every case in ``cases.py`` is built by real BuildKit and by
localsbx on the same base rootfs, and the probe's output must be byte-identical (or both
builds must fail). The suite starts and stops its own dockerd (``oracle.sh``) and fails,
never skips, when it cannot. The score (cases agreeing / total) is printed at the end.
"""

from __future__ import annotations

import difflib
import http.server
import threading
import time
from pathlib import Path

import pytest

from diff import harness
from diff.cases import CASES, ORACLE_TOO_OLD, write_case

pytestmark = pytest.mark.vm

SCORE: dict[str, bool] = {}
TIMES: dict[str, float] = {}


@pytest.fixture(scope="session")
def diff_results(base_ready, tmp_path_factory):
    t0 = time.monotonic()
    root = tmp_path_factory.mktemp("diff")
    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0),
        lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(root / "www")))
    (root / "www").mkdir()
    port = srv.server_address[1]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    for case in CASES:
        write_case(case, root / case.name, www=root / "www", port=port)
    run_dir = Path("/tmp") / f"localsbx-diff-{root.name}"
    try:
        try:
            oracle = harness.start_oracle(run_dir)
            harness.import_base(oracle, base_ready.rootfs)
        except Exception as exc:  # noqa: BLE001 - the suite fails, not skips, without BuildKit
            pytest.fail(f"cannot start real BuildKit for the differential suite: {exc}")
        t1 = time.monotonic()
        docker = harness.docker_all(oracle, CASES, root)
        TIMES["buildkit"] = time.monotonic() - t1
    finally:
        harness.stop_oracle(run_dir)
    t2 = time.monotonic()
    ours = harness.localsbx_all(CASES, root)
    TIMES["localsbx"] = time.monotonic() - t2
    srv.shutdown()
    TIMES["total"] = time.monotonic() - t0
    return docker, ours


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_same_as_buildkit(case, diff_results):
    docker, ours = diff_results
    d, o = docker[case.name], ours[case.name]
    if case.name in ORACLE_TOO_OLD:
        if d.comparable() != o.comparable():
            pytest.xfail(ORACLE_TOO_OLD[case.name])
        return
    SCORE[case.name] = d.comparable() == o.comparable()
    if d.ok != o.ok:
        pytest.fail(f"BuildKit {'built' if d.ok else 'failed'}, localsbx "
                    f"{'built' if o.ok else 'failed'}:\nBuildKit: {d.detail}\n"
                    f"localsbx: {o.detail}")
    if d.ok:
        diff = "".join(difflib.unified_diff(d.output.splitlines(True), o.output.splitlines(True),
                                            "buildkit", "localsbx"))
        assert not diff, f"probe output differs:\n{diff}"
