# The layer store on a kernel thin pool made by `thinfs setup-lvm` (Docker's direct-lvm), adopted
# with dm.thinpooldev. The witnesses are the kernel's and lvm2's own tools: dmsetup (devices,
# deferred remove), thin_dump -m on a metadata snapshot of the live pool (the device list),
# thin_check on the metadata after lvchange -an, the kernel's ext4, and at the end the userspace
# engine reading the deactivated LVM pool.
#
#   1. import the busybox image, create-rw, FUSE mount, write, chroot-run busybox, umount, diff, rm;
#      thin_check (pool deactivated) and no thin device left active
#   2. deferred removal: the node held open across the unmount shows DEFERRED REMOVE
#   3. deferred deletion: rm while mounted (FUSE, then kernel) marks it deleted; umount deletes it
#   4. kernel-mount mode: the same files as through FUSE, and back; busy against a FUSE mount
#   5. dm.min_free_space on a small second pool: refused below it, allowed again after an rm
#   6. the LVM pool deactivated; the userspace engine opens its LVs and reads the same files
#   7. crash rollback (last: a failed recovery leaves the store unopenable): create.sent,
#      create.closed, create.recorded, delete.opened, delete.sent, delete.closed, create.opened, judged by
#      layer ls and thin_dump -m
set -euo pipefail
. /share/.vm/lib.sh
. ./common.sh
. ./layers-common.sh

