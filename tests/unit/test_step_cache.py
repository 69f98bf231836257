"""The build step cache (localsbx.layers + the builder's resume logic) without a VM.

The build VM is a fake machine whose guest is the in-memory FakeGuest of
test_builder_ops; its disk layers are empty files. What is checked: the keys (what
changes them and what does not), the longest cached prefix, where a rebuild resumes and
on which layer it boots, what a failed step leaves, and prune's mark-and-sweep.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_builder_ops import FakeGuest, Rep, defn

from localsbx import layers, store
from localsbx.build import builder
from localsbx.definition.context import BuildContext
from localsbx.errors import ConfigError, ImageBuildError
from localsbx.vm.qemu import Accel


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALSBX_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def base(tmp_path):
    rootfs = tmp_path / "rootfs.qcow2"
    rootfs.write_bytes(b"root")
    return SimpleNamespace(name="debian-minimal", digest="b" * 64, rootfs=rootfs,
                           kernel=tmp_path / "k", initrd=tmp_path / "i", kernel_digest="k")


class FakeMachine:
    """Stands in for ``Machine``: records each boot's disk and the layers it switched to."""

    boots: list[Path] = []

    def __init__(self, guest: FakeGuest, disk: Path) -> None:
        self.guest = guest
        self.disk = disk
        self.layers: list[Path] = []
        self.qemu = SimpleNamespace(proc=SimpleNamespace(returncode=None),
                                    log_tail=lambda n: "")
        guest.connected = True

    async def new_disk_layer(self, overlay: Path) -> None:
        assert not overlay.exists()
        overlay.write_bytes(b"layer")  # QEMU creates it
        self.layers.append(overlay)

    async def poweroff(self) -> bool:
        return True

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        pass


@pytest.fixture
def vm(monkeypatch):
    """Patch the builder's VM seam; returns the dict of what happened."""
    seen: dict = {"boots": [], "guests": [], "registered": []}

    async def create_overlay(path, backing, **kw):
        Path(path).write_bytes(b"overlay:" + str(backing).encode())

    async def cold_boot(**kw):
        g = FakeGuest(seen.get("results"))
        seen["guests"].append(g)
        seen["boots"].append(kw["disk"])
        seen.setdefault("extra_disks", []).append(  # what each attached overlay is over
            tuple(Path(p).read_bytes() for p in kw.get("extra_disks", ())))
        return FakeMachine(g, kw["disk"])

    async def accel(*a, **kw):
        return Accel("tcg")

    async def register(definition, rep, *, history, top, **kw):
        seen["registered"].append((list(history), top))
        return history

    monkeypatch.setattr(builder.disk, "create_overlay", create_overlay)
    monkeypatch.setattr(builder.Machine, "cold_boot", staticmethod(cold_boot))
    monkeypatch.setattr(builder, "choose_accel", accel)
    monkeypatch.setattr(builder, "_snapshot_and_register", register)
    monkeypatch.setattr(builder.store, "management_key", lambda: None)
    return seen


async def run_build(d, base, *, ctx=None, use_cache=True, rep=None):
    keys = builder._step_keys(d, ctx, base, None)
    rep = rep or Rep()
    with layers.build_lock():
        hist = await builder._build(d, ctx, rep, name="t", project="default", digest="d" * 32,
                                    base=base, parent=None, keys=keys, timeout=None,
                                    secret_data={}, use_cache=use_cache, started=0.0)
    return keys, hist, rep


# --------------------------------------------------------------------------- keys

def test_changing_a_step_changes_its_key_and_every_later_one_only(base):
    a = builder._step_keys(defn("RUN a\nENV X=1\nRUN b\nRUN c\n"), None, base, None)
    b = builder._step_keys(defn("RUN a\nENV X=1\nRUN B\nRUN c\n"), None, base, None)
    assert len(a) == 4 and len(set(a)) == 4
    assert a[:2] == b[:2] and a[2] != b[2] and a[3] != b[3]


