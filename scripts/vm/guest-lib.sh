# Helpers for guest scripts: `. /share/.vm/lib.sh` (run.sh copies this file there).

# The /dev node of the virtio disk attached with `run.sh --drive NAME=FILE` (or the scratch disk,
# serial thinfs-scratch). No udev in the guest, so go by /sys/block/*/serial.
vm_disk() {
  local d
  for d in /sys/block/vd*; do
    [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ] && { echo "/dev/${d##*/}"; return 0; }
  done
  echo "vm_disk: no virtio disk with serial $1" >&2
  return 1
}

# Fails the script with a message.
vm_fail() { echo "FAIL: $*" >&2; exit 1; }

# Runs a command, failing the script with the command line if it fails.
vm_run() { "$@" || vm_fail "$* (exit $?)"; }

# Every device-mapper device, deepest first (thin devices before their pools), then every loop
# device: leaves the guest clean for the next test.
vm_dm_cleanup() {
  local n
  for n in $(dmsetup ls 2>/dev/null | awk '$1 != "No" {print $1}' | sort -r); do
    case $n in *pool*) ;; *) dmsetup remove --retry "$n" 2>/dev/null ;; esac
  done
  for n in $(dmsetup ls 2>/dev/null | awk '$1 != "No" {print $1}'); do dmsetup remove --retry "$n" 2>/dev/null; done
  losetup -D 2>/dev/null
  return 0
}