W=/tmp/ltp; R=$W/root; M=$W/mnt; MK=$W/kmnt
mkdir -p $W $M $MK
POOL=docker-thinpool
# Pass or fail, leave no mount and no volume group behind: later tests in this boot run
# `thinfs setup-lvm` with the same VG name (docker), and two VGs of one name break lvm2.
on_exit() {
  exec 3<&- 2>/dev/null || true
  local m n d
  for m in $(awk -v w="$W/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r); do
    thinfs umount --root "$R" "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true
  done
  for n in $(active_thins) ltp-tmeta ltp-tdata; do dmsetup remove --retry "$n" >/dev/null 2>&1 || true; done
  for n in docker small; do vgremove -q -f "$n" >/dev/null 2>&1 || true; done
  for d in ltp-main ltp-small; do
    d=$(vm_disk $d 2>/dev/null) || continue
    pvremove -q -ff -y "$d" >/dev/null 2>&1 || true
    if pvs --noheadings -o pv_name 2>/dev/null | grep -qw "$d"; then echo "on_exit: $d is still a physical volume"; fi
  done
}
trap on_exit EXIT
node() { echo "/dev/mapper/$POOL-$1"; }

# offline_metadata NAME: deactivates the LVM pool (lvchange -an: the kernel commits and lets go),
# maps its metadata and data LVs again as NAME-tmeta and NAME-tdata from the tables saved
# beforehand (lvm2 2.03.16 refuses to activate these hidden component LVs), and runs thin_check.
offline_metadata() {
  dmsetup table docker-thinpool_tmeta > $W/tmeta.table
  dmsetup table docker-thinpool_tdata > $W/tdata.table
  vm_run lvchange -q -an docker/thinpool
  [ -z "$(dmsetup ls | awk '$1 ~ /^docker-/')" ] || vm_fail "docker-* devices still active after lvchange -an: $(dmsetup ls)"
  vm_run dmsetup create "$1-tmeta" < $W/tmeta.table
  vm_run dmsetup create "$1-tdata" < $W/tdata.table
  thin_check "/dev/mapper/$1-tmeta" || vm_fail "thin_check of the pool's metadata"
}
# dump_devs NODE: the device ids thin_dump reads from metadata NODE (not live).
dump_devs() { thin_dump "$1" | sed -n 's/.*<device dev_id="\([0-9]*\)".*/\1/p' | sort -n | tr '\n' ' ' | sed 's/ $//'; }

##############################################################################################
step "setup-lvm on a virtio disk; init adopts the empty pool"
opt=$(thinfs setup-lvm --device "$(vm_disk ltp-main)")
echo "$opt"
[ "$opt" = "dm.thinpooldev=/dev/mapper/$POOL" ] || vm_fail "setup-lvm printed: $opt"
# The option exactly as setup-lvm prints it (the /dev/mapper/ form; the small pool below uses a bare name).
vm_run thinfs init --root $R --storage-opt "$opt" --storage-opt dm.basesize=128M \
  --storage-opt dm.use_deferred_removal=true --storage-opt dm.use_deferred_deletion=true
thinfs info --root $R
base=$(pool_devs $POOL)
echo "pool devices after init: [$base]"
[ -n "$base" ] && [ "$(echo "$base" | wc -w)" = 1 ] || vm_fail "after init the pool should hold exactly the base device: [$base]"
[ -z "$(active_thins)" ] || vm_fail "an idle store left thin devices active: $(active_thins)"
expect_fail 'empty|already|in use|thin devices' thinfs init --root $W/second --storage-opt "$opt"

##############################################################################################
step "1. image import, create-rw, FUSE mount, write, chroot, umount, diff, rm"
top=$(thinfs image import --root $R /share/layers-thinpooldev/image/oci --name busybox | tail -1)
echo "top layer: $top"
json=$(thinfs layer ls --root $R --json)
[ "$(json_field "$json" "$top" kind)" = image ] || vm_fail "imported top layer $top is not listed as an image layer"
images=$(json_field "$json" '*' id | tr '\n' ' '); echo "layers: $images"
[ "$(echo $images | wc -w)" = 2 ] || vm_fail "the two-layer image gave layers [$images]"
img_devs="$base $(json_field "$json" '*' deviceID | tr '\n' ' ')"
img_devs=$(echo $img_devs | tr ' ' '\n' | sort -n | tr '\n' ' ' | sed 's/ $//')
[ "$(pool_devs $POOL)" = "$img_devs" ] || vm_fail "pool devices [$(pool_devs $POOL)], the store says [$img_devs]"

vm_run thinfs layer create-rw --root $R c1 --parent "$top"
d1=$(layer_field $R c1 deviceID); echo "c1: thin device $d1"
vm_run thinfs mount --root $R c1 $M
[ "$(mount_kind $M)" = fuse.thinfs ] || vm_fail "$M is not a thinfs FUSE mount: $(grep " $M " /proc/mounts)"
[ -b "$(node $d1)" ] || vm_fail "no $(node $d1) while c1 is mounted (active: $(active_thins))"
[ "$(cat $M/etc/motd)" = Welcome ] || vm_fail "the image's /etc/motd (layer 2) reads '$(cat $M/etc/motd)'"
[ ! -e $M/etc/issue ] || vm_fail "/etc/issue, deleted by layer 2's whiteout, is there"
echo "written through FUSE on a kernel pool" > $M/hello.txt
head -c 300000 /dev/urandom > $M/blob
blob_sha=$(sha256sum < $M/blob | cut -d' ' -f1)
out=$(chroot $M /bin/busybox sh -c 'echo "ran on $(/bin/busybox uname -s)" > /ran.txt; /bin/busybox cat /etc/hostname')
echo "chroot: $out"
[ "$out" = thinfs-test-2 ] || vm_fail "busybox in the container printed '$out'"
[ "$(cat $M/ran.txt)" = "ran on Linux" ] || vm_fail "the container's own write reads '$(cat $M/ran.txt)'"
vm_run thinfs umount $M
[ -z "$(mount_kind $M)" ] || vm_fail "$M still mounted"
wait_no_dm "$POOL-$d1" 10
[ -z "$(active_thins)" ] || vm_fail "thin devices active after the unmount: $(active_thins)"

vm_run thinfs layer diff --root $R c1 -o $W/c1.tar
tar -tvf $W/c1.tar
names=$(tar -tf $W/c1.tar | sed 's|^\./||')
for f in hello.txt blob ran.txt; do echo "$names" | grep -qx "$f" || vm_fail "the diff has no $f"; done
member() { tar -tf $W/c1.tar | grep -E "^(\./)?$1\$"; }
[ "$(tar -xOf $W/c1.tar "$(member hello.txt)")" = "written through FUSE on a kernel pool" ] || vm_fail "hello.txt in the diff differs"
[ "$(tar -xOf $W/c1.tar "$(member blob)" | sha256sum | cut -d' ' -f1)" = "$blob_sha" ] || vm_fail "blob in the diff differs"
echo "$names" | grep -q 'etc/motd' && vm_fail "the diff carries an unchanged image file"
[ -z "$(active_thins)" ] || vm_fail "diff left thin devices active: $(active_thins)"

vm_run thinfs layer rm --root $R c1
[ -z "$(layer_field $R c1 id)" ] || vm_fail "c1 still listed after rm"
[ "$(pool_devs $POOL)" = "$img_devs" ] || vm_fail "after rm the pool holds [$(pool_devs $POOL)], want [$img_devs]"
[ -z "$(active_thins)" ] || vm_fail "thin devices left active: $(active_thins)"
dmsetup ls

step "1b. thin_check of the deactivated pool; reactivated, the store carries on"
offline_metadata ltp
[ "$(dump_devs /dev/mapper/ltp-tmeta)" = "$img_devs" ] || vm_fail "thin_dump of the deactivated pool: [$(dump_devs /dev/mapper/ltp-tmeta)]"
vm_run dmsetup remove ltp-tmeta ltp-tdata
vm_run lvchange -q -ay docker/thinpool
pool_target $POOL >/dev/null
[ "$(layer_field $R "$top" kind)" = image ] || vm_fail "the store does not list its image after the pool was reactivated"

##############################################################################################
step "2. deferred removal: the thin device's node held open across the unmount"
vm_run thinfs layer create-rw --root $R c2 --parent "$top"
d2=$(layer_field $R c2 deviceID)
vm_run thinfs mount --root $R c2 $M
echo "c2" > $M/c2.txt
exec 3< "$(node $d2)"
vm_run thinfs umount $M
info=$(dmsetup info "$POOL-$d2" 2>&1) || vm_fail "$POOL-$d2 was removed although fd 3 holds it: $info"
echo "$info"
echo "$info" | grep -q 'State: *ACTIVE (DEFERRED REMOVE)' || vm_fail "no deferred remove pending on $POOL-$d2"
exec 3<&-
wait_no_dm "$POOL-$d2" 10
[ ! -e "$(node $d2)" ] || vm_fail "$(node $d2) left behind"
echo "removed at the last close"

step "3a. deferred deletion: rm of a FUSE-mounted layer"
vm_run thinfs mount --root $R c2 $M
[ "$(cat $M/c2.txt)" = c2 ] || vm_fail "c2.txt lost across the deferred removal"
out=$(thinfs layer rm --root $R c2) || vm_fail "rm of a busy layer with dm.use_deferred_deletion failed: $out"
echo "$out"
[ "$(layer_field $R c2 state)" = deleted ] || vm_fail "c2's state after rm: '$(layer_field $R c2 state)'"
has_word "$(pool_devs $POOL)" "$d2" || vm_fail "device $d2 was deleted while mounted"
[ "$(cat $M/c2.txt)" = c2 ] || vm_fail "the mounted, deleted layer no longer reads"
vm_run thinfs umount $M
wait_no_dm "$POOL-$d2" 10
devs=$(pool_devs $POOL)
if has_word "$devs" "$d2"; then
  echo "NOTE: device $d2 still in the pool after the unmount; thinfs cleanup"
  vm_run thinfs cleanup --root $R
  has_word "$(pool_devs $POOL)" "$d2" && vm_fail "device $d2 still in the pool after the unmount and thinfs cleanup"
fi
[ -z "$(layer_field $R c2 id)" ] || vm_fail "c2 still listed ($(layer_field $R c2 state)) after its deferred deletion"
[ "$(pool_devs $POOL)" = "$img_devs" ] || vm_fail "pool devices [$(pool_devs $POOL)], want [$img_devs]"

step "3b. deferred deletion: rm of a kernel-mounted layer"
vm_run thinfs layer create-rw --root $R kdel --parent "$top"
dk=$(layer_field $R kdel deviceID)
vm_run thinfs mount --kernel --root $R kdel $MK
[ "$(mount_kind $MK)" = ext4 ] || vm_fail "kernel mount: $MK is '$(mount_kind $MK)'"
out=$(thinfs layer rm --root $R kdel) || vm_fail "rm of a kernel-mounted layer with deferred deletion failed: $out"
echo "$out"
[ "$(layer_field $R kdel state)" = deleted ] || vm_fail "kdel's state after rm: '$(layer_field $R kdel state)'"
has_word "$(pool_devs $POOL)" "$dk" || vm_fail "device $dk deleted while the kernel has it mounted"
vm_run thinfs umount --root $R $MK
[ -z "$(mount_kind $MK)" ] || vm_fail "$MK still mounted"
wait_no_dm "$POOL-$dk" 10
if has_word "$(pool_devs $POOL)" "$dk"; then
  echo "NOTE: device $dk still in the pool after the kernel unmount; thinfs cleanup"
  vm_run thinfs cleanup --root $R
  has_word "$(pool_devs $POOL)" "$dk" && vm_fail "device $dk still in the pool after the unmount and thinfs cleanup"
fi
[ -z "$(layer_field $R kdel id)" ] || vm_fail "kdel still listed after its deferred deletion"

##############################################################################################
step "4. kernel-mount mode: the same layer through the kernel's ext4 and through FUSE"
vm_run thinfs layer create-rw --root $R keep --parent "$top"
dkeep=$(layer_field $R keep deviceID); keep_size=$(layer_field $R keep size)
vm_run thinfs mount --root $R keep $M
mkdir -p $M/srv/data; echo "through FUSE" > $M/srv/data/fuse.txt
head -c 200000 /dev/urandom > $M/srv/data/random.bin
ln -s data/fuse.txt $M/srv/link; chmod 0750 $M/srv/data; rm $M/etc/hostname.link
vm_run thinfs umount $M
vm_run thinfs mount --kernel --root $R keep $MK
[ "$(mount_kind $MK)" = ext4 ] || vm_fail "$MK is '$(mount_kind $MK)', not ext4"
[ "$(mount_source $MK)" = "$(node $dkeep)" ] || vm_fail "kernel mount of $(mount_source $MK), not $(node $dkeep)"
expect_fail 'busy|EBUSY|in use|mounted' thinfs mount --root $R keep $M
fs_manifest $MK > $W/kernel.files
grep -q '^F ./srv/data/fuse.txt 644 ' $W/kernel.files || vm_fail "the kernel does not see the file written through FUSE"
echo "through the kernel" > $MK/srv/kernel.txt
exec 3< "$(node $dkeep)"
vm_run thinfs umount --root $R $MK
[ -z "$(mount_kind $MK)" ] || vm_fail "$MK still mounted"
info=$(dmsetup info "$POOL-$dkeep" 2>&1) || vm_fail "$POOL-$dkeep removed although fd 3 holds it"
echo "$info" | grep -q 'State: *ACTIVE (DEFERRED REMOVE)' || vm_fail "kernel umount: no deferred remove pending: $info"
exec 3<&-
wait_no_dm "$POOL-$dkeep" 10
vm_run thinfs mount --root $R keep $M
[ "$(cat $M/srv/kernel.txt)" = "through the kernel" ] || vm_fail "FUSE does not see the kernel's write"
fs_manifest $M > $W/keep.files
vm_run thinfs umount $M
# FUSE now shows what the kernel showed, plus the one file the kernel wrote.
grep -q '^F ./srv/kernel.txt 644 ' $W/keep.files || vm_fail "FUSE's manifest lacks the kernel's file"
diff $W/kernel.files <(grep -v '^F ./srv/kernel.txt ' $W/keep.files) || vm_fail "the kernel's ext4 and FUSE show different files"
echo "kernel = FUSE: $(wc -l < $W/kernel.files) entries"

##############################################################################################
step "5. dm.min_free_space on a small pool"
sopt=$(thinfs setup-lvm --device "$(vm_disk ltp-small)" --vg small --data-percent 40 --meta-percent 5)
echo "$sopt"
R2=$W/small
vm_run thinfs init --root $R2 --storage-opt dm.thinpooldev=small-thinpool --storage-opt dm.basesize=64M \
  --storage-opt dm.min_free_space=50%
vm_run thinfs layer create --root $R2 fill
st=$(dmsetup status "$(pool_target small-thinpool)"); echo "$st"
used=$(echo "$st" | awk '{split($6, d, "/"); print d[1]}'); total=$(echo "$st" | awk '{split($6, d, "/"); print d[2]}')
bs=$(dmsetup table "$(pool_target small-thinpool)" | awk '{print $6}')     # data block size, sectors
need=$(( total * 50 / 100 ))
fill_mb=$(( ( (total - used - need) * bs * 512 + 1048575 ) / 1048576 + 3 ))
echo "data $used/$total blocks of $((bs / 2)) KiB; dm.min_free_space=50% wants $need free; writing $fill_mb MiB"
mkdir -p $W/fill; head -c $((fill_mb << 20)) /dev/urandom > $W/fill/big
tar -cf $W/fill.tar -C $W/fill big; rm -rf $W/fill
vm_run thinfs layer apply-diff --root $R2 fill $W/fill.tar
rm -f $W/fill.tar
st=$(dmsetup status "$(pool_target small-thinpool)"); echo "$st"
used=$(echo "$st" | awk '{split($6, d, "/"); print d[1]}')
[ $(( total - used )) -lt $need ] || vm_fail "the fill left $((total - used)) free blocks, not below $need: no refusal to test"
expect_fail 'dm\.min_free_space' thinfs layer create --root $R2 more --parent fill
expect_fail 'dm\.min_free_space' thinfs layer create-rw --root $R2 c --parent fill
[ -z "$(layer_field $R2 more id)$(layer_field $R2 c id)" ] || vm_fail "a refused layer is listed"
vm_run thinfs layer rm --root $R2 fill
dmsetup status "$(pool_target small-thinpool)"
vm_run thinfs layer create --root $R2 more
vm_run thinfs layer create-rw --root $R2 c --parent more
[ -z "$(active_thins)" ] || vm_fail "thin devices left active: $(active_thins)"
vm_run vgremove -q -f small

##############################################################################################
step "6. the LVM pool deactivated; the userspace engine reads its layers"
final=$(pool_devs $POOL)
has_word "$final" "$dkeep" || vm_fail "keep's device $dkeep is not in the pool: [$final]"
[ -z "$(active_thins)" ] || vm_fail "thin devices active with the store idle: $(active_thins)"
offline_metadata ltp
[ "$(dump_devs /dev/mapper/ltp-tmeta)" = "$final" ] || vm_fail "thin_dump of the deactivated pool: [$(dump_devs /dev/mapper/ltp-tmeta)], live [$final]"
U=$W/userspace
vm_run thinfs pool open --root $U --data /dev/mapper/ltp-tdata --metadata /dev/mapper/ltp-tmeta
vm_run thinfs pool check --root $U
diff <(thin_dump /dev/mapper/ltp-tmeta) <(thinfs pool dump --root $U) > $W/dump.diff || { head -20 $W/dump.diff; vm_fail "thinfs pool dump differs from thin_dump"; }
vm_run thinfs dev read --root $U "$dkeep" --length "$keep_size" > $W/keep.img
e2fsck -fn $W/keep.img || vm_fail "e2fsck -fn of keep's bytes as the userspace engine reads them"
mkdir -p $W/rdump
debugfs -R "rdump / $W/rdump" $W/keep.img >/dev/null 2>&1 || vm_fail "debugfs rdump"
fs_manifest $W/rdump > $W/userspace.files
# debugfs rdump skips special files (the image's fifo and device nodes) and drops the set-id and
# sticky bits: compare the rest with permission bits only, then ask debugfs for those directly.
perm9() { awk '$1 != "O" { if ($1 != "L" && length($3) == 4) $3 = substr($3, 2); print }' "$1"; }
diff <(perm9 $W/keep.files) <(perm9 $W/userspace.files) || vm_fail "the userspace engine reads other files than FUSE showed"
for p in $(awk '$1 == "O" {print substr($2, 2)}' $W/keep.files); do
  t=$(debugfs -R "stat $p" $W/keep.img 2>/dev/null | sed -n 's/.*Type: \([a-zA-Z]*\).*/\1/p')
  case $t in FIFO|character|block|socket) ;; *) vm_fail "special file $p is '$t' in the userspace engine's bytes" ;; esac