def test_key_depends_on_base_and_build_shape_not_on_line_numbers(base):
    a = builder._step_keys(defn("RUN a\n"), None, base, None)
    assert builder._step_keys(defn("\n\nRUN a\n"), None, base, None) == a
    other = SimpleNamespace(**{**vars(base), "digest": "c" * 64})
    assert builder._step_keys(defn("RUN a\n"), None, other, None) != a
    d = defn("RUN a\n")
    import dataclasses
    assert builder._step_keys(dataclasses.replace(d, build_cpus=4), None, base, None) != a


def test_build_args_change_only_the_steps_that_see_them(base):
    text = "RUN a\nARG V\nRUN echo $V\n"
    k1 = builder._step_keys(defn(text, build_args={"V": "1"}), None, base, None)
    k2 = builder._step_keys(defn(text, build_args={"V": "2"}), None, base, None)
    assert k1[0] == k2[0] and k1[1] != k2[1]


def test_context_files_count_for_the_step_that_reads_them(tmp_path, base):
    (tmp_path / "f").write_text("1")
    (tmp_path / "g").write_text("1")
    d = defn("RUN a\nCOPY f /f\nCOPY g /g\n")
    k1 = builder._step_keys(d, BuildContext(tmp_path), base, None)
    (tmp_path / "g").write_text("2")
    k2 = builder._step_keys(d, BuildContext(tmp_path), base, None)
    assert k1[:2] == k2[:2] and k1[2] != k2[2]
    (tmp_path / "g").chmod(0o600)
    assert builder._step_keys(d, BuildContext(tmp_path), base, None)[2] != k2[2]


def test_secrets_are_not_in_keys_nor_stored(tmp_path, base, vm, home):
    d = defn("RUN --mount=type=secret,id=tok cat /run/secrets/tok\n")
    k = builder._step_keys(d, None, base, None)
    assert k == builder._step_keys(d, None, base, None)  # the secret's content is no input

    async def go():
        keys = builder._step_keys(d, None, base, None)
        with layers.build_lock():
            await builder._build(d, None, Rep(), name="t", project="default", digest="d" * 32,
                                 base=base, parent=None, keys=keys, timeout=None,
                                 secret_data={"tok": b"hunter2-secret"}, use_cache=True,
                                 started=0.0)
    import asyncio
    asyncio.run(go())
    for f in (home / "layers").rglob("*"):
        if f.is_file():
            assert b"hunter2-secret" not in f.read_bytes(), f


def test_build_arg_values_are_not_in_layer_records(base, vm, home):
    import asyncio
    asyncio.run(run_build(defn("ARG TOKEN\nRUN echo $TOKEN\n",
                               build_args={"TOKEN": "s3cr3t-value"}), base))
    for f in (home / "layers").rglob("layer.json"):
        assert "s3cr3t-value" not in f.read_text()


# --------------------------------------------------------------------------- prefix + resume

async def test_cold_build_makes_a_layer_per_step_then_everything_is_cached(base, vm):
    d = defn("RUN a\nENV X=1\nRUN b\nWORKDIR /w\nRUN c\n")
    keys, hist, rep = await run_build(d, base)
    assert [h.cached for h in hist] == [False] * 5
    assert [r.id for r in layers.longest_prefix(keys)] == keys
    recs = [layers.read(k) for k in keys]
    # disk steps have their own disk, chained below each other; ENV points at the one before
    assert [r.has_disk for r in recs] == [True, False, True, True, True]
    assert recs[1].disk == keys[0] and recs[2].below == keys[0] and recs[4].below == keys[3]
    assert [r.depth for r in recs] == [1, 1, 2, 3, 4]
    assert recs[1].env["X"] == "1" and recs[4].workdir == "/w"
    assert all(oct(layers.disk_path(k).stat().st_mode & 0o777) == "0o400"
               for k in keys if layers.read(k).has_disk)
    assert len(vm["boots"]) == 1 and vm["boots"][0] == layers.disk_path(keys[0])
    assert vm["registered"][-1][1] == keys[4]  # build.qcow2 overlays the last disk layer

    vm["boots"].clear()
    keys2, hist2, rep2 = await run_build(d, base)
    assert keys2 == keys and vm["boots"] == []  # nothing boots (the snapshot VM is faked)
    assert [h.cached for h in hist2] == [True] * 5
    assert any("[5/5] CACHED" in line for line in rep2.lines)


