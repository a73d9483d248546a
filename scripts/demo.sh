#!/usr/bin/env bash
# The main job end to end on the userspace pool: create a pool from two sparse
# files, write a thin device, snapshot it, overwrite the origin, and show that
# the snapshot still reads the old bytes; then the pool status and thin_check's verdict.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh >/dev/null
swift build -c release --product thinfs 2>&1 | tail -1
thinfs="$(swift build -c release --show-bin-path)/thinfs"

root=$(mktemp -d /var/tmp/thinfs-demo.XXXXXX)
trap 'rm -rf "$root"' EXIT
export THINFS_ROOT=$root
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

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
