#!/bin/sh
# localsbx base-image hook: installs the guest side of the contract (docs/ARCHITECTURE.md)
# into a fresh root tree and turns the tree into an ext4 image.  localsbx/base.py runs it
# through mmdebstrap --customize-hook, so it runs on the host (inside mmdebstrap's user
# namespace in unshare mode) with the chroot at $root and /proc, /sys, /dev mounted in it.
#
#   guest-install.sh install ROOT STAGE AGENT KERNEL_PKG BUSYBOX_PKG "PURGE_PKGS..."
#       - downloads KERNEL_PKG (a metapackage is followed to its linux-image-* dependency)
#         and BUSYBOX_PKG with apt-get download and unpacks them with dpkg-deb -x: the
#         kernel package is never installed, so initramfs-tools never runs;
#       - moves the kernel modules into ROOT/lib/modules/<version> and runs depmod;
#       - copies vmlinuz, the modules and busybox to STAGE (host side) for the initramfs;
#       - stages the boot kit in STAGE/kit/ (it goes into the initramfs, never into the
#         rootfs; /init mounts it at /usr/lib/localsbx): dropbear + every library it needs
#         + the dynamic loader in kit/dropbear/, AGENT as kit/agent, kit/sshd -> agent;
#         ROOT/usr/lib/localsbx stays an empty directory (the mount point);
#       - purges PURGE_PKGS (dropbear-bin) and what only they needed.
#   guest-install.sh mkfs ROOT IMAGE LABEL
#       - drops apt lists and caches, copies the tree (without the mounted /proc, /sys,
#         /dev, and mmdebstrap's build-time apt options) to a temporary directory and runs mkfs.ext4 -d into IMAGE, which the
#         caller pre-created at its final size (mode 0666, so a namespace root can write it).
set -eu
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

phase=$1
shift

in_root() {
    chroot "$root" /usr/bin/env -i DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

install_phase() {
    root=$1 stage=$2 agent=$3 kpkg=$4 bbpkg=$5 purge=$6
    work=/tmp/localsbx-build
    mkdir -p "$root$work/x"
    chmod 0777 "$root$work"

    echo "localsbx: downloading $kpkg and $bbpkg"
    kimg=$(in_root apt-cache depends "$kpkg" |
        sed -n 's/^ *Depends: \(linux-image-[^ <>]*\)$/\1/p' | head -n 1)
    [ -n "$kimg" ] || kimg=$kpkg
    in_root sh -c 'cd "$1" && apt-get download -q=2 "$2" "$3"' sh "$work" "$kimg" "$bbpkg"
    for deb in "$root$work"/*.deb; do
        in_root dpkg-deb -x "$work/${deb##*/}" "$work/x"
    done

    vmlinuz=$(ls "$root$work"/x/boot/vmlinuz-* | head -n 1)
    [ -f "$vmlinuz" ] || { echo "localsbx: no /boot/vmlinuz-* in $kimg" >&2; exit 1; }
    version=${vmlinuz##*/vmlinuz-}
    src=$root$work/x/usr/lib/modules/$version
    [ -d "$src" ] || src=$root$work/x/lib/modules/$version
    mkdir -p "$root/lib/modules"
    rm -rf "$root/lib/modules/$version"
    mv "$src" "$root/lib/modules/$version"
    in_root depmod -a "$version"
    echo "localsbx: kernel $version (package $kimg), modules in /lib/modules/$version"

    cp "$vmlinuz" "$stage/vmlinuz"
    cp -r "$root/lib/modules/$version" "$stage/modules"
    echo "$version" >"$stage/kernel-version"
    echo "$kimg" >"$stage/kernel-package"
    bb=$root$work/x/bin/busybox
    [ -f "$bb" ] || bb=$root$work/x/usr/bin/busybox
    cp "$bb" "$stage/busybox"

    echo "localsbx: bundling dropbear into the boot kit"
    kit=$stage/kit
    bundle=$kit/dropbear
    mkdir -p "$bundle" "$root/usr/lib/localsbx"
    in_root ldd /usr/sbin/dropbear >"$stage/dropbear.ldd"
    if grep -q 'not found' "$stage/dropbear.ldd"; then
        cat "$stage/dropbear.ldd" >&2
        exit 1
    fi
    # "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)".
    # Read the files through the chroot so absolute symlinks resolve inside it.
    while read -r name arrow path _; do
        if [ "$arrow" = "=>" ]; then
            in_root cat "$path" >"$bundle/$name"
        else
            case $name in /*) in_root cat "$name" >"$bundle/ld.so" ;; esac
        fi
    done <"$stage/dropbear.ldd"
    [ -s "$bundle/ld.so" ] || { echo "localsbx: no dynamic loader in ldd output" >&2; exit 1; }
    in_root cat /usr/sbin/dropbear >"$bundle/dropbear"
    chmod 0755 "$bundle"/*
    cp "$agent" "$kit/agent"
    chmod 0755 "$kit/agent"
    ln -sf agent "$kit/sshd"
    # The management account: uid 0 like root, but its login shell is the agent itself, so
    # host commands never go through bash or its rc files.  The management SSH server reads
    # its own copy of this account (agent.c: mgmt_namespace), so any rootfs works without
    # it; the line stays in Debian bases so images built before the boot kit look the same.
    grep -q '^localsbx:' "$root/etc/passwd" ||
        echo 'localsbx:x:0:0:localsbx management:/root:/usr/lib/localsbx/agent' >>"$root/etc/passwd"
    grep -q '^localsbx:' "$root/etc/shadow" ||
        echo 'localsbx:*:19000:0:99999:7:::' >>"$root/etc/shadow"
    grep -qx /usr/lib/localsbx/agent "$root/etc/shells" ||
        echo /usr/lib/localsbx/agent >>"$root/etc/shells"

    if [ -n "$purge" ]; then
        echo "localsbx: purging $purge"
        # shellcheck disable=SC2086  # a list of package names
        in_root apt-get purge -y -q=2 --autoremove $purge
    fi
    rm -rf "${root:?}$work"
}

mkfs_phase() {
    root=$1 image=$2 label=$3
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
        "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/archives/partial/* \
        "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old \
        "$root"/var/log/apt/* "$root"/var/log/dpkg.log "$root"/var/log/alternatives.log \
        "$root"/var/cache/ldconfig/aux-cache
    find "$root/tmp" "$root/var/tmp" -mindepth 1 -delete 2>/dev/null || true
    copy=$(mktemp -d "${TMPDIR:-/tmp}/localsbx-rootfs.XXXXXX")
    trap 'rm -rf "$copy"' EXIT
    # mmdebstrap removes its apt options file (00mmdebstrap) itself, but only after the hooks
    tar -C "$root" --numeric-owner --exclude=./dev/* --exclude=./proc/* --exclude=./sys/* \
        --exclude=./etc/apt/apt.conf.d/00mmdebstrap -cf - . | tar -C "$copy" --numeric-owner -xpf -
    echo "localsbx: mkfs.ext4 -d ($(du -sh "$copy" | cut -f1) of files)"
    mkfs.ext4 -q -F -L "$label" -m 0 -E lazy_itable_init=0,lazy_journal_init=0 -d "$copy" "$image"
}

case $phase in
install) install_phase "$@" ;;
mkfs) mkfs_phase "$@" ;;
*)
    echo "usage: guest-install.sh install|mkfs ..." >&2
    exit 2
    ;;
esac