async def test_changing_the_last_step_resumes_on_the_layer_before_it(base, vm):
    keys, _, _ = await run_build(defn("RUN a\nRUN b\nRUN c\n"), base)
    keys2, hist, rep = await run_build(defn("RUN a\nRUN b\nRUN C\n"), base)
    assert keys2[:2] == keys[:2] and keys2[2] != keys[2]
    assert [h.cached for h in hist] == [True, True, False]
    # booted on a fresh layer over step 2's disk, running only step 3
    boot = vm["boots"][-1]
    assert boot == layers.disk_path(keys2[2])
    assert boot.read_bytes() == b"overlay:" + str(layers.disk_path(keys[1])).encode()
    assert [c.argv[-1] for c in vm["guests"][-1].runs()] == ["C"]
    assert layers.read(keys2[2]).below == keys[1]


async def test_only_env_changed_at_the_end_needs_no_build_vm(base, vm):
    await run_build(defn("RUN a\nENV X=1\n"), base)
    vm["boots"].clear()
    keys, hist, _ = await run_build(defn("RUN a\nENV X=2\n"), base)
    assert vm["boots"] == [] and [h.cached for h in hist] == [True, False]
    assert layers.read(keys[1]).disk == keys[0] and layers.read(keys[1]).env["X"] == "2"


async def test_a_failing_step_keeps_the_steps_before_it(base, vm):
    vm["results"] = {"boom": (3, b"", b"bad")}
    d = defn("RUN a\nRUN b\nRUN boom\nRUN d\n")
    keys = builder._step_keys(d, None, base, None)
    with pytest.raises(ImageBuildError, match="boom"):
        await run_build(d, base)
    assert [r.id for r in layers.longest_prefix(keys)] == keys[:2]
    assert not layers.layer_dir(keys[2]).exists()  # the failed step's folder is gone
    assert not layers.layer_dir(keys[3]).exists()
    vm["results"] = {}
    _, hist, _ = await run_build(d, base)
    assert [h.cached for h in hist] == [True, True, False, False]


async def test_an_interrupted_build_keeps_the_steps_before_it(base, vm, monkeypatch):
    orig = FakeGuest.exec

    async def exec_(self, argv, **kw):
        if "sleep-forever" in list(argv)[-1]:
            raise KeyboardInterrupt
        return await orig(self, argv, **kw)

    monkeypatch.setattr(FakeGuest, "exec", exec_)
    d = defn("RUN a\nENV X=1\nRUN sleep-forever\n")
    keys = builder._step_keys(d, None, base, None)
    with pytest.raises(KeyboardInterrupt):
        await run_build(d, base)
    assert [r.id for r in layers.longest_prefix(keys)] == keys[:2]
    assert not layers.layer_dir(keys[2]).exists()
    assert not list(store.paths.images_dir().glob(".tmp-*"))  # no half-made image


async def test_no_cache_runs_everything_and_leaves_the_entries(base, vm):
    d = defn("RUN a\nRUN b\n")
    keys, _, _ = await run_build(d, base)
    _, hist, _ = await run_build(d, base, use_cache=False)
    assert [h.cached for h in hist] == [False, False]
    # the keys were taken: the new steps live in copies, the entries stay
    assert [h.layer.split("~")[0] for h in hist] == keys and all("~" in h.layer for h in hist)
    assert [r.id for r in layers.longest_prefix(keys)] == keys


