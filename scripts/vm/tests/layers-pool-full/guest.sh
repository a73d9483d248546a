# The layer store fills a small LVM thin pool (issue 5, "Pool full on a small pool"): a container
# mounted through FUSE is written until the kernel's dm-thin has no data block left. The writer gets
# the error the kernel gives (ENOSPC; EIO accepted and recorded), nothing hangs, the pool and the
# store say out_of_data_space, a new layer is refused naming dm.min_free_space; after lvextend the
# pool is rw again, the same mount takes new writes, and the container's ext4 is clean.
# The witnesses are the kernel's and lvm2's tools: dmsetup status, e2fsck -fn and debugfs on the
# thin device activated by the kernel, thin_dump -m of the live pool, thin_check after lvchange -an.
#
#   1. setup-lvm on a 256 MiB disk, data 20% (about 48 MiB): the VG keeps room to lvextend into;
#      autoextend off; errorwhenfull y
#   2. init (dm.basesize=256M: the container's ext4 is larger than the pool), an image layer from a
#      small tar, create-rw, FUSE mount
#   3. fill the container with random data until the write fails: errno and time recorded
#   4. the store reports it: dmsetup status, thinfs info, create-rw refused
#   5. lvextend: rw again, a new file written through the same mount reads back; umount;
#      e2fsck -fn on the kernel-activated thin device; the file's bytes read by debugfs
#   6. rm everything; thin_check after lvchange -an; the VG removed pass or fail
set -euo pipefail
. /share/.vm/lib.sh
. ./common.sh
. ./layers-common.sh

