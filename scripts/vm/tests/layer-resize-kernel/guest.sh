# `thinfs layer resize` on the kernel pool (issue 13, "Growing a container that exists"): a
# container on an LVM thin pool (dm.thinpooldev), mounted through FUSE, with a file held open
# for writing and a writer running, grows from 64M to 192M with no remount. The kernel's dm-thin
# serves the bigger device (its table reloaded), df on the mount shows the new size at once, the
# writer goes past the old size, and every file reads back. The witnesses are the kernel's and
# e2fsprogs' tools: dmsetup table, e2fsck -fn and dumpe2fs on the thin device activated by the
# kernel, thin_check after lvchange -an. Then a shrink is refused, and an unmounted layer grows.
#
#   1. setup-lvm on a 512 MiB disk; init dm.basesize=64M; an image layer; create-rw; FUSE mount
#   2. a held-open file and a writer in the background; thinfs layer resize c1 192M
#   3. df shows ~192M; the writer (and a second file) go past 64M; checksums
#   4. shrink refused; umount; e2fsck -fn and dumpe2fs on the kernel-activated device
#   5. an unmounted layer grows (no daemon); e2fsck -fn; rm; thin_check after lvchange -an
set -euo pipefail
. /share/.vm/lib.sh
. ./common.sh
. ./layers-common.sh

