# LVM -> userspace, guest side: lvm2 makes a thin pool (the seeds' options: 64K chunks, --zero n),
# a thin volume with an ext4 written by the kernel and a thin snapshot of it; the pool is
# deactivated and its metadata and data LVs are copied out for the
# host's userspace engine to open.
. /share/.vm/lib.sh
. ./common.sh
set -eu
pv=$(vm_disk lvm-pv)
pvcreate -q "$pv"
vgcreate -q vmvg "$pv"
lvcreate -q -L 64M --poolmetadatasize 4M --chunksize 64K --zero n --monitor n -T vmvg/pool
lvcreate -q -V 32M -T vmvg/pool -n base --monitor n
mkdir -p /mnt/k
mkfs.ext4 -q -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/vmvg-base
mount -t ext4 /dev/mapper/vmvg-base /mnt/k
mkdir -p /mnt/k/layer/bin
echo "made by LVM and the kernel" > /mnt/k/layer/README
head -c 654321 /dev/urandom > /mnt/k/layer/bin/tool
ln -s tool /mnt/k/layer/bin/alias
umount /mnt/k
lvcreate -q -s vmvg/base -n snap -kn --monitor n
mount -t ext4 /dev/mapper/vmvg-snap /mnt/k
echo "container layer" > /mnt/k/layer/container.txt
dd if=/dev/urandom of=/mnt/k/layer/bin/tool bs=4096 seek=10 count=5 conv=notrunc 2>/dev/null
umount /mnt/k
lvs -a -o lv_name,lv_size,thin_id,data_percent,metadata_percent vmvg
: > kernel-devices
for lv in base snap; do
  id=$(lvs --noheadings -o thin_id "vmvg/$lv" | tr -d ' ')
  echo "$id $lv $(sha256sum < "/dev/mapper/vmvg-$lv" | cut -d' ' -f1)" >> kernel-devices
  mount -t ext4 -o ro,noload "/dev/mapper/vmvg-$lv" /mnt/k
  fs_manifest /mnt/k > "kernel-$id.files"
  umount /mnt/k
done
cat kernel-devices
# The pool's hidden metadata and data LVs are linear maps on the PV: keep their tables, deactivate
# the whole VG (the kernel commits and lets go of the pool), then map them again read-only and copy.
# (lvm2 2.03.16 refuses `lvchange -ay` on these hidden component LVs.)
dmsetup table vmvg-pool_tmeta > tmeta.table
dmsetup table vmvg-pool_tdata > tdata.table
vgchange -q -an vmvg
[ -z "$(dmsetup ls | grep vmvg)" ] || vm_fail "vmvg still has active devices"
dmsetup create --readonly lvm-tmeta-copy < tmeta.table
dmsetup create --readonly lvm-tdata-copy < tdata.table
dd if=/dev/mapper/lvm-tmeta-copy of="$(vm_disk lvm-tmeta)" bs=1M conv=fsync 2>/dev/null
dd if=/dev/mapper/lvm-tdata-copy of="$(vm_disk lvm-tdata)" bs=1M conv=fsync 2>/dev/null
dmsetup remove lvm-tmeta-copy lvm-tdata-copy
thin_check "$(vm_disk lvm-tmeta)"
thin_dump "$(vm_disk lvm-tmeta)" > kernel-dump.xml
sync
echo "lvm-to-userspace: guest done"
