#!/usr/bin/env bash
# Real BuildKit for the differential suite (tests/diff): Debian 13's docker.io (Docker 26,
# BuildKit 0.13 embedded) in an mmdebstrap chroot, driven by Debian 12's docker 20.10 client
# (DOCKER_BUILDKIT=1 uses the daemon's BuildKit; the newer clients need buildx). The recipe
# and its pitfalls: shared/notes/buildkit-oracle.md.
#
#   oracle.sh prepare          make the chroot and fetch the client, once (cached; ~1 min)
#   oracle.sh start RUNDIR     mount, start dockerd; prints DOCKER_HOST=... and DOCKER=...
#   oracle.sh stop RUNDIR      stop dockerd, unmount (idempotent)
#
# Cache: $LOCALSBX_DIFF_CACHE (default ~/.cache/localsbx-diff). Needs root (mounts, chroot).
set -euo pipefail

CACHE=${LOCALSBX_DIFF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/localsbx-diff}
R=$CACHE/trixie-docker
CLIENT=$CACHE/client/usr/bin/docker
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

mirror() {
  local m=""
  [ -f /etc/apt/sources.list.d/debian.sources ] &&
    m=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  [ -z "$m" ] && [ -f /etc/apt/sources.list ] &&
    m=$(awk '$1=="deb"{for(i=2;i<=NF;i++) if($i ~ /^https?:/){print $i; exit}}' /etc/apt/sources.list)
  echo "${LOCALSBX_MIRROR:-${m:-http://deb.debian.org/debian}}"
}

prepare() {
  mkdir -p "$CACHE"
  if [ ! -x "$CLIENT" ]; then
    # Only the client binary of the host's docker.io (never installed: no host dockerd).
    local tmp; tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download docker.io >/dev/null 2>&1 ||
       { $SUDO apt-get update -qq && apt-get download docker.io; })
    rm -rf "$CACHE/client.tmp"
    dpkg-deb -x "$tmp"/docker.io_*.deb "$CACHE/client.tmp"
    rm -rf "$tmp" "$CACHE/client"
    mv "$CACHE/client.tmp" "$CACHE/client"
  fi
  if [ ! -x "$R/usr/sbin/dockerd" ]; then
    rm -rf "$R.tmp"
    $SUDO mmdebstrap --variant=apt --quiet \
      --include=docker.io,containerd,runc,iptables,ca-certificates,xz-utils,bzip2,zstd,gzip \
      trixie "$R.tmp" "$(mirror)"
    rm -rf "$R"
    mv "$R.tmp" "$R"
  fi
}

start() {
  local run=$1
  prepare
  mkdir -p "$run"
  stop "$run" 2>/dev/null || true
  # dockerd needs / to be a mount point ("remount /, flags: 0x84000").
  $SUDO mount --bind "$R" "$R"
  $SUDO mount --make-private "$R"
  $SUDO mount -t proc proc "$R/proc"
  $SUDO mount --rbind /sys "$R/sys"
  $SUDO mount --make-rslave "$R/sys"
  $SUDO mount --rbind /dev "$R/dev"
  $SUDO mount --make-rslave "$R/dev"
  $SUDO mkdir -p "$R/tmp/d"
  echo "$run" > "$R/tmp/d/owner"
  $SUDO chroot "$R" /usr/sbin/dockerd --iptables=false --ip6tables=false --bridge=none \
    -H unix:///tmp/d/docker.sock --pidfile /tmp/d/pid --data-root /var/lib/docker \
    >"$run/dockerd.log" 2>&1 &
  echo $! > "$run/dockerd.pid"
  for _ in $(seq 1 120); do
    if DOCKER_HOST=unix://$R/tmp/d/docker.sock "$CLIENT" version >/dev/null 2>&1; then
      echo "DOCKER_HOST=unix://$R/tmp/d/docker.sock"
      echo "DOCKER=$CLIENT"
      return 0
    fi
    kill -0 "$(cat "$run/dockerd.pid")" 2>/dev/null || break
    sleep 0.5
  done
  echo "oracle.sh: dockerd did not start; its log:" >&2
  tail -n 30 "$run/dockerd.log" >&2
  stop "$run"
  return 1
}

stop() {
  local run=$1 pid
  if [ -f "$R/tmp/d/pid" ]; then
    pid=$(cat "$R/tmp/d/pid")
    if kill -0 "$pid" 2>/dev/null; then
      $SUDO kill "$pid"
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -0 "$pid" 2>/dev/null && $SUDO kill -9 "$pid"
    fi
    rm -f "$R/tmp/d/pid"
  fi
  [ -f "$run/dockerd.pid" ] && rm -f "$run/dockerd.pid"
  # containerd-shims left behind keep the mounts busy
  for m in "$R/var/lib/docker" "$R/run" "$R/proc" "$R/sys" "$R/dev"; do
    mountpoint -q "$m" 2>/dev/null && $SUDO umount -R "$m" 2>/dev/null || true
  done
  mountpoint -q "$R" 2>/dev/null && { $SUDO umount -R "$R" || $SUDO umount -lR "$R"; }
  return 0
}

case "${1:-}" in
  prepare) prepare ;;
  start) start "${2:?RUNDIR}" ;;
  stop) stop "${2:?RUNDIR}" ;;
  *) echo "usage: $0 prepare | start RUNDIR | stop RUNDIR" >&2; exit 2 ;;
esac
