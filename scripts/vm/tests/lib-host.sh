# Host-side helpers for the VM tests' host-prepare and host-verify scripts (bash).
# Needs THINFS, THINFS_MOUNT, VM_WORK (suite.sh exports them).
set -euo pipefail

fail() { echo "FAIL: $*" >&2; exit 1; }
step() { echo "--- $*"; }

# sha256 of LENGTH bytes of thin device ID of the pool in ROOT, as `thinfs dev read` reads them.
# dev_sha ROOT ID LENGTH [OFFSET]
dev_sha() { "$THINFS" dev read --root "$1" "$2" --length "$3" --offset "${4:-0}" | sha256sum | cut -d' ' -f1; }

# Serves thin device ID of ROOT through thinfs-mount on MOUNTPOINT, runs FUNCTION MOUNTPOINT, then
# unmounts and waits for the daemon to commit and exit. Extra arguments go to thinfs-mount (-o ro).
# The daemon runs in the foreground (-f) as our child, so it is waited for by PID.
with_fuse() {
  local root=$1 id=$2 mnt=$3 fn=$4; shift 4
  mkdir -p "$mnt"
  "$THINFS_MOUNT" --root "$root" --device "$id" "$mnt" -f "$@" &
  local pid=$!
  local i
  for i in $(seq 100); do
    mountpoint -q "$mnt" && break
    kill -0 "$pid" 2>/dev/null || { wait "$pid" || true; fail "thinfs-mount of device $id exited before mounting"; }
    sleep 0.1
  done
  mountpoint -q "$mnt" || { kill "$pid"; wait "$pid" || true; fail "thinfs-mount of device $id did not mount"; }
  local rc=0
  "$fn" "$mnt" || rc=$?
  fusermount3 -u "$mnt" || { sleep 1; fusermount3 -u "$mnt"; }
  wait "$pid" || fail "thinfs-mount of device $id exited non-zero"
  ((rc == 0)) || fail "$fn on device $id failed ($rc)"
}

. "$VM_TESTS/common.sh"

# image_files ROOT ID SIZE: the file manifest of the ext4 on thin device ID, read through
# `thinfs dev read` and unpacked by debugfs (e2fsprogs' own ext4 reader); e2fsck -fn first.
# For devices thinfs-mount cannot serve: those the kernel made have no record in filesystems.json.
image_files() {
  local img="$VM_WORK/image-$2" dir="$VM_WORK/rdump-$2"
  "$THINFS" dev read --root "$1" "$2" --length "$3" > "$img"
  local log; log=$(e2fsck -fn "$img" 2>&1) || { echo "$log" >&2; fail "device $2: e2fsck -fn of the bytes thinfs reads is not clean"; }
  rm -rf "$dir"; mkdir -p "$dir"
  debugfs -R "rdump / $dir" "$img" >/dev/null 2>&1 || fail "device $2: debugfs rdump failed"
  fs_manifest "$dir"
  rm -rf "$dir" "$img"
}
