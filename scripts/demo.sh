#!/usr/bin/env bash
# The main job end to end on the userspace pool.
#
# Part 1, the layer store (needs root and /dev/fuse): init a store, import a small image,
# start a container rootfs through FUSE and run a program from the image in it with chroot,
# show `thinfs info` and `thinfs layer ls`, remove the busy container with deferred deletion,
# unmount, and see the deletion happen; thin_check at the end.
#
# Part 2, the pool underneath: create a pool from two sparse files, write a thin device,
# snapshot it, overwrite the origin, and show that the snapshot still reads the old bytes;
# then ext4 on thin devices through thinfs-mount.
#
# Part 3, containerd (needs root, /dev/fuse, containerd and runc): thinfs serve as the
# snapshotter of a private containerd (its own root, state and socket under the demo's scratch
# directory; a system containerd is left alone): import the image, run a container on ThinFS,
# list its snapshots and the store's layers, remove it all, thin_check.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh >/dev/null
swift build -c release --static-swift-stdlib --product thinfs 2>&1 | tail -1
swift build -c release --static-swift-stdlib --product thinfs-mount 2>&1 | tail -1
bin="$(swift build -c release --static-swift-stdlib --show-bin-path)"
thinfs="$bin/thinfs"
mount_cmd="$bin/thinfs-mount"

