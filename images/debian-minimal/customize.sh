#!/bin/sh
# debian-minimal customisation, run by mmdebstrap (--customize-hook) with the root tree
# as $1, after localsbx installed its guest files.  Keep it to what a Debian container
# image would also have: no localsbx plumbing here (that is localsbx/guest/).
set -eu
root=$1

# apt behaves like in Debian's container images: the --aptopt file (99mmdebstrap: no
# Recommends) goes (00mmdebstrap, mmdebstrap's own, is left out by guest-install.sh); no
# translation indexes; downloaded .debs and the binary caches are dropped after each run
# (Docker's docker-clean), so image layers stay small.  The dpkg path excludes
# (/etc/dpkg/dpkg.cfg.d/99mmdebstrap) stay, as in the -slim images.
rm -f "$root/etc/apt/apt.conf.d/99mmdebstrap"
echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/50localsbx-no-languages"
clean='"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true";'
cat >"$root/etc/apt/apt.conf.d/50localsbx-clean" <<END
DPkg::Post-Invoke { $clean };
APT::Update::Post-Invoke { $clean };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
END

# identity files: per VM, bind-mounted over these by the initramfs /init
echo localsbx >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
echo "nameserver 10.0.2.3" >"$root/etc/resolv.conf"
: >"$root/etc/machine-id"
chmod 0644 "$root/etc/hostname" "$root/etc/hosts" "$root/etc/resolv.conf" "$root/etc/machine-id"
