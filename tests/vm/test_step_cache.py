"""The build step cache on real QEMU (issue 8): a failed build keeps its finished steps, an
unchanged rebuild boots nothing, a changed last step reruns alone on the layer before it,
--no-cache reruns all, `image logs` shows cached steps' output, prune frees orphaned
layers and keeps what a running sandbox uses.

One module, tests in order, each step's definition made unique per run (a nonce in the
first step), so earlier runs' cache entries never answer. About seven cold boots."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from localsbx import Sandbox, layers, store
from localsbx.build import builder
from localsbx.build.builder import build_image
from localsbx.definition.dockerfile import parse_dockerfile
from localsbx.errors import ConfigError, ImageBuildError

from .conftest import qemu_pids

pytestmark = pytest.mark.vm
LSBX = str(Path(sys.executable).with_name("localsbx"))


class Rep:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def say(self, text: str) -> None:
        self.lines.append(text)

    def output(self, chunk: bytes) -> None:
        pass


@pytest.fixture(scope="module")
def work(tmp_path_factory, base_ready):
    nonce = secrets.token_hex(6)
    return SimpleNamespace(dir=tmp_path_factory.mktemp("stepcache"), nonce=nonce,
                           a=f"t-sc-a-{nonce}", b=f"t-sc-b-{nonce}")


def build(work, name: str, last: str, **kw):
    df = work.dir / f"Dockerfile.{secrets.token_hex(3)}"
    df.write_text("FROM debian-minimal\n"
                  f"RUN echo {work.nonce} > /one && echo out-one-{work.nonce}\n"
                  "RUN echo two > /two && echo out-two\n"
                  f"RUN {last}\n")
    rep = Rep()
    rec = build_image(parse_dockerfile(df, name=name), context_dir=work.dir, name=name,
                      reporter=rep, **kw)
    return rec, rep


def cached(rec) -> list[bool]:
    return [s.cached for s in store.lookup_image(rec.name).meta.steps]


def test_a_failed_build_keeps_its_finished_steps(work):
    with pytest.raises(ImageBuildError, match="exit code 3"):
        build(work, work.a, "echo partial; exit 3")
    rec, rep = build(work, work.a, "echo three > /three && echo out-three")
    assert cached(rec) == [True, True, False]
    assert any(line.startswith("[2/3] CACHED") for line in rep.lines)
    assert any("resuming after step 2" in line for line in rep.lines)


def test_an_unchanged_rebuild_boots_nothing_and_runs(work, monkeypatch):
    async def no_boot(*a, **kw):
        raise AssertionError("an unchanged rebuild booted a VM")

    monkeypatch.setattr(builder.Machine, "cold_boot", no_boot)
    monkeypatch.setattr(builder.Machine, "from_template", no_boot)
    before = qemu_pids()
    rec, rep = build(work, work.a, "echo three > /three && echo out-three")
    assert not any(line.startswith(("booting", "restoring")) for line in rep.lines), rep.lines
    assert qemu_pids() <= before
    monkeypatch.undo()
    with Sandbox.create(rec.name) as sb:
        r = sb.run("cat /one /two /three")
        assert r.stdout == f"{work.nonce}\ntwo\nthree\n", r.stderr


def test_changing_the_last_step_reruns_only_it(work):
    rec, rep = build(work, work.b, "echo new > /three2 && echo out-new")
    assert cached(rec) == [True, True, False]
    hist = subprocess.run([LSBX, "image", "history", rec.name],
                          capture_output=True, text=True, check=True).stdout
    assert [ln.split()[1] for ln in hist.splitlines()[1:]] == ["CACHED", "CACHED", "run"]
    with Sandbox.create(rec.name) as sb:
        r = sb.run("cat /one /two /three2; test -e /three; echo $?")
        assert r.stdout == f"{work.nonce}\ntwo\nnew\n1\n", r.stderr
    logs = subprocess.run([LSBX, "image", "logs", rec.name],
                          capture_output=True, text=True, check=True).stdout
    assert f"out-one-{work.nonce}" in logs and "out-two" in logs and "out-new" in logs
    assert "#1 CACHED" in logs and "#3 line 4: RUN echo new" in logs


def test_no_cache_reruns_every_step(work):
    rec, rep = build(work, work.b, "echo new > /three2 && echo out-new", no_cache=True)
    assert cached(rec) == [False, False, False]
    assert not any("CACHED" in line for line in rep.lines)


def test_prune_frees_orphaned_layers_and_keeps_a_running_sandboxs(work):
    a = store.lookup_image(work.a)
    b = store.lookup_image(work.b)
    a_only = {s.layer for s in a.meta.steps} - {s.layer for s in b.meta.steps}
    b_layers = {s.layer for s in b.meta.steps} | {b.meta.layer}
    assert a_only
    with Sandbox.create(work.b) as sb:
        store.remove_image(work.a)
        store.remove_image(work.b)  # unregistered, but the sandbox still uses it
        for _ in range(30):  # other VM tests may be building: prune waits for none
            try:
                rep = layers.prune()
                break
            except ConfigError:
                import time
                time.sleep(2)
        else:
            pytest.fail("prune never found a moment without a build")
        assert a_only <= set(rep.layers) and rep.freed_bytes > 0
        assert not (b_layers & set(rep.layers))
        assert all(Path(layers.layer_dir(lid), "layer.json").exists() for lid in b_layers)
        r = sb.run("cat /one /two /three2 && echo fine > /four && cat /four")
        assert r.exit_code == 0 and r.stdout.endswith("new\nfine\n"), r.stderr
