# The layer store on the loop backend (thinfs.backend=loop, Docker's loop-lvm): ROOT/pool/{data,
# metadata} on loop devices under the kernel's dm-thin, as thinfs-MAJ:MIN-INO-pool (the root's
# device and inode). A short lifecycle: an image layer filled with apply-diff, create-rw, FUSE
# mount, write, umount; a kernel mount, during which rm is refused with EBUSY (no deferred
# deletion here); rm. Whenever the store is idle, nothing is left: `losetup -a` and `dmsetup ls`
# are empty. At the end thin_check, thin_dump and the userspace engine read the pool files.
set -euo pipefail
. /share/.vm/lib.sh
. ./common.sh
. ./layers-common.sh

disk=$(vm_disk ltl-root)
mkfs.ext4 -q -E nodiscard "$disk"
W=/mnt/ltl; mkdir -p $W; mount "$disk" $W
R=$W/root; M=$W/mnt; MK=$W/kmnt
mkdir -p $M $MK
on_exit() {
  local m
  for m in $(awk -v w="$W/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r); do
    thinfs umount --root "$R" "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true
  done
  vm_dm_cleanup
  umount $W 2>/dev/null || true
}
trap on_exit EXIT

# assert_idle WHEN: no loop device and no dm device (waits up to 10 s for a daemon to let go).
assert_idle() {
  local i
  for i in $(seq 50); do
    [ -z "$(losetup -a)" ] && [ -z "$(dmsetup ls | awk '$1 != "No"')" ] && return 0
    sleep 0.2
  done
  vm_fail "$1: the idle store left: losetup -a: [$(losetup -a)] dmsetup ls: [$(dmsetup ls)]"
}

step "init: thinfs.backend=loop"
[ -z "$(losetup -a)" ] && [ -z "$(dmsetup ls | awk '$1 != "No"')" ] || vm_fail "the guest is not clean before the test"
vm_run thinfs init --root $R --storage-opt thinfs.backend=loop --storage-opt dm.loopdatasize=1G \
  --storage-opt dm.loopmetadatasize=64M --storage-opt dm.basesize=128M
[ -f $R/pool/data ] && [ -f $R/pool/metadata ] || vm_fail "no $R/pool/{data,metadata}"
assert_idle "after init"
thinfs info --root $R
# Docker's naming: the root's device (major:minor) and inode.
prefix="thinfs-$(cat /sys/block/${disk#/dev/}/dev)-$(stat -c %i $R)"
pname="$prefix-pool"
echo "expected pool name: $pname"

step "an image layer with content; a container"
vm_run thinfs layer create --root $R img
mkdir -p /tmp/ltl-img/etc; echo "from the image" > /tmp/ltl-img/etc/motd; head -c 100000 /dev/urandom > /tmp/ltl-img/data.bin
tar -cf /tmp/ltl-img.tar -C /tmp/ltl-img .
vm_run thinfs layer apply-diff --root $R img /tmp/ltl-img.tar
assert_idle "after apply-diff"
vm_run thinfs layer create-rw --root $R c1 --parent img
d1=$(layer_field $R c1 deviceID); echo "c1: thin device $d1"
assert_idle "after create-rw"

step "FUSE mount: the pool and the thin device are active, on loop devices over the root's files"
vm_run thinfs mount --root $R c1 $M
[ "$(mount_kind $M)" = fuse.thinfs ] || vm_fail "$M is '$(mount_kind $M)'"
dmsetup ls
losetup -a
dmsetup table "$pname" | grep -q ' thin-pool ' || vm_fail "no thin-pool $pname: $(dmsetup ls)"
[ -b "/dev/mapper/$prefix-$d1" ] || vm_fail "no /dev/mapper/$prefix-$d1 while c1 is mounted"
losetup -a | grep -q "$R/pool/data" || vm_fail "no loop device over $R/pool/data"
losetup -a | grep -q "$R/pool/metadata" || vm_fail "no loop device over $R/pool/metadata"
[ "$(cat $M/etc/motd)" = "from the image" ] || vm_fail "the image's file reads '$(cat $M/etc/motd)'"
cmp $M/data.bin /tmp/ltl-img/data.bin || vm_fail "data.bin differs"
echo "written on the loop backend" > $M/hello.txt
vm_run thinfs umount $M
assert_idle "after the FUSE unmount"

step "kernel mount; rm refused with EBUSY"
vm_run thinfs mount --kernel --root $R c1 $MK
[ "$(mount_kind $MK)" = ext4 ] || vm_fail "$MK is '$(mount_kind $MK)', not ext4"
[ "$(mount_source $MK)" = "/dev/mapper/$prefix-$d1" ] || vm_fail "kernel mount of $(mount_source $MK)"
[ "$(cat $MK/hello.txt)" = "written on the loop backend" ] || vm_fail "the kernel does not see the FUSE write"
expect_fail 'c1' thinfs layer rm --root $R c1 > $W/rm.out
cat $W/rm.out
grep -Eqi 'busy|EBUSY' $W/rm.out || vm_fail "the refusal does not say busy"
st=$(layer_field $R c1 state)
[ -n "$st" ] && [ "$st" != deleted ] || vm_fail "c1's state after a refused rm: '$st'"
vm_run thinfs umount --root $R $MK
[ -z "$(mount_kind $MK)" ] || vm_fail "$MK still mounted"
assert_idle "after the kernel unmount"

step "rm; the pool files afterwards"
vm_run thinfs layer rm --root $R c1
vm_run thinfs layer rm --root $R img
[ -z "$(layer_ids $R)" ] || vm_fail "layers left: $(layer_ids $R)"
assert_idle "after rm"
thin_check $R/pool/metadata || vm_fail "thin_check $R/pool/metadata"
devs=$(thin_dump $R/pool/metadata | sed -n 's/.*<device dev_id="\([0-9]*\)".*/\1/p' | tr '\n' ' ')
echo "devices left: [$devs]"
[ "$(echo $devs | wc -w)" = 1 ] || vm_fail "the pool should hold only the base device: [$devs]"
vm_run thinfs pool check --root $R
assert_idle "at the end"
echo "layers-loop: ok"
