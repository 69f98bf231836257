#!/bin/sh
# localsbx initramfs /init (busybox sh).  Guest side of "The guest contract" in
# docs/ARCHITECTURE.md; localsbx/vm/kernel.py:make_initramfs fills in @MODULES@.
#
# Loads the virtio modules, mounts /dev/vda as the new root with its API filesystems,
# configures eth0 for QEMU user networking, installs the per-VM identity (appended
# cpio, files under /localsbx/) into /run/localsbx/, mounts the boot kit (/kit: the
# agent and the dropbear bundle, which never live in the user's rootfs) read-only at
# /usr/lib/localsbx, says in words what the rootfs lacks, and switch_roots to the agent.
# Any Linux rootfs boots: no shell, no libc, no /etc are needed.
# Anything fatal prints "localsbx-init: ..." on the console and powers off, so the
# host sees QEMU exit instead of a hang.

export PATH=/bin

fail() {
    echo "localsbx-init: $*" >/dev/console
    sync
    poweroff -f
}

note() {
    echo "localsbx-init: note: $*" >/dev/console
}

mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
read -r cmdline </proc/cmdline
case " $cmdline " in
*" localsbx.probe=1 "*)
    echo LOCALSBX-PROBE-OK >/dev/console
    poweroff -f
    ;;
esac

for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
done

n=0
while [ ! -b /dev/vda ]; do
    n=$((n + 1))
    [ "$n" -gt 1000 ] && fail "no /dev/vda after 10 s (is the disk attached as virtio-blk-device?)"
    usleep 10000
done
# A VM template (localsbx/vm/template.py; its identity has localsbx/hold): it is booted on a
# placeholder disk and snapshotted here, before anything reads the root file system. A
# restore of it gets the real disk, and the host's QMP block_resize makes virtio-blk tell
# the guest the real disk's size: the change of size is the signal to go on. The cached
# blocks of the placeholder are dropped before the mount.
if [ -f /localsbx/hold ]; then
    read -r held </sys/block/vda/size
    echo LOCALSBX-HOLD >/dev/console
    size=$held
    while [ "$size" = "$held" ]; do
        usleep 5000
        read -r size </sys/block/vda/size
    done
    blockdev --flushbufs /dev/vda || fail "cannot drop the placeholder disk's cached blocks"
    # The clock is the template's until the host's fixup; the RTC (QEMU's, from the host
    # clock) gives the seconds now, so what is written below does not carry the template's
    # time (mount and write times, mount points made on the disk).
    hwclock -s -u 2>/dev/null || note "no RTC: the clock is the template's until the fixup"
fi
mkdir -p /newroot
mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount /dev/vda as ext4 (not a localsbx root filesystem?)"

r=/newroot
[ -x /kit/agent ] ||
    fail "this initramfs has no boot kit (/kit/agent): the base was built by an older localsbx; rebuild it (localsbx base build NAME --force)"
for d in bin sbin usr etc; do
    [ -e $r/$d ] && break
    [ $d = etc ] && note "the root filesystem has no /bin, /sbin, /usr or /etc: is it a Linux root filesystem?"
done
[ -d $r/etc ] || mkdir -p $r/etc || fail "cannot create /etc on the root filesystem"
# The boot kit: a read-only tmpfs at /usr/lib/localsbx (the mount point is the only thing
# ever created for it on the disk; done while /proc/mounts is readable, for the remount).
# Whatever the rootfs ships there is hidden, not used.
kit=$r/usr/lib/localsbx
if [ -L $kit ] || { [ -e $kit ] && [ ! -d $kit ]; }; then
    fail "/usr/lib/localsbx on the root filesystem is not a directory; the boot kit is mounted there"
fi
[ -d $kit ] || mkdir -p $kit || fail "cannot create the mount point /usr/lib/localsbx on the root filesystem"
mount -t tmpfs -o nosuid,nodev,mode=755,size=32m localsbx-kit $kit || fail "cannot mount a tmpfs for the boot kit"
cp -a /kit/. $kit/ && cp /bin/busybox $kit/busybox || fail "cannot copy the boot kit into /usr/lib/localsbx"
mount -o remount,ro,nosuid,nodev $kit || fail "cannot make the boot kit at /usr/lib/localsbx read-only"

