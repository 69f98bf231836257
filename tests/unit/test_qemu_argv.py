"""The QEMU argv builder is pure: these pin the recipe's choices."""

from pathlib import Path

from localsbx.vm import snapshot
from localsbx.vm.qemu import Accel, VMSpec, build_argv, kernel_cmdline, opts

P = Path


def spec(**kw):
    base = dict(kernel=P("/b/vmlinux"), initrd=P("/b/initrd"), disk=P("/s/overlay.qcow2"),
                serial_log=P("/s/serial.log"), qmp_socket=P("/s/qmp.sock"),
                accel=Accel("tcg", 2445404), net_socket=P("/s/net/passt.sock"))
    base.update(kw)
    return VMSpec(**base)


def value(argv, flag):
    return argv[argv.index(flag) + 1]


def test_tcg_argv_follows_recipe():
    argv = build_argv(spec())
    assert argv[0] == "qemu-system-x86_64"
    assert value(argv, "-M") == "microvm"
    assert value(argv, "-accel") == "tcg,tb-size=64"
    assert value(argv, "-cpu") == "max"
    assert value(argv, "-m") == "1024M"
    assert value(argv, "-smp") == "1"
    assert "tsc_early_khz=2445404" in value(argv, "-append")
    assert "acpi=off" not in " ".join(argv)  # pitfall 2: virtio-mmio needs ACPI
    assert value(argv, "-netdev") == (
        "stream,id=n0,server=off,addr.type=unix,addr.path=/s/net/passt.sock")
    assert value(argv, "-device") == "virtio-blk-device,drive=root"
    assert "-incoming" not in argv


def test_kvm_argv_has_no_tsc_hack():
    argv = build_argv(spec(accel=Accel("kvm")))
    assert value(argv, "-accel") == "kvm"
    assert value(argv, "-cpu") == "host"
    assert "tsc_early_khz" not in kernel_cmdline(spec(accel=Accel("kvm")))


def test_ram_file_shared_for_snapshot_and_private_for_clones():
    src = build_argv(spec(ram_file=P("/i/snap/ram"), ram_share=True))
    assert value(src, "-M") == "microvm,memory-backend=mem"
    assert value(src, "-object") == "memory-backend-file,id=mem,size=1024M,mem-path=/i/snap/ram,share=on"
    clone = build_argv(spec(ram_file=P("/i/snap/ram"), ram_share=False, incoming=True))
    assert value(clone, "-object").endswith("share=off")
    assert value(clone, "-incoming") == "defer"


def test_commas_in_paths_are_escaped():
    argv = build_argv(spec(disk=P("/odd,dir/disk.qcow2")))
    assert value(argv, "-drive").startswith("file=/odd,,dir/disk.qcow2,if=none,")
    assert opts("a,b", x="1,2", flag=True) == "a,,b,x=1,,2,flag=on"


def test_snapshot_key_ignores_paths_but_not_shape():
    a = snapshot.snapshot_key(spec(ram_file=P("/x/ram"), incoming=True), kernel_digest="k1")
    b = snapshot.snapshot_key(spec(ram_file=P("/y/ram"), disk=P("/z/o.qcow2"), incoming=True),
                              kernel_digest="k1")
    assert a == b
    c = snapshot.snapshot_key(spec(ram_file=P("/x/ram"), memory_mib=4096, incoming=True),
                              kernel_digest="k1")
    diffs = snapshot.key_mismatch(a, c)
    assert any("RAM" in d and "1024" in d and "4096" in d for d in diffs)
    d = snapshot.snapshot_key(spec(ram_file=P("/x/ram"), cpus=4, incoming=True), kernel_digest="k2")
    assert {x.split(":")[0] for x in snapshot.key_mismatch(a, d)} >= {"vCPUs", "kernel"}


def test_snapshot_vm_and_its_clones_have_the_same_key():
    src = spec(ram_file=P("/img/tmp/snap/ram"), ram_share=True, name="localsbx-snap-x")
    clone = spec(ram_file=P("/img/d/snap/ram"), ram_share=False, incoming=True,
                 initrd=P("/img/d/snap/initrd.cpio"), disk=P("/sbx/o.qcow2"), name="localsbx-abc")
    assert snapshot.snapshot_key(src, kernel_digest="k") == snapshot.snapshot_key(clone, kernel_digest="k")