W=/tmp/lpf; R=$W/root; M=$W/mnt
mkdir -p $W $M
VG=poolfull; POOL=$VG-thinpool
disk=$(vm_disk poolfull)
# Pass or fail, leave no mount and no volume group behind: later tests in this boot run lvm2 too.
on_exit() {
  local m n
  for m in $(awk -v w="$W/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r); do
    timeout 30 thinfs umount --root "$R" "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true
  done
  for n in $(active_thins) lpf-tmeta lpf-tdata; do dmsetup remove --retry "$n" >/dev/null 2>&1 || true; done
  vgremove -q -f $VG >/dev/null 2>&1 || true
  pvremove -q -ff -y "$disk" >/dev/null 2>&1 || true
  if pvs --noheadings -o pv_name 2>/dev/null | grep -qw "$disk"; then echo "on_exit: $disk is still a physical volume"; fi
}
trap on_exit EXIT
node() { echo "/dev/mapper/$POOL-$1"; }
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# data_field N: field N of the pool's data used/total (1 used, 2 total), in pool blocks.
data_field() { dmsetup status "$(pool_target $POOL)" | awk -v n="$1" '{split($6, d, "/"); print d[n]}'; }
# A command that does not return is a finding, not a stuck suite: every step that writes to or
# resizes the pool runs under timeout (busybox's: exit 143 when it expires).
bounded() {
  local secs=$1 rc=0; shift
  timeout "$secs" "$@" || rc=$?
  [ $rc != 143 ] || vm_fail "'$*' hung: still running after $secs s"
  return $rc
}

##############################################################################################
step "1. a small LVM pool: no autoextend, errors at once when full"
opt=$(thinfs setup-lvm --device "$disk" --vg $VG --data-percent 20 --meta-percent 2 --autoextend-threshold 100)
echo "$opt"
[ "$opt" = "dm.thinpooldev=/dev/mapper/$POOL" ] || vm_fail "setup-lvm printed: $opt"
# Threshold 100 in the profile turns autoextend off; dmeventd's thin plugin still watches a
# monitored pool (and runs its thin_command when it fills), so stop monitoring too: nothing may
# grow or touch the pool under the test (as setup-lvm-autoextend does before its full pool).
grep -q 'thin_pool_autoextend_threshold *= *100' /etc/lvm/profile/$POOL.profile || vm_fail "profile: $(cat /etc/lvm/profile/$POOL.profile)"
vm_run lvchange -q --monitor n $VG/thinpool
lvs --noheadings -o seg_monitor $VG/thinpool | grep -q 'not monitored' || vm_fail "$VG/thinpool still monitored"
# LVM's default when a pool fills is to queue writes (the kernel's no_space_timeout, 60 s, then
# fails them with EIO); --errorwhenfull y loads the pool with error_if_no_space, so a write that
# needs a new block fails at once with ENOSPC.
vm_run lvchange -q --errorwhenfull y $VG/thinpool
[ "$(lvs --noheadings -o lv_when_full $VG/thinpool | tr -d ' ')" = error ] || vm_fail "lv_when_full: $(lvs --noheadings -o lv_when_full $VG/thinpool)"
dmsetup table "$(pool_target $POOL)"
dmsetup table "$(pool_target $POOL)" | grep -q error_if_no_space || vm_fail "the pool's table has no error_if_no_space"
vgs $VG
lvs -a $VG

step "2. init, an image layer with a little content, a container through FUSE"
vm_run thinfs init --root $R --storage-opt dm.thinpooldev=$POOL --storage-opt dm.basesize=256M \
  --storage-opt dm.min_free_space=0%
mkdir -p $W/content/etc
echo "image layer on a small pool" > $W/content/etc/motd
head -c 100000 /dev/urandom > $W/content/etc/blob
tar -cf $W/content.tar -C $W/content etc
vm_run thinfs layer create --root $R img
vm_run thinfs layer apply-diff --root $R img $W/content.tar
vm_run thinfs layer create-rw --root $R c1 --parent img
d1=$(layer_field $R c1 deviceID); size1=$(layer_field $R c1 size)
echo "c1: thin device $d1, $size1 bytes"
vm_run thinfs mount --root $R c1 $M
[ "$(mount_kind $M)" = fuse.thinfs ] || vm_fail "$M is not a thinfs FUSE mount: $(grep " $M " /proc/mounts)"
[ "$(cat $M/etc/motd)" = "image layer on a small pool" ] || vm_fail "the image's etc/motd reads '$(cat $M/etc/motd)'"
cmp $W/content/etc/blob $M/etc/blob || vm_fail "the image's etc/blob differs"

##############################################################################################
step "3. fill the container until the pool is full"
used=$(data_field 1); total=$(data_field 2)
bs=$(dmsetup table "$(pool_target $POOL)" | awk '{print $6}')     # data block size, sectors
free_mb=$(( (total - used) * bs / 2048 ))
# More than the pool has left, less than the container's ext4 has free: the pool fills first.
fill_mb=$(( free_mb + 24 ))
echo "pool data $used/$total blocks of $((bs / 2)) KiB ($free_mb MiB free); writing $fill_mb MiB of random data (dm-thin maps zero writes too, but random data leaves no doubt)"
df -k $M
t0=$(now); rc=0
# About 40 s on a quiet host under TCG, 85-135 s with the host's two cores busy: the bound is for
# a hang, not for speed.
bounded 420 dd if=/dev/urandom of=$M/fill bs=1M count=$fill_mb iflag=fullblock conv=fsync 2>$W/dd.err || rc=$?
took=$(since $t0)
cat $W/dd.err
echo "dd exit $rc after $took s"
[ $rc != 0 ] || vm_fail "$fill_mb MiB fitted in a pool with $free_mb MiB free"
# error_if_no_space: dm-thin fails the bio with BLK_STS_NOSPC (ENOSPC); EIO is what a queued bio
# gets after no_space_timeout, and what the FUSE server answers for an error it cannot name.
if grep -q 'No space left on device' $W/dd.err; then errno=ENOSPC
elif grep -q 'Input/output error' $W/dd.err; then errno=EIO
else vm_fail "the writer saw neither ENOSPC nor EIO: $(cat $W/dd.err)"; fi
# busybox dd says "error writing 'F'" when write(2) fails and "F: <error>" when fsync(2) does.
if grep -q 'error writing' $W/dd.err; then at="write(2)"; else at="fsync(2)"; fi
echo "RESULT: the writer saw $errno from $at after $took s"
ls -l $M/fill

##############################################################################################
step "4. the store reports the full pool"
st=$(dmsetup status "$(pool_target $POOL)"); echo "$st"
echo "$st" | grep -q ' out_of_data_space ' || vm_fail "the pool is not out_of_data_space"
[ "$(data_field 1)" = "$(data_field 2)" ] || vm_fail "data not full: $(data_field 1)/$(data_field 2)"
info=$(bounded 60 thinfs info --root $R) || vm_fail "thinfs info on the full pool failed: $info"
echo "$info"
echo "$info" | grep -qx ' Pool Mode: out_of_data_space' || vm_fail "thinfs info does not say 'Pool Mode: out_of_data_space'"
echo "$info" | grep -qx ' Data Space Available: 0 B' || vm_fail "thinfs info's Data Space Available is not 0 B"
expect_fail 'dm\.min_free_space' bounded 60 thinfs layer create-rw --root $R c2 --parent img
expect_fail 'dm\.min_free_space' bounded 60 thinfs layer create --root $R img2 --parent img
[ -z "$(layer_field $R c2 id)$(layer_field $R img2 id)" ] || vm_fail "a refused layer is listed"
# Reads need no new blocks: the container still reads.
[ "$(cat $M/etc/motd)" = "image layer on a small pool" ] || vm_fail "etc/motd no longer reads on the full pool"

##############################################################################################
step "5. lvextend; the same mount writes again"
t0=$(now)
vm_run bounded 60 lvextend -q -L +64M $VG/thinpool
echo "lvextend took $(since $t0) s"
st=$(dmsetup status "$(pool_target $POOL)"); echo "$st"
echo "$st" | grep -q ' rw ' || vm_fail "the pool is not rw after lvextend"
[ "$(data_field 2)" -gt "$total" ] || vm_fail "the pool did not grow: $(data_field 2) blocks, was $total"
info=$(bounded 60 thinfs info --root $R) || vm_fail "thinfs info after lvextend failed: $info"
echo "$info" | grep -E 'Pool Mode|Data Space'
echo "$info" | grep -qx ' Pool Mode: rw' || vm_fail "thinfs info does not say 'Pool Mode: rw' after lvextend"
head -c 2000000 /dev/urandom > $W/after.bin
after_sha=$(sha256sum < $W/after.bin | cut -d' ' -f1)
vm_run bounded 60 dd if=$W/after.bin of=$M/after.bin bs=64k conv=fsync status=none
echo "after lvextend" > $M/after.txt
[ "$(sha256sum < $M/after.bin | cut -d' ' -f1)" = "$after_sha" ] || vm_fail "after.bin reads back different bytes"
[ "$(cat $M/after.txt)" = "after lvextend" ] || vm_fail "after.txt reads '$(cat $M/after.txt)'"
ls -l $M
vm_run bounded 60 thinfs layer create-rw --root $R c2 --parent img
vm_run bounded 60 thinfs umount $M
[ -z "$(mount_kind $M)" ] || vm_fail "$M still mounted"
wait_no_dm "$POOL-$d1" 10
for i in $(seq 50); do [ -z "$(pidof thinfs-mount)" ] && break; sleep 0.2; done
[ -z "$(pidof thinfs-mount)" ] || vm_fail "thinfs-mount still running after the unmount: $(pidof thinfs-mount)"

step "5b. the container's ext4 after the failed writes, through the kernel"
dev=$(thinfs kernel-pool activate --pool $POOL "$d1" --size "$size1") || vm_fail "kernel-pool activate $d1"
rc=0; e2fsck -fn "$dev" > $W/e2fsck.out 2>&1 || rc=$?
cat $W/e2fsck.out
echo "RESULT: e2fsck -fn exit $rc"
got=$(debugfs -R "cat /after.bin" "$dev" 2>/dev/null | sha256sum | cut -d' ' -f1)
debugfs -R "stat /fill" "$dev" 2>/dev/null | sed -n '1,12p'
vm_run thinfs kernel-pool deactivate --pool $POOL "$d1"
[ $rc = 0 ] || vm_fail "e2fsck -fn of the container's ext4 after recovery: exit $rc"
[ "$got" = "$after_sha" ] || vm_fail "after.bin on the device (debugfs) differs from what was written"

##############################################################################################
step "6. rm, thin_check after lvchange -an, nothing left"
vm_run thinfs layer rm --root $R c1
vm_run thinfs layer rm --root $R c2
vm_run thinfs layer rm --root $R img
devs=$(pool_devs $POOL); echo "pool devices: [$devs]"
[ "$(echo $devs | wc -w)" = 1 ] || vm_fail "after rm the pool should hold only the base device: [$devs]"
[ -z "$(active_thins)" ] || vm_fail "thin devices left active: $(active_thins)"
dmsetup table ${VG}-thinpool_tmeta > $W/tmeta.table
vm_run lvchange -q -an $VG/thinpool
[ -z "$(dmsetup ls | awk -v p="$VG-" 'index($1, p) == 1')" ] || vm_fail "$VG-* devices still active after lvchange -an: $(dmsetup ls)"
# lvm2 2.03.16 refuses to activate the hidden tmeta LV: map it again from its saved table.
vm_run dmsetup create lpf-tmeta < $W/tmeta.table
thin_check /dev/mapper/lpf-tmeta || vm_fail "thin_check of the pool's metadata"
vm_run dmsetup remove lpf-tmeta
vm_run vgremove -q -f $VG
[ -z "$(pidof thinfs-mount)" ] || vm_fail "thinfs-mount daemons left: $(pidof thinfs-mount)"
echo "layers-pool-full: ok"