for d in dev proc sys run tmp; do  # /tmp stays on the disk, as in Docker: RUN steps write there
    [ -d "$r/$d" ] || mkdir -p "$r/$d"
done
mount --move /dev $r/dev
mount --move /proc $r/proc
mount --move /sys $r/sys
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts $r/dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs $r/dev/shm
mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs $r/run
mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate cgroup2 $r/sys/fs/cgroup
ln -sf /proc/self/fd $r/dev/fd
ln -sf /proc/self/fd/0 $r/dev/stdin
ln -sf /proc/self/fd/1 $r/dev/stdout
ln -sf /proc/self/fd/2 $r/dev/stderr
ln -sf /proc/kcore $r/dev/core

ip link set lo up
if [ -e /sys/class/net/eth0 ] || ip link show eth0 >/dev/null 2>&1; then
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
    # Announce the guest (a gratuitous ARP) once the link carries frames (a frame sent
    # before virtio-net's carrier work has run is dropped): passt learns the guest's MAC
    # from its first frame and sends a host connection's SYN to the broadcast MAC before
    # that, which TCP drops; the host's first SSH try would wait out passt's 10 s SYN timeout.
    n=0
    state=
    while [ "$n" -lt 300 ]; do
        read -r state <$r/sys/class/net/eth0/operstate
        [ "$state" = up ] && break
        n=$((n + 1))
        usleep 10000
    done
    [ "$state" = up ] || note "eth0 is not up after 3 s (operstate $state)"
    arping -U -c 1 -w 1 -I eth0 10.0.2.15 >/dev/null 2>&1
fi

# Identity.  /etc/hostname, /etc/hosts, /etc/resolv.conf and /etc/machine-id are
# bind mounts of files in /run/localsbx (as Docker does for the first three), so the
# disk, and every image layer built on it, never records a per-VM identity.
run=$r/run/localsbx
mkdir -p $run/ssh
chmod 700 $run/ssh
hostname=localsbx
if [ -d /localsbx ]; then
    cp /localsbx/dropbear_ed25519_host_key $run/
    chmod 600 $run/dropbear_ed25519_host_key
    cp /localsbx/authorized_keys $run/ssh/authorized_keys
    chmod 600 $run/ssh/authorized_keys
    [ -f /localsbx/machine-id ] && cp /localsbx/machine-id $run/machine-id
    [ -f /localsbx/hostname ] && read -r hostname </localsbx/hostname
fi
hostname "$hostname"
echo "$hostname" >$run/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n' \
    "$hostname" >$run/hosts
echo "nameserver 10.0.2.3" >$run/resolv.conf
for f in hostname hosts resolv.conf machine-id; do
    [ -f $run/$f ] || continue
    t=$r/etc/$f
    # only plain files (or nothing): a symlink (systemd-resolved...) is the image's choice
    [ -L $t ] && continue
    [ -e $t ] || : >$t
    [ -f $t ] && mount --bind $run/$f $t
done

# What the rootfs lacks, in words (none of it stops the boot: management goes through the kit)
[ -e $r/bin/sh ] || [ -L $r/bin/sh ] ||
    note "no /bin/sh in the root filesystem: shell-form RUN and sh -c commands fail (exit 127); exec form works"
[ -f $r/etc/passwd ] ||
    note "no /etc/passwd in the root filesystem: USER and --user take numeric ids only"

# A base whose PID 1 is another init (debian-systemd: systemd) names it in
# /etc/localsbx/pid1; the agent then hands PID 1 over and keeps the kit's sshd in a child.
pid1=
[ -f $r/etc/localsbx/pid1 ] && read -r pid1 <$r/etc/localsbx/pid1
if [ -n "$pid1" ]; then
    exec switch_root $r /usr/lib/localsbx/agent init --exec "$pid1"
fi
exec switch_root $r /usr/lib/localsbx/agent init
