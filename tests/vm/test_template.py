"""VM templates with real QEMU (localsbx/vm/template.py): a base's guest held before its
root is mounted, restored on a real disk instead of a cold boot, for build and snapshot VMs."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import time
from pathlib import Path

import asyncssh
import pytest

from localsbx import store
from localsbx.vm import disk as vmdisk
from localsbx.vm import snapshot, template
from localsbx.vm.accel import choose_accel
from localsbx.vm.machine import Machine


def _digests(t: template.Template) -> dict:
    return {f.name: snapshot.file_digest(f) for f in (t.ram, t.state, t.initrd)}


def test_a_template_restores_on_the_real_disk_with_its_own_identity_and_the_host_clock(
        base_ready, tmp_path):
    base = base_ready

    async def go():
        accel = await choose_accel(base.kernel, base.initrd)
        key = store.management_key()
        t = await template.ensure(base, cpus=1, memory_mib=1024, accel=accel, client_key=key)
        made_at = json.loads((t.folder / template.META).read_text())["made_at"]
        before = _digests(t)
        seen, keys = [], []
        for i, ram in enumerate((None, tmp_path / "ram")):  # copy-on-write, then a RAM copy
            work = tmp_path / f"vm{i}"
            work.mkdir()
            overlay = work / "disk.qcow2"
            await vmdisk.create_overlay(overlay, base.rootfs)
            async with await Machine.from_template(
                    t, kernel=base.kernel, disk=overlay, workdir=work, accel=accel,
                    client_key=key, ram_file=ram, name="localsbx-test-template") as vm:
                r = await vm.guest.exec(["sh", "-c", "cat /sys/block/vda/size; date +%s; "
                                         "cat /etc/machine-id; hostname; "
                                         "stat -c %Y /run/localsbx/resolv.conf; "
                                         "echo written > /root/from-template; sync"])
                assert r.exit_status == 0, r.stderr
                sectors, now, machine_id, hostname, init_wrote = r.stdout.decode().split()
                assert int(sectors) * 512 == vmdisk.virtual_size(overlay)
                assert abs(int(now) - time.time()) < 10  # the clock was stepped to the host's
                # and /init, before that fixup, wrote with the RTC's time, not the template's
                assert abs(int(init_wrote) - time.time()) < 30
                assert hostname == "localsbx"
                seen.append(machine_id)
                # its own host key, which a new connection is served with
                pub = vm.host_key.export_public_key("openssh").decode().strip()
                assert pub != t.host_key
                keys.append(pub)
                await vm.guest.close()
                await vm.guest.connect(timeout=30)
                assert (await vm.guest.exec(["true"])).exit_status == 0
            assert (work / "initrd.cpio").read_bytes() == t.initrd.read_bytes()
        assert seen[0] != seen[1] and keys[0] != keys[1]  # each its own machine-id, host key
        if ram is not None:
            assert ram.stat().st_size == 1024 << 20
        # the template is never written, and a second ensure does not make it again
        assert _digests(t) == before
        again = await template.ensure(base, cpus=1, memory_mib=1024, accel=accel,
                                      client_key=key)
        assert json.loads((again.folder / template.META).read_text())["made_at"] == made_at

    asyncio.run(go())


@pytest.mark.parametrize("damage", ["state", "host_key"])
def test_a_build_whose_template_does_not_restore_cold_boots_and_discards_it(
        base_ready, tmp_path, monkeypatch, damage):
    """A template whose device state does not load, or whose guest answers with another
    host key than the recorded one (after the restore): the build still succeeds."""
    from localsbx import Sandbox
    from localsbx.build import builder
    from localsbx.build.builder import Reporter, build_image
    from localsbx.definition.dockerfile import parse_dockerfile

    base = base_ready
    accel = asyncio.run(choose_accel(base.kernel, base.initrd))
    real = asyncio.run(template.ensure(base, cpus=2, memory_mib=4096, accel=accel,
                                       client_key=store.management_key()))
    # a damaged copy (same sizes, so it loads; its device state is zeros), not the real one
    bad_dir = tmp_path / "templates" / real.folder.name
    shutil.copytree(real.folder, bad_dir)
    host_key = real.host_key
    if damage == "state":
        (bad_dir / "state.mig").chmod(0o600)
        (bad_dir / "state.mig").write_bytes(bytes(real.state.stat().st_size))
    else:
        host_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key(
            "openssh").decode().strip()
    bad = template.Template(bad_dir, real.cpus, real.memory_mib, host_key, real.key,
                            real.made_at)
    real_ensure = template.try_ensure

    async def fake(b, *, cpus, memory_mib, **kw):
        if (cpus, memory_mib) == (2, 4096):
            return bad
        return await real_ensure(b, cpus=cpus, memory_mib=memory_mib, **kw)

    monkeypatch.setattr(builder.vmtemplate, "try_ensure", fake)
    said: list[str] = []

    class R(Reporter):
        def say(self, text):
            said.append(text)

    nonce = secrets.token_hex(4)
    (tmp_path / "Dockerfile").write_text(f"FROM debian-minimal\nRUN echo {nonce} > /n\n")
    name = f"t-template-fallback-{nonce}"
    build_image(parse_dockerfile(tmp_path / "Dockerfile", name=name), context_dir=tmp_path,
                name=name, reporter=R())
    try:
        text = "\n".join(said)
        assert "does not restore" in text and "cold-boots" in text
        assert not bad_dir.exists()  # discarded: the next build makes a template anew
        assert real.folder.exists()
        with Sandbox.create(name) as sb:
            assert sb.run(["cat", "/n"]).stdout.strip() == nonce
    finally:
        store.remove_image(name)


def test_a_build_restores_its_build_and_snapshot_vms_from_templates(base_ready, tmp_path):
    from localsbx import Sandbox
    from localsbx.build.builder import Reporter, build_image
    from localsbx.definition.dockerfile import parse_dockerfile

    said: list[str] = []

    class R(Reporter):
        def say(self, text):
            said.append(text)

    nonce = secrets.token_hex(4)
    df = Path(tmp_path / "Dockerfile")
    df.write_text(f"FROM debian-minimal\nRUN echo {nonce} > /n && df -B1 / | tail -1 > /df\n")
    name = f"t-template-build-{nonce}"
    build_image(parse_dockerfile(df, name=name), context_dir=tmp_path, name=name, reporter=R())
    try:
        assert any(s.startswith("restoring build VM") and "(VM template)" in s for s in said)
        if base_ready.timings:  # the first image of a base cold-boots its snapshot VM
            assert any(s.startswith("restoring snapshot VM") for s in said), said
        with Sandbox.create(name) as sb:
            assert sb.run(["cat", "/n"]).stdout.strip() == nonce
            # the build saw the real disk (not the 1 MiB placeholder), and so does a sandbox
            size = int(sb.run(["cat", "/df"]).stdout.split()[1])
            assert size > 1 << 30
            assert int(sb.run(["cat", "/sys/block/vda/size"]).stdout) * 512 > 1 << 30
    finally:
        store.remove_image(name)
