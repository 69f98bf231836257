#!/bin/sh
# debian-systemd (and ubuntu-systemd) customisation, after the parent recipe's script:
# systemd as PID 1 in a VM that has no udev, no getty and no real hardware.
set -eu
root=$1

# /init execs this as PID 1 (the agent keeps the management SSH in a child)
mkdir -p "$root/etc/localsbx"
echo /usr/lib/systemd/systemd >"$root/etc/localsbx/pid1"

# nothing to log in on: the console is the VM's serial log, used by the host
for u in getty.target serial-getty@ttyS0.service console-getty.service \
    systemd-firstboot.service systemd-networkd-wait-online.service \
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
    fstrim.timer e2scrub_reap.service; do
    ln -sf /dev/null "$root/etc/systemd/system/$u"
done
# /tmp stays on the disk as in every localsbx base (and Docker): no tmpfs over it; and
# no units for hardware a microVM does not have (each one costs a second under TCG)
for u in tmp.mount modprobe@drm.service modprobe@efi_pstore.service systemd-pstore.service \
    sys-kernel-debug.mount sys-kernel-tracing.mount; do
    ln -sf /dev/null "$root/etc/systemd/system/$u"
done

# journal in memory (no writes into image layers), quick stops (the build VM powers off
# through systemd, and a sandbox's timeout should not wait 90 s for a unit)
mkdir -p "$root/etc/systemd/journald.conf.d" "$root/etc/systemd/system.conf.d"
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n' \
    >"$root/etc/systemd/journald.conf.d/50-localsbx.conf"
printf '[Manager]\nDefaultTimeoutStopSec=10s\nDefaultTimeoutStartSec=120s\n' \
    >"$root/etc/systemd/system.conf.d/50-localsbx.conf"
rm -rf "$root/var/log/journal"
