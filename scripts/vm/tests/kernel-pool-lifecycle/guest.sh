# KernelThinPool on a real kernel, through `thinfs kernel-pool` (libdevmapper, no dmsetup in the
# code path; dmsetup is only the independent witness here):
# a loop-file pool; thin devices; a snapshot of an active origin (suspended, then resumed);
# status lines against dmsetup's; EBUSY on removing an open device; deferred remove, its cancel,
# and removal at last close, shown by `dmsetup info`; delete; the device list from a metadata
# snapshot; thin_check on the metadata afterwards.
set -euo pipefail
. /share/.vm/lib.sh
kp() { thinfs kernel-pool "$@"; }
step() { echo "--- $*"; }
# N bytes of a repeated line; `yes` dies of SIGPIPE when head is done, which pipefail would report.
pattern() { { yes "$1" 2>/dev/null || true; } | head -c "$2"; }

dir=/tmp/kp; mkdir -p $dir
step "loop pool"
vm_run kp create-loop --name kpool --data $dir/data --metadata $dir/meta --data-size 256M --metadata-size 16M
dmsetup table kpool | grep -q ' thin-pool 7:[0-9]* 7:[0-9]* 128 [0-9]* 1 skip_block_zeroing' || vm_fail "pool table: $(dmsetup table kpool)"
losetup -a

step "status: ours parses and prints back the kernel's line"
ours=$(kp status --pool kpool); theirs=$(dmsetup status kpool | cut -d' ' -f4- | sed 's/ *$//')
echo "thinfs: $ours"; echo "dmsetup: $theirs"
[ "$ours" = "$theirs" ] || vm_fail "status differs"
kp status --pool kpool --fields

step "thin device 1, 32 MiB of pattern A"
vm_run kp message --pool kpool create_thin 1
vm_run kp activate --pool kpool 1 --size 64M
[ -b /dev/mapper/kpool-1 ] || vm_fail "no /dev/mapper/kpool-1"
dmsetup table kpool-1 | grep -q "^0 131072 thin " || vm_fail "thin table: $(dmsetup table kpool-1)"
pattern A $((32 << 20)) | dd of=/dev/mapper/kpool-1 bs=1M oflag=direct status=none
sha_a=$(head -c $((32 << 20)) /dev/mapper/kpool-1 | sha256sum | cut -d' ' -f1)

step "snapshot of the active origin, then overwrite the origin"
vm_run kp message --pool kpool create_snap 2 1
dmsetup info kpool-1 | grep -q 'State: *ACTIVE$' || vm_fail "origin not resumed: $(dmsetup info kpool-1)"
pattern B $((32 << 20)) | dd of=/dev/mapper/kpool-1 bs=1M oflag=direct status=none
vm_run kp activate --pool kpool 2 --size 64M
sha_snap=$(head -c $((32 << 20)) /dev/mapper/kpool-2 | sha256sum | cut -d' ' -f1)
sha_b=$(head -c $((32 << 20)) /dev/mapper/kpool-1 | sha256sum | cut -d' ' -f1)
[ "$sha_snap" = "$sha_a" ] || vm_fail "snapshot does not read the origin's old bytes"
[ "$sha_b" != "$sha_a" ] || vm_fail "origin did not change"

step "thin status against dmsetup"
ours=$(kp dev-status --pool kpool 1); theirs=$(dmsetup status kpool-1 | cut -d' ' -f4-)
echo "thinfs: $ours / dmsetup: $theirs"
[ "$ours" = "$theirs" ] || vm_fail "thin status differs"
[ "$ours" = "65536 65535" ] || vm_fail "expected 32 MiB mapped: $ours"

step "device list from a metadata snapshot"
[ "$(kp list --pool kpool | tr '\n' ' ')" = "1 2 " ] || vm_fail "list: $(kp list --pool kpool)"
kp status --pool kpool | awk '$4 != "-" {exit 1}' || vm_fail "metadata snapshot still held"

step "removing an open device: EBUSY (retried, then reported)"
exec 3</dev/mapper/kpool-2
dmsetup info kpool-2 | grep -q 'Open count: *1' || vm_fail "open count: $(dmsetup info kpool-2)"
kp info --pool kpool 2
if out=$(kp deactivate --pool kpool 2 2>&1); then vm_fail "removing an open device succeeded"; fi
echo "$out"; echo "$out" | grep -q busy || vm_fail "error does not say busy: $out"

step "deferred remove, cancel, deferred remove, last close"
vm_run kp deactivate --pool kpool 2 --deferred
info=$(dmsetup info kpool-2); echo "$info"
echo "$info" | grep -q 'State: *ACTIVE (DEFERRED REMOVE)' || vm_fail "no deferred remove flag"
kp info --pool kpool 2 | grep -q 'deferred_remove=true' || vm_fail "thinfs info: $(kp info --pool kpool 2)"
vm_run kp cancel-deferred-remove --pool kpool 2
dmsetup info kpool-2 | grep -q 'DEFERRED REMOVE' && vm_fail "deferred remove not cancelled"
[ -b /dev/mapper/kpool-2 ] || vm_fail "node gone after cancel"
vm_run kp deactivate --pool kpool 2 --deferred
dmsetup info kpool-2 >/dev/null || vm_fail "removed while open"
exec 3<&-
sleep 1
dmsetup info kpool-2 >/dev/null 2>&1 && vm_fail "still there after the last close"
[ -e /dev/mapper/kpool-2 ] && vm_fail "node left behind"

step "delete: refused while the device is open, else deactivated first, then deleted"
exec 3</dev/mapper/kpool-1
if out=$(kp message --pool kpool delete 1 2>&1); then vm_fail "deleted a device held open"; fi
echo "$out"; echo "$out" | grep -q busy || vm_fail "error does not say busy: $out"
dmsetup info kpool-1 >/dev/null || vm_fail "the refused delete deactivated kpool-1"
exec 3<&-
vm_run kp message --pool kpool delete 1
dmsetup info kpool-1 >/dev/null 2>&1 && vm_fail "kpool-1 still active after its delete"
[ "$(kp list --pool kpool | tr '\n' ' ')" = "2 " ] || vm_fail "list after delete: $(kp list --pool kpool)"
kp dev-status --pool kpool 2    # activates 2 for the query only
dmsetup info kpool-2 >/dev/null 2>&1 && vm_fail "dev-status left kpool-2 active"

step "tear down; loop devices unbind with the pool; thin_check"
vm_run kp remove --name kpool
sleep 1
[ -z "$(losetup -a)" ] || vm_fail "loop devices left: $(losetup -a)"
# thin_check opens with O_DIRECT, which tmpfs refuses: check the file through a loop device.
loop=$(losetup -f --show $dir/meta)
thin_check "$loop" || { losetup -d "$loop"; vm_fail "thin_check"; }
losetup -d "$loop"
echo "kernel-pool-lifecycle: ok"
