#!/bin/sh
# ubuntu-vnc: Firefox from Mozilla's APT repository (Ubuntu's own firefox package is a
# transitional stub for the snap, which cannot run here), pinned above Ubuntu's; then the
# desktop set-up shared with debian-vnc.
set -eu
root=$1
here=$(dirname "$0")

mkdir -p "$root/etc/apt/keyrings"
chroot "$root" sh -c 'wget -q -O- https://packages.mozilla.org/apt/repo-signing-key.gpg \
    >/etc/apt/keyrings/packages.mozilla.org.asc'
cat >"$root/etc/apt/sources.list.d/mozilla.sources" <<'END'
Types: deb
URIs: https://packages.mozilla.org/apt
Suites: mozilla
Components: main
Signed-By: /etc/apt/keyrings/packages.mozilla.org.asc
END
cat >"$root/etc/apt/preferences.d/mozilla" <<'END'
Package: *
Pin: origin packages.mozilla.org
Pin-Priority: 1000
END
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get update -q=2
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q=2 \
    --no-install-recommends firefox

sh "$here/../debian-vnc/customize.sh" "$root"