W=/tmp/lrk; R=$W/root; M=$W/mnt
mkdir -p $W $M
VG=resize; POOL=$VG-thinpool
disk=$(vm_disk resize)
writer=""
on_exit() {
  local m n
  [ -z "$writer" ] || kill "$writer" 2>/dev/null || true
  exec 3>&- 2>/dev/null || true
  for m in $(awk -v w="$W/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r); do
    timeout 30 thinfs umount --root "$R" "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true
  done
  for n in $(active_thins) lrk-tmeta; do dmsetup remove --retry "$n" >/dev/null 2>&1 || true; done
  vgremove -q -f $VG >/dev/null 2>&1 || true
  pvremove -q -ff -y "$disk" >/dev/null 2>&1 || true
}
trap on_exit EXIT
# df_kb DIR: the filesystem's size in KiB, as df sees it through the kernel (statfs).
df_kb() { df -k "$1" | awk 'END {print $(NF-4)}'; }
# blocks_bytes DEV: block count times block size, from dumpe2fs -h.
blocks_bytes() {
  dumpe2fs -h "$1" 2>/dev/null | awk -F: '/^Block count/ {c=$2} /^Block size/ {s=$2} END {printf "%d\n", c * s}'
}

##############################################################################################
step "1. an LVM pool, a store on it, a container through FUSE"
opt=$(thinfs setup-lvm --device "$disk" --vg $VG --data-percent 80 --meta-percent 4)
echo "$opt"
vm_run thinfs init --root $R --storage-opt "$opt" --storage-opt dm.basesize=64M --storage-opt dm.min_free_space=0%
mkdir -p $W/content/etc
echo "an image layer" > $W/content/etc/motd
head -c 3000000 /dev/urandom > $W/content/etc/blob
tar -cf $W/content.tar -C $W/content etc
vm_run thinfs layer create --root $R img
vm_run thinfs layer apply-diff --root $R img $W/content.tar
vm_run thinfs layer create-rw --root $R c1 --parent img
d1=$(layer_field $R c1 deviceID)
vm_run thinfs mount --root $R c1 $M
[ "$(mount_kind $M)" = fuse.thinfs ] || vm_fail "$M is not a thinfs FUSE mount"
before=$(df_kb $M); echo "df before: $before KiB"
[ "$before" -le 65536 ] || vm_fail "the container starts at $before KiB, more than 64M"
# The device as the kernel's table sizes it (sectors).
dmsetup table "$POOL-$d1" 2>/dev/null || true

##############################################################################################
step "2. a held-open file and a running writer; resize to 192M"
head -c 1048576 /dev/urandom > $W/held1; head -c 1048576 /dev/urandom > $W/held2
exec 3>$M/held
cat $W/held1 >&3
head -c 1048576 /dev/urandom > $W/chunk
# The writer: 1 MiB at a time, 40 MiB in all, paced so that it runs across the resize.
( for i in $(seq 40); do cat $W/chunk >> $M/stream || exit 1; sleep 0.2; done ) &
writer=$!
sleep 1
t0=$(cut -d' ' -f1 /proc/uptime)
vm_run thinfs layer resize --root $R c1 192M
echo "RESULT: resize of a mounted layer took $(awk -v a="$t0" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN {printf "%.1f", b - a}') s"
kill -0 $writer 2>/dev/null || echo "note: the writer had finished before the resize returned"
dmsetup table "$POOL-$d1"
sectors=$(dmsetup table "$POOL-$d1" | awk '{print $2}')
[ "$sectors" = $((192 * 2048)) ] || vm_fail "the kernel's thin device has $sectors sectors, not 192M"

##############################################################################################
step "3. df grows; the writer and a second file go past the old size"
after=$(df_kb $M); echo "df after: $after KiB"
[ "$after" -gt 180000 ] && [ "$after" -le 196608 ] || vm_fail "df after the resize: $after KiB"
wait $writer || vm_fail "the writer failed"
writer=""
[ "$(stat -c %s $M/stream)" = $((40 * 1048576)) ] || vm_fail "stream is $(stat -c %s $M/stream) bytes"
cat $W/held2 >&3
exec 3>&-
head -c 80000000 /dev/urandom > $W/big
vm_run dd if=$W/big of=$M/big bs=1M conv=fsync status=none
[ "$(sha256sum < $M/big)" = "$(sha256sum < $W/big)" ] || vm_fail "big reads back different bytes"
[ "$(cat $W/held1 $W/held2 | sha256sum)" = "$(sha256sum < $M/held)" ] || vm_fail "held reads back different bytes"
for i in $(seq 40); do cat $W/chunk; done | sha256sum > $W/stream.sum
[ "$(sha256sum < $M/stream)" = "$(cat $W/stream.sum)" ] || vm_fail "stream reads back different bytes"
cmp $W/content/etc/blob $M/etc/blob || vm_fail "the image's etc/blob differs"
df -k $M

##############################################################################################
step "4. shrink refused; umount; e2fsck on the kernel-activated device"
expect_fail 'c1.*192M.*128M' thinfs layer resize --root $R c1 128M
[ "$(df_kb $M)" = "$after" ] || vm_fail "a refused shrink changed df: $(df_kb $M) KiB"
[ "$(layer_field $R c1 size)" = $((192 << 20)) ] || vm_fail "c1's size is $(layer_field $R c1 size)"
vm_run thinfs umount $M
wait_no_dm "$POOL-$d1" 10
dev=$(thinfs kernel-pool activate --pool $POOL "$d1" --size 192M) || vm_fail "kernel-pool activate $d1"
rc=0; e2fsck -fn "$dev" > $W/e2fsck.out 2>&1 || rc=$?
cat $W/e2fsck.out
bytes=$(blocks_bytes "$dev")
got=$(debugfs -R "cat /big" "$dev" 2>/dev/null | sha256sum)
vm_run thinfs kernel-pool deactivate --pool $POOL "$d1"
[ $rc = 0 ] || vm_fail "e2fsck -fn of the grown container: exit $rc"
[ "$bytes" = $((192 << 20)) ] || vm_fail "the grown ext4 has $bytes bytes of blocks"
[ "$got" = "$(sha256sum < $W/big)" ] || vm_fail "big on the device (debugfs) differs"

##############################################################################################
step "5. an unmounted layer grows; rm; thin_check"
vm_run thinfs layer create-rw --root $R c2 --parent img
d2=$(layer_field $R c2 deviceID)
vm_run thinfs layer resize --root $R c2 128M
dev=$(thinfs kernel-pool activate --pool $POOL "$d2" --size 128M) || vm_fail "kernel-pool activate $d2"
rc=0; e2fsck -fn "$dev" > $W/e2fsck2.out 2>&1 || rc=$?
bytes=$(blocks_bytes "$dev")
vm_run thinfs kernel-pool deactivate --pool $POOL "$d2"
[ $rc = 0 ] || { cat $W/e2fsck2.out; vm_fail "e2fsck -fn of the grown unmounted layer: exit $rc"; }
[ "$bytes" = $((128 << 20)) ] || vm_fail "the unmounted layer's ext4 has $bytes bytes of blocks"
vm_run thinfs layer rm --root $R c1
vm_run thinfs layer rm --root $R c2
vm_run thinfs layer rm --root $R img
[ -z "$(active_thins)" ] || vm_fail "thin devices left active: $(active_thins)"
dmsetup table ${VG}-thinpool_tmeta > $W/tmeta.table
vm_run lvchange -q -an $VG/thinpool
vm_run dmsetup create lrk-tmeta < $W/tmeta.table
thin_check /dev/mapper/lrk-tmeta || vm_fail "thin_check of the pool's metadata"
vm_run dmsetup remove lrk-tmeta
vm_run vgremove -q -f $VG
[ -z "$(pidof thinfs-mount)" ] || vm_fail "thinfs-mount daemons left: $(pidof thinfs-mount)"
echo "layer-resize-kernel: ok"