done
awk '$1 != "L" && length($3) == 4 {print substr($2, 2), $3}' $W/keep.files | while read -r p mode; do
  got=$(debugfs -R "stat $p" $W/keep.img 2>/dev/null | sed -n 's/.*Mode: *\([0-7]*\).*/\1/p')
  [ "$((8#$got))" = "$((8#$mode))" ] || vm_fail "$p: mode $got in the userspace engine's bytes, $mode through FUSE"
  echo "mode $mode: $p"
done
rm -rf $W/rdump $W/keep.img
echo "userspace engine = FUSE = kernel: $(wc -l < $W/userspace.files) entries"
thin_check /dev/mapper/ltp-tmeta || vm_fail "thin_check after the userspace engine opened the pool"
vm_run dmsetup remove ltp-tmeta ltp-tdata
vm_run lvchange -q -ay docker/thinpool
[ "$(pool_devs $POOL)" = "$final" ] || vm_fail "pool devices after reactivation [$(pool_devs $POOL)], want [$final]"

##############################################################################################
step "7. crash rollback (SIGKILL at a journal step; the next command's open repairs)"
[ -z "$(pidof thinfs-mount)" ] || vm_fail "a thinfs-mount daemon is still running ($(pidof thinfs-mount)): the creates would go through it"
# crash POINT CMD...: runs CMD with THINFS_CRASH_AT=POINT; it must die of SIGKILL (exit 137).
crash() {
  local point=$1 rc=0; shift
  THINFS_CRASH_AT=$point "$@" || rc=$?
  [ $rc = 137 ] || vm_fail "THINFS_CRASH_AT=$point $*: exit $rc, not 137 (SIGKILL)"
}
# create_crash POINT: a create-rw killed at POINT; afterwards the layer is not listed and the pool
# holds the devices it held before (create.recorded: the layer is listed with its device).
create_crash() {
  local point=$1 before mid want
  before=$(pool_devs $POOL)
  crash $point thinfs layer create-rw --root $R crash --parent "$top"
  mid=$(pool_devs $POOL)
  echo "$point: pool before [$before], after the crash [$mid]"
  # Before the send the pool has no new device; from the send on it has one.
  want=$(echo $before | wc -w); [ $point = create.opened ] || want=$((want + 1))
  [ "$(echo $mid | wc -w)" = $want ] || vm_fail "$point: $(echo $mid | wc -w) devices after the crash, want $want"
  # This listing's open is the recovery.
  json=$(thinfs layer ls --root $R --json) || vm_fail "$point: thinfs layer ls --root $R (the recovering open) failed"
  echo "layers after recovery: $(json_field "$json" '*' id | tr '\n' ' ')"
  if [ $point = create.recorded ]; then
    # The row was written with the journal entry's removal: the create happened.
    [ "$(json_field "$json" crash kind)" = container ] || vm_fail "$point: the created layer is not listed after recovery"
    [ "$(pool_devs $POOL)" = "$mid" ] || vm_fail "$point: pool devices after recovery [$(pool_devs $POOL)], want [$mid]"
    [ -z "$(active_thins)" ] || vm_fail "$point: thin devices left active: $(active_thins)"
    vm_run thinfs layer rm --root $R crash
  else
    [ -z "$(json_field "$json" crash id)" ] || vm_fail "$point: the half-made layer is listed after recovery"
  fi
  [ "$(pool_devs $POOL)" = "$before" ] || vm_fail "$point: pool devices after recovery [$(pool_devs $POOL)], want [$before]"
  [ -z "$(active_thins)" ] || vm_fail "$point: thin devices left active: $(active_thins)"
}
# delete_crash POINT: rm of a fresh container killed at POINT; afterwards the layer and its device
# are gone (the user asked for the removal: recovery finishes it).
delete_crash() {
  local point=$1 dc before mid
  vm_run thinfs layer create-rw --root $R crash --parent "$top"
  dc=$(layer_field $R crash deviceID)
  before=$(pool_devs $POOL)
  crash $point thinfs layer rm --root $R crash
  mid=$(pool_devs $POOL)
  echo "$point: device $dc; pool before [$before], after the crash [$mid]"
  if [ $point = delete.opened ]; then
    has_word "$mid" "$dc" || vm_fail "$point: the device went before the delete was sent"
  else
    has_word "$mid" "$dc" && vm_fail "$point: the device survived the sent delete"
  fi
  json=$(thinfs layer ls --root $R --json) || vm_fail "$point: thinfs layer ls --root $R (the recovering open) failed"
  echo "layers after recovery: $(json_field "$json" '*' id | tr '\n' ' ')"
  [ -z "$(json_field "$json" crash id)" ] || vm_fail "$point: the layer whose removal was asked for is still listed"
  has_word "$(pool_devs $POOL)" "$dc" && vm_fail "$point: device $dc still in the pool after recovery"
  [ "$(pool_devs $POOL)" = "$final" ] || vm_fail "$point: pool devices after recovery [$(pool_devs $POOL)], want [$final]"
  [ -z "$(active_thins)" ] || vm_fail "$point: thin devices left active: $(active_thins)"
}
# One point per branch of the recovery: create rolled back with the device made (sent: dm-thin
# committed create_snap alone; closed: with the transaction id, no row yet) and not made
# (opened), done (recorded); delete finished with the device there (opened) and gone (sent), and
# already committed (closed).
create_crash create.sent
create_crash create.closed
create_crash create.recorded
delete_crash delete.opened
delete_crash delete.sent
delete_crash delete.closed
create_crash create.opened

step "the end: nothing left"
vm_run vgremove -q -f docker
[ -z "$(pidof thinfs-mount)" ] || vm_fail "thinfs-mount daemons left: $(pidof thinfs-mount)"
left=$(dmsetup ls | awk '$1 != "No"'); [ -z "$left" ] || vm_fail "dm devices left: $left"
echo "layers-thinpooldev: ok"