async def test_prefix_stops_at_a_missing_disk(base, vm):
    keys, _, _ = await run_build(defn("RUN a\nRUN b\nRUN c\n"), base)
    store._rmtree(layers.layer_dir(keys[1]))
    assert [r.id for r in layers.longest_prefix(keys)] == keys[:1]
    # step 3's disk is backed by step 2's, gone: not usable either
    assert layers.lookup(keys[2]) is None


async def test_output_of_each_step_is_kept(base, vm):
    vm["results"] = {"hello": (0, b"hi there\n", b"")}
    keys, hist, _ = await run_build(defn("RUN echo hello\nRUN true\n"), base)
    assert layers.output(keys[0]) == b"hi there\n"
    assert layers.output(keys[1]) == b""
    for f in layers.layer_dir(keys[0]).iterdir():  # the store's modes: 0600, frozen 0400
        assert f.stat().st_mode & 0o077 == 0, f
    assert layers.layer_dir(keys[0]).stat().st_mode & 0o077 == 0


# --------------------------------------------------------------------------- prune

async def test_prune_keeps_layers_of_images_and_frees_the_rest(base, vm, home):
    keys, hist, _ = await run_build(defn("RUN a\nRUN b\n"), base)
    keys2, hist2, _ = await run_build(defn("RUN a\nRUN other\n"), base)
    # an image folder that uses the first build's steps
    meta = {"name": "x", "digest": "e" * 32, "base": "debian-minimal", "base_digest": "b",
            "env": {}, "workdir": "/", "layer": keys[1],
            "steps": [{"layer": h.layer, "step": h.step, "cached": h.cached} for h in hist],
            "snapshot": {"key": {}, "host_key": "", "cpus": 1, "memory_mib": 1,
                         "state_size": 0, "ram_size": 0, "format": 3}}
    d = store.image_dir("e" * 32)
    d.mkdir(parents=True)
    (d / "image.json").write_text(json.dumps(meta))
    store.register_image("default", "x", "e" * 32)
    rep = layers.prune()
    assert rep.layers == [keys2[1]] and rep.freed_bytes > 0
    assert all(layers.lookup(k) for k in keys)
    assert layers.lookup(keys2[1]) is None


