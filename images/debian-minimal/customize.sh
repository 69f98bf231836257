#!/bin/sh
# debian-minimal customisation, run by mmdebstrap (--customize-hook) with the root tree
# as $1, after localsbx installed its guest files.  Keep it to what a Debian container
# image would also have: no localsbx plumbing here (that is localsbx/guest/).
set -eu
root=$1

# apt behaves like stock Debian inside the guest (mmdebstrap's build-time options go);
# the dpkg path excludes stay, as in the -slim container images
rm -f "$root/etc/apt/apt.conf.d/99mmdebstrap"

# identity files: per VM, bind-mounted over these by the initramfs /init
echo localsbx >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
echo "nameserver 10.0.2.3" >"$root/etc/resolv.conf"
: >"$root/etc/machine-id"
chmod 0644 "$root/etc/hostname" "$root/etc/hosts" "$root/etc/resolv.conf" "$root/etc/machine-id"