root=$(mktemp -d /var/tmp/thinfs-demo.XXXXXX)
serve_pid="" containerd_pid=""
# containerd's shims put their sockets in /run/containerd/s whatever the config says.
[[ -d /run/containerd ]] && run_containerd_existed=1 || run_containerd_existed=""
stop_pid() {  # SIGTERM, up to 20 s, then SIGKILL
  [[ -n $1 ]] && kill -0 "$1" 2>/dev/null || return 0
  kill "$1"
  for _ in $(seq 200); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
}
cleanup() {
  # containerd's containers, then its shims (by the socket in their command line), then it and serve.
  if [[ -n $containerd_pid ]]; then
    for id in $(runc --root "$root/ctr/runc/demo" list -q 2>/dev/null); do runc --root "$root/ctr/runc/demo" delete -f "$id"; done
    stop_pid "$containerd_pid"
    for p in /proc/[0-9]*; do
      { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -qF -- "-address $root/ctr/containerd.sock " && stop_pid "${p#/proc/}"
    done
  fi
  stop_pid "$serve_pid"
  [[ -n $run_containerd_existed ]] || rmdir /run/containerd/s /run/containerd 2>/dev/null || true
  { grep -oE " $root/[^ ]*" /proc/mounts || true; } | sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
  for m in "$root/mnt-origin" "$root/mnt-snap"; do
    if grep -q " $m " /proc/mounts 2>/dev/null; then umount "$m" 2>/dev/null || umount -l "$m"; fi
  done
  sleep 0.5
  if [[ -d "$root/store/mnt" ]] && grep -q " $root/store/mnt " /proc/mounts 2>/dev/null; then
    "$thinfs" umount "$root/store/mnt" || umount -l "$root/store/mnt"
  fi
  rm -rf "$root"
}
trap cleanup EXIT
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

if [[ -e /dev/fuse && $(id -u) -eq 0 ]]; then
  echo "# Part 1: the layer store"
  store="$root/store"
  mkdir -p "$store/mnt"
  scripts/make-test-image.sh "$root/image" >/dev/null
  step "$thinfs" init --root "$store" --storage-opt dm.basesize=1G --storage-opt dm.loopdatasize=10G \
    --storage-opt dm.loopmetadatasize=128M --storage-opt dm.use_deferred_deletion=true
  step "$thinfs" image import --root "$store" "$root/image/oci" --name demo
  top=$("$thinfs" image import --root "$store" "$root/image/oci" 2>/dev/null | tail -1)
  echo "(a second import reuses both layers: the chain ids match)"
  step "$thinfs" layer create-rw --root "$store" web --parent "$top"
  step "$thinfs" mount --root "$store" web "$store/mnt"
  step grep " $store/mnt " /proc/mounts
  echo
  echo "# a program from the image, run in the container's rootfs"
  step chroot "$store/mnt" /bin/busybox sh -c 'echo "hello from $(/bin/busybox uname -s) inside the container" > /hello; /bin/busybox cat /hello; /bin/busybox ls /'
  step "$thinfs" info --root "$store"
  step "$thinfs" layer ls --root "$store"
  echo
  echo "# the container's changes as an OCI layer tar"
  "$thinfs" layer diff --root "$store" web | tar -tvf -
  echo
  echo "# remove the container while it is mounted: deletion is deferred"
  step "$thinfs" layer rm --root "$store" web
  "$thinfs" info --root "$store" | grep "Deferred Deleted Device Count"
  step cat "$store/mnt/hello"
  step "$thinfs" umount "$store/mnt"
  for _ in $(seq 50); do [[ -e "$store/control.sock" ]] || break; sleep 0.1; done
  "$thinfs" info --root "$store" | grep "Deferred Deleted Device Count"
  step "$thinfs" cleanup --root "$store"
  step "$thinfs" layer ls --root "$store"
  step thin_check "$store/pool/metadata"
  echo
else
  echo "(skipping the layer store part: it needs /dev/fuse and root)"
fi

echo
echo "# Part 2: the thin pool underneath"
export THINFS_ROOT=$root

step "$thinfs" pool create --data-size 10G --metadata-size 64M --block-size 64K
step ls -lsh "$root/pool"
step "$thinfs" pool message create_thin 1

echo
echo "# 3 MiB of the origin's bytes, then a snapshot of it"
head -c 3M /dev/urandom > "$root/original"
step "$thinfs" dev write 1 < "$root/original"
step "$thinfs" pool message create_snap 2 1

echo
echo "# overwrite the origin's first 16 KiB and one byte range in its third block"
printf 'the origin was overwritten after the snapshot\n%.0s' {1..400} | head -c 16K > "$root/patch"
"$thinfs" dev write 1 --offset 0 < "$root/patch"
"$thinfs" dev write 1 --offset 140000 < "$root/patch"

echo
echo "# origin now starts with:"
"$thinfs" dev read 1 --length 46; echo
echo "# the snapshot still reads the old bytes:"
if "$thinfs" dev read 2 --length "$(stat -c %s "$root/original")" | cmp - "$root/original"; then
  echo "snapshot 2 == the original 3 MiB, byte for byte"
else
  echo "snapshot 2 differs from the original!" >&2; exit 1
fi
if "$thinfs" dev read 1 --length 3145728 | cmp -s - "$root/original"; then
  echo "origin unexpectedly unchanged!" >&2; exit 1
fi

step "$thinfs" dev status 1
step "$thinfs" dev status 2
step "$thinfs" pool status
step "$thinfs" pool status --human
echo
echo "# copy-on-write: the two devices share all blocks but the ones the overwrite touched"
"$thinfs" pool dump
echo
step thin_check "$root/pool/metadata"
echo
echo "thin_check: clean"

if [[ -e /dev/fuse && $(id -u) -eq 0 ]]; then
  echo
  echo "# Files through FUSE: an ext4 on thin device 3, read and written through libext2fs; the kernel never mounts it"
  step "$thinfs" pool message create_thin 3
  step "$thinfs" dev format 3 --size 1G
  mkdir -p "$root/mnt-origin" "$root/mnt-snap"
  step "$mount_cmd" --root "$root" --device 3 "$root/mnt-origin"
  step grep " $root/mnt-origin " /proc/mounts
  echo "hello from a thin device" > "$root/mnt-origin/hello.txt"
  cp -r /etc/apt "$root/mnt-origin/apt"
  step ls -la "$root/mnt-origin"
  step umount "$root/mnt-origin"
  sleep 0.5
  echo
  echo "# snapshot it, mount the snapshot read-only beside the origin, and change the origin"
  step "$thinfs" pool message create_snap 4 3
  step "$mount_cmd" --root "$root" --device 3 "$root/mnt-origin"
  step "$mount_cmd" --root "$root" --device 4 "$root/mnt-snap" -o ro
  echo "changed after the snapshot" > "$root/mnt-origin/hello.txt"
  step cat "$root/mnt-origin/hello.txt" "$root/mnt-snap/hello.txt"
  touch "$root/mnt-snap/nope" 2>&1 || echo "(the snapshot mount is read-only)"
  step df -h "$root/mnt-origin"
  step umount "$root/mnt-origin"
  step umount "$root/mnt-snap"
  sleep 0.5
  step thin_check "$root/pool/metadata"
else
  echo "(skipping the FUSE part: it needs /dev/fuse and root)"
fi

echo
if [[ -e /dev/fuse && $(id -u) -eq 0 ]] && command -v containerd >/dev/null && command -v ctr >/dev/null && command -v runc >/dev/null; then
  echo "# Part 3: a container through containerd on ThinFS"
  ctr_dir="$root/ctr"
  mkdir -p "$ctr_dir"
  [[ -d $root/image ]] || scripts/make-test-image.sh "$root/image" >/dev/null
  tar -C "$root/image/oci" -cf "$root/image/oci.tar" .
  echo "# thinfs serve: the store's owner, with containerd's snapshots API on a unix socket"
  echo "\$ $thinfs serve --root $ctr_dir/store --containerd-socket $ctr_dir/thinfs.sock &"
  "$thinfs" serve --root "$ctr_dir/store" --containerd-socket "$ctr_dir/thinfs.sock" --log-level warning \
    --storage-opt dm.basesize=1G --storage-opt dm.loopdatasize=10G >"$ctr_dir/serve.log" 2>&1 &
  serve_pid=$!
  for _ in $(seq 300); do [[ -S $ctr_dir/thinfs.sock ]] && break; sleep 0.1; done
  echo
  echo "# containerd's config: its own root, state and socket, and contrib/containerd-thinfs.toml's entry"
  sed "s|/run/thinfs/snapshots.sock|$ctr_dir/thinfs.sock|" contrib/containerd-thinfs.toml | grep -v '^#' | grep . >"$ctr_dir/thinfs.toml"
  { printf 'version = 2\nroot = "%s"\nstate = "%s"\n' "$ctr_dir/root" "$ctr_dir/state"
    printf 'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n[grpc]\n  address = "%s"\n' "$ctr_dir/containerd.sock"
    printf '[ttrpc]\n  address = "%s.ttrpc"\n[plugins."io.containerd.internal.v1.opt"]\n  path = "%s"\n' "$ctr_dir/containerd.sock" "$ctr_dir/opt"
    cat "$ctr_dir/thinfs.toml"; } >"$ctr_dir/config.toml"
  cat "$ctr_dir/thinfs.toml"
  containerd --config "$ctr_dir/config.toml" >"$ctr_dir/containerd.log" 2>&1 &
  containerd_pid=$!
  for _ in $(seq 300); do ctr --address "$ctr_dir/containerd.sock" version >/dev/null 2>&1 && break; sleep 0.1; done
  export CONTAINERD_ADDRESS=$ctr_dir/containerd.sock CONTAINERD_NAMESPACE=demo
  ctr plugins ls | grep -E '^TYPE|snapshotter.*thinfs'
  step ctr images import --snapshotter thinfs "$root/image/oci.tar"
  echo "# each layer of the image is a committed snapshot, and a thin snapshot in the pool:"
  step ctr snapshots --snapshotter thinfs ls
  step "$thinfs" layer ls --root "$ctr_dir/store"
  step ctr run --rm --runc-root "$ctr_dir/runc" --fifo-dir "$ctr_dir/fifo" --snapshotter thinfs thinfs-test:latest hello \
    /bin/sh -c 'echo "hello from a containerd container on ThinFS"; cat /etc/os-release; echo written > /mine; ls /; grep " / " /proc/mounts'
  echo "# usage: what each snapshot owns (the top layer's own blocks; the rest it shares with its parent)"
  step ctr snapshots --snapshotter thinfs usage
  echo "# containerd removes snapshots from the snapshotter at its garbage collection: --sync runs one"
  step ctr images rm --sync thinfs-test:latest
  step "$thinfs" layer ls --root "$ctr_dir/store"
  stop_pid "$containerd_pid"; containerd_pid=""
  stop_pid "$serve_pid"; serve_pid=""
  step thin_check "$ctr_dir/store/pool/metadata"
else
  echo "(skipping the containerd part: it needs /dev/fuse, root, containerd, ctr and runc)"
fi