async def test_prune_refuses_while_a_build_holds_the_lock(base, vm):
    import fcntl
    import os

    with layers.build_lock():
        fd = os.open(layers.layers_dir() / ".lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        with pytest.raises(ConfigError, match="build is in progress"):
            layers.prune()


def test_a_folder_of_a_dead_build_is_taken_over(home):
    d = layers.layers_dir() / ("a" * 64)
    d.mkdir(parents=True)
    (d / "owner").write_text("999999999 1")
    assert layers.begin("a" * 64) == "a" * 64
    assert "~" in layers.begin("a" * 64)  # now a live build (this one) has it


def test_layer_records_round_trip_and_refuse_newer_schemas():
    rec = layers.LayerRecord(id="i", key="i", parent=None, disk="i", below=None, root="/r",
                             depth=1, step="RUN a", env={}, workdir="/", user=None,
                             extra={"future": 1})
    assert layers.LayerRecord.from_json(rec.to_json()) == rec
    with pytest.raises(ValueError, match="newer"):
        layers.LayerRecord.from_json({**rec.to_json(), "schema": 99})
    with pytest.raises(ValueError, match="incomplete"):
        layers.LayerRecord.from_json({"id": "i"})


async def test_a_deep_chain_is_flattened_in_place(base, vm, monkeypatch):
    monkeypatch.setattr(layers, "MAX_DEPTH", 2)
    rebased = []

    async def copy_sparse(src, dst, **kw):
        Path(dst).write_bytes(Path(src).read_bytes())

    async def rebase(image, backing, **kw):
        rebased.append(backing)
        Path(image).write_bytes(b"flat")

    monkeypatch.setattr(builder.disk, "copy_sparse", copy_sparse)
    monkeypatch.setattr(builder.disk, "rebase", rebase)
    keys, _, rep = await run_build(defn("RUN a\nRUN b\nRUN c\n"), base)
    top = layers.read(keys[2])
    assert rebased == [base.rootfs] and any("flattening" in ln for ln in rep.lines)
    assert (top.below, top.depth, top.root) == (None, 1, str(base.rootfs))
    assert layers.disk_path(keys[2]).read_bytes() == b"flat"
    assert layers.disk_path(keys[2]).stat().st_mode & 0o777 == 0o400
    assert layers.disk_chain(top) == [keys[2]]
    # the flattened entry is still a cache hit, and builds on it stay shallow
    _, hist, _ = await run_build(defn("RUN a\nRUN b\nRUN c\nRUN d\n"), base)
    assert [h.cached for h in hist] == [True, True, True, False]


def test_cli_progress_piped_prefixes_output_lines_with_their_step(capfdbinary):
    from localsbx import cli

    rep = cli._CliReporter()
    rep.plain = True
    rep.say("[1/3] CACHED line 2: RUN a")
    rep.say("[2/3] line 3: RUN b")
    rep.output(b"one\ntw")
    rep.output(b"o\nthr")
    rep.say("[3/3] line 4: RUN c")
    rep.output(b"x\n")
    rep._end_line()
    err = capfdbinary.readouterr().err.decode()
    assert "[1/3] CACHED line 2: RUN a" in err
    assert "#2 one\n#2 two\n#2 thr\n" in err and "#3 x\n" in err


def test_cli_live_view_marks_cached_running_and_done_steps():
    import io

    from rich.console import Console

    from localsbx import cli

    buf = io.StringIO()
    rep = cli._LiveReporter(console=Console(file=buf, force_terminal=True, width=120))
    rep.say("[1/3] CACHED line 2: RUN a")
    rep.say("booting build VM (2 vCPU, 4096 MiB) from base debian-minimal")
    rep.say("[2/3] line 3: RUN b")
    rep.output(b"out-b-1\nout-b-2\npart")
    snap = io.StringIO()
    Console(file=snap, width=120).print(rep.__rich__())
    assert "CACHED [1/3] line 2: RUN a" in snap.getvalue()
    assert "[2/3] line 3: RUN b" in snap.getvalue() and "| out-b-2" in snap.getvalue()
    assert "| part" in snap.getvalue()
    rep.say("[3/3] line 4: RUN c")
    rep.close()
    assert [e[1] for e in rep.entries] == ["CACHED", "done", "done"]
    assert "booting build VM" in buf.getvalue()


def test_cli_live_view_marks_the_step_a_failure_stopped():
    import io

    from rich.console import Console

    from localsbx import cli

    rep = cli._LiveReporter(console=Console(file=io.StringIO(), force_terminal=True))
    rep.say("[1/2] line 2: RUN a")
    rep.close(failed=True)
    assert [e[1] for e in rep.entries] == ["failed"]


async def test_from_an_image_built_before_the_cache_pins_it(base, vm, home):
    import time

    pdir = store.image_dir("p" * 32)
    pdir.mkdir(parents=True)
    (pdir / "build.qcow2").write_bytes(b"old image disk")
    meta = {"name": "old", "digest": "p" * 32, "base": "debian-minimal", "base_digest": "b",
            "env": {"PATH": "/bin", "OLD": "1"}, "workdir": "/srv", "created_at": 1.0,
            "snapshot": {"key": {}, "host_key": "", "cpus": 1, "memory_mib": 1,
                         "state_size": 0, "ram_size": 0, "format": 3}}
    (pdir / "image.json").write_text(json.dumps(meta))
    import os
    os.utime(pdir / "image.json", (time.time() - 3600, time.time() - 3600))
    parent = store.register_image("default", "old", "p" * 32)
    d = defn("RUN a\n")
    keys = builder._step_keys(d, None, base, parent)
    assert keys != builder._step_keys(d, None, base, None)
    with layers.build_lock():
        await builder._build(d, None, Rep(), name="t", project="default", digest="d" * 32,
                             base=base, parent=parent, keys=keys, timeout=None, secret_data={},
                             use_cache=True, started=0.0)
    rec = layers.read(keys[0])
    assert rec.pins_image == "p" * 32 and rec.root == str(pdir / "build.qcow2")
    assert vm["guests"][-1].runs()[0].cwd == "/srv"  # the parent's state is the start
    assert layers.disk_path(keys[0]).read_bytes() == b"overlay:" + str(pdir / "build.qcow2").encode()
    store.remove_image("old", project="default")  # unregistered, but a cached step is built on its disk
    assert pdir.exists() and "p" * 32 not in store.gc_images()
    rep = layers.prune()  # the step goes (no image uses it), then the image it pinned
    assert not layers.layer_dir(keys[0]).exists()
    assert rep.images == ["p" * 32] and not pdir.exists()


def test_cli_prune_history_logs_and_progress_option(tmp_path):
    import os
    import subprocess
    import sys

    cli = str(Path(sys.executable).parent / "localsbx")
    env = {**os.environ, "LOCALSBX_HOME": str(tmp_path / "store"), "LOCALSBX_PROJECT": "t"}

    def run(*args):
        return subprocess.run([cli, *args], capture_output=True, text=True, env=env,
                              timeout=60, stdin=subprocess.DEVNULL)

    res = run("prune")
    assert res.returncode == 0 and "removed 0 cached step(s) and 0 image folder(s), freed 0 B" \
        in res.stderr, res.stderr
    for sub in ("history", "logs"):
        res = run("image", sub, "nope")
        assert res.returncode == 1 and "no image named 'nope'" in res.stderr
    (tmp_path / "Dockerfile").write_text("FROM debian-minimal\nRUN true\n")
    res = run("image", "build", str(tmp_path / "Dockerfile"), "--progress", "fancy")
    assert res.returncode == 1 and "--progress 'fancy'" in res.stderr


# --------------------------------------------------------------------------- other roots
# (issue 8: COPY --from=IMAGE, stages on other bases, resuming with steps that read stages)

def _tar(members: dict[str, bytes]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.uid, ti.gid = len(data), 7, 7
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _root(ref, digest, disk, **kw):
    from localsbx.build.resolve import ImageRoot

    return ImageRoot(ref, kw.pop("kind", "base"), digest, disk, **kw)


async def run_rooted(d, base, roots, *, use_cache=True):
    keys = builder._step_keys(d, None, base, None, roots)
    rep = Rep()
    with layers.build_lock():
        hist = await builder._build(d, None, rep, name="t", project="default", digest="d" * 32,
                                    base=base, parent=None, keys=keys, timeout=None,
                                    secret_data={}, use_cache=use_cache, started=0.0,
                                    roots=roots)
    return keys, hist, rep


#: FakeGuest answers: ``test -L ROOT/outdir`` no, ``tar ... outdir`` a tar of it
TAR_RESULTS = {"/outdir": (1, b"", b""), "outdir": (0, _tar({"outdir/f": b"x"}), b"")}
STAGED = ("FROM debian-minimal AS b\nRUN make-it\nFROM debian-minimal\nRUN a\n"
          "RUN {step}\nCOPY --from=b /outdir /dst/\n")


def _overlay_lowers(guest) -> list[str]:
    import re

    return [m for c in guest.calls for m in re.findall(r"lowerdir=(\S+?),", c.argv[-1])]


async def test_a_resumed_build_whose_steps_read_a_stage_resumes(base, vm):
    """The stage is built on its base's attached root, not on the VM's (no longer pristine)
    root, so the rebuild keeps its cached prefix."""
    from localsbx.definition.dockerfile import parse_dockerfile

    roots = {"debian-minimal": _root("debian-minimal", base.digest, base.rootfs)}
    vm["results"] = TAR_RESULTS
    first = parse_dockerfile(STAGED.format(step="c1"))
    await run_rooted(first, base, roots)
    vm["boots"].clear()
    keys, hist, rep = await run_rooted(parse_dockerfile(STAGED.format(step="c2")), base, roots)
    assert [h.cached for h in hist] == [True, False, False]
    assert vm["boots"][-1].read_bytes() == b"overlay:" + str(layers.disk_path(keys[0])).encode()
    assert len(vm["extra_disks"][-1]) == 1  # the base's root, a throwaway overlay of it
    assert vm["extra_disks"][-1][0] == b"overlay:" + str(base.rootfs).encode()
    g = vm["guests"][-1]
    assert _overlay_lowers(g) == ["/run/localsbx-src/0"]
    assert [c.argv[-1] for c in g.runs()] == ["make-it", "c2"]
    assert not any("running every step" in ln for ln in rep.lines)
    assert not list(store.paths.images_dir().glob(".tmp-*/roots"))


async def test_a_stage_on_another_image_starts_from_its_root_and_state(base, vm, tmp_path):
    from localsbx.definition.dockerfile import parse_dockerfile

    d = parse_dockerfile("FROM other-img AS b\nRUN make-it\nFROM debian-minimal\n"
                         "COPY --from=b /outdir /dst/\n")
    other = tmp_path / "other.qcow2"
    roots = {"other-img": _root("other-img", "o" * 32, other, kind="image",
                                env={"PATH": "/usr/bin:/bin", "FROM_IMG": "1"},
                                workdir="/w", user="app")}
    vm["results"] = TAR_RESULTS
    _, hist, _ = await run_rooted(d, base, roots)
    assert [h.cached for h in hist] == [False]
    assert vm["extra_disks"][-1][0] == b"overlay:" + str(other).encode()
    g = vm["guests"][-1]
    assert _overlay_lowers(g) == ["/run/localsbx-src/0"]
    (run,) = g.runs()
    inner = run.argv[run.argv.index("exec"):]  # chroot ROOT agent exec --cwd ... -- argv
    assert inner[inner.index("--cwd") + 1] == "/w" and inner[inner.index("--user") + 1] == "app"
    assert "FROM_IMG=1" in inner


async def test_copy_from_image_reads_the_attached_root(base, vm, tmp_path):
    from localsbx.definition.dockerfile import parse_dockerfile

    d = parse_dockerfile("FROM debian-minimal\nRUN a\nCOPY --from=tool:1 /outdir /dst/\n")
    assert d.stages == () and d.ops[1].from_image == "tool:1"
    roots = {"tool:1": _root("tool:1", "t" * 64, tmp_path / "tool.qcow2", kind="registry")}
    vm["results"] = TAR_RESULTS
    await run_rooted(d, base, roots)
    g = vm["guests"][-1]
    tars = [c for c in g.calls if c.argv[:1] == ["tar"]]
    assert tars and tars[0].argv[:3] == ["tar", "-C", "/run/localsbx-src/0"]
    assert g.tars  # the files were extracted into the image
    # without COPY --from left to run, nothing is attached
    vm["boots"].clear()
    d2 = parse_dockerfile("FROM debian-minimal\nRUN a\nCOPY --from=tool:1 /outdir /dst/\n"
                          "RUN after\n")
    await run_rooted(d2, base, roots)
    assert vm["extra_disks"][-1] == ()


def test_copy_from_image_key_has_the_image_digest(base, tmp_path):
    from localsbx.definition.dockerfile import parse_dockerfile

    d = parse_dockerfile("FROM debian-minimal\nRUN a\nCOPY --from=tool:1 /x /y\nRUN b\n")
    r1 = {"tool:1": _root("tool:1", "1" * 64, tmp_path / "a")}
    r2 = {"tool:1": _root("tool:1", "2" * 64, tmp_path / "a")}
    k1 = builder._step_keys(d, None, base, None, r1)
    k2 = builder._step_keys(d, None, base, None, r2)
    assert k1[0] == k2[0] and k1[1] != k2[1] and k1[2] != k2[2]
    assert builder._step_keys(d, None, base, None, r1) == k1


def test_stage_base_digest_is_in_the_key_of_steps_reading_the_stage(base, tmp_path):
    from localsbx.definition.dockerfile import parse_dockerfile

    d = parse_dockerfile("FROM other AS b\nRUN x\nFROM debian-minimal\nRUN a\n"
                         "COPY --from=b /x /y\n")
    k1 = builder._step_keys(d, None, base, None, {"other": _root("other", "1" * 64, tmp_path)})
    k2 = builder._step_keys(d, None, base, None, {"other": _root("other", "2" * 64, tmp_path)})
    assert k1[0] == k2[0] and k1[1] != k2[1]


async def test_an_unknown_copy_from_image_is_a_located_error(tmp_path):
    from localsbx.definition.dockerfile import parse_dockerfile
    from localsbx.errors import DefinitionError

    d = parse_dockerfile("FROM debian-minimal\nRUN a\nCOPY --from=nosuchthing /x /y\n",
                         source="Dockerfile")
    with pytest.raises(DefinitionError) as exc:
        await builder._resolve_roots(d, "default", Rep())
    assert str(exc.value).startswith("Dockerfile:3: COPY --from=nosuchthing: ")
    assert exc.value.hint


# --------------------------------------------------------------------------- ADD <url>
@pytest.fixture
def http_file():
    """A real HTTP server on 127.0.0.1 serving one mutable body; counts the GETs."""
    import http.server
    import threading

    state = {"body": b"one\n", "gets": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["gets"] += 1
            self.send_response(200)
            self.send_header("Content-Length", str(len(state["body"])))
            self.end_headers()
            self.wfile.write(state["body"])

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{srv.server_address[1]}/tool.sh"
    yield state
    srv.shutdown()
    srv.server_close()


async def test_add_url_is_keyed_by_the_body_it_downloads_as_buildkit(base, vm, http_file):
    """BuildKit's HTTP source keys its cache by the body's checksum: the same URL with new
    content reruns the ADD and every step after it; the same content is cached. One GET per
    build serves both the key and the copy, and no build context is needed for a URL."""
    d = defn(f"RUN a\nADD {http_file['url']} /opt/\nRUN b\n")
    keys, hist, _ = await run_build(d, base, ctx=BuildContext(None))
    assert http_file["gets"] == 1 and [h.cached for h in hist] == [False] * 3
    assert b"one\n" in vm["guests"][-1].tars[-1] and b"opt/tool.sh" in vm["guests"][-1].tars[-1]

    keys2, hist2, _ = await run_build(d, base, ctx=BuildContext(None))
    assert keys2 == keys and [h.cached for h in hist2] == [True] * 3
    assert http_file["gets"] == 2  # re-checked, as BuildKit does

    http_file["body"] = b"two\n"
    keys3, hist3, _ = await run_build(d, base, ctx=BuildContext(None))
    assert keys3[0] == keys[0] and keys3[1] != keys[1] and keys3[2] != keys[2]
    assert [h.cached for h in hist3] == [True, False, False]
    assert b"two\n" in vm["guests"][-1].tars[-1] and http_file["gets"] == 3


async def test_add_url_without_a_context_builds_and_a_local_copy_still_needs_one(
        base, vm, http_file, monkeypatch):
    from localsbx.build import resolve
    from localsbx.errors import DefinitionError

    seen = {}

    async def build(definition, ctx, rep, **kw):
        seen["ctx"] = ctx
        return "built"

    async def resolve_from(definition, say):
        return base, definition

    monkeypatch.setattr(builder, "_build", build)
    monkeypatch.setattr(resolve, "resolve_from", resolve_from)
    assert await builder.build_image_async(defn(f"ADD {http_file['url']} /opt/\n"),
                                           name="u") == "built"
    assert isinstance(seen["ctx"], BuildContext) and seen["ctx"].root is None
    assert http_file["gets"] == 1  # the image digest and the step keys share one download
    with pytest.raises(DefinitionError, match="no build context was given"):
        await builder.build_image_async(defn("COPY f /opt/\n"), name="u")
