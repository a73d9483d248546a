# kernel -> userspace, guest side: the kernel's dm-thin makes a pool on the zeroed files, thin
# devices and snapshots get ext4s written through the kernel, raw writes, discards, a deleted
# device, a transaction id and a held metadata snapshot. Manifests of every device and file, the
# status line and thin_dump's XML go back to the host, whose userspace engine must agree.
. /share/.vm/lib.sh
. ./common.sh
set -eu
meta=$(vm_disk k-meta); data=$(vm_disk k-data)
loop_meta=$(losetup -f --show "$meta"); loop_data=$(losetup -f --show "$data")
sectors=$((32 << 11))
dmsetup create k-pool --table "0 $((2048 << 11)) thin-pool $loop_meta $loop_data 128 0 0"
msg() { dmsetup message k-pool 0 "$1"; }
thin() { dmsetup create "k-thin-$1" --table "0 $sectors thin /dev/mapper/k-pool $1"; }
mkdir -p /mnt/k

echo "--- device 1: ext4 written by the kernel"
msg "create_thin 1"; thin 1
mkfs.ext4 -q -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/k-thin-1
mount -t ext4 /dev/mapper/k-thin-1 /mnt/k
mkdir -p /mnt/k/etc/app /mnt/k/usr/lib /mnt/k/empty-dir
echo "written by the kernel's ext4" > /mnt/k/etc/app/hello.txt
head -c 123457 /dev/urandom > /mnt/k/usr/lib/small.bin
head -c $((2 << 20)) /dev/urandom > /mnt/k/usr/lib/two-mib.bin
truncate -s $((10 << 20)) /mnt/k/usr/lib/sparse.bin
dd if=/dev/urandom of=/mnt/k/usr/lib/sparse.bin bs=4096 seek=1000 count=5 conv=notrunc 2>/dev/null
ln -s ../usr/lib/small.bin /mnt/k/etc/link
ln /mnt/k/usr/lib/small.bin /mnt/k/usr/lib/hardlink.bin
chmod 0711 /mnt/k/etc/app
umount /mnt/k

echo "--- device 2: a kernel snapshot of 1; both written afterwards"
dmsetup suspend k-thin-1; msg "create_snap 2 1"; dmsetup resume k-thin-1
thin 2
mount -t ext4 /dev/mapper/k-thin-2 /mnt/k
echo "only in the snapshot" > /mnt/k/snapshot-only.txt
dd if=/dev/urandom of=/mnt/k/usr/lib/two-mib.bin bs=4096 seek=50 count=30 conv=notrunc 2>/dev/null
rm /mnt/k/usr/lib/hardlink.bin
umount /mnt/k
mount -t ext4 /dev/mapper/k-thin-1 /mnt/k
head -c 333333 /dev/urandom > /mnt/k/etc/app/origin-after-snapshot.bin
umount /mnt/k

echo "--- device 3: raw writes, a discard, a held metadata snapshot, then more writes"
msg "create_thin 3"; thin 3
dd if=/dev/urandom of=/dev/mapper/k-thin-3 bs=512 seek=7 count=2000 oflag=direct 2>/dev/null
dd if=/dev/urandom of=/dev/mapper/k-thin-3 bs=65536 seek=100 count=40 oflag=direct 2>/dev/null
blkdiscard -o $((110 * 65536)) -l $((10 * 65536)) /dev/mapper/k-thin-3    # unmaps 10 whole blocks
msg "create_thin 4"; thin 4
dd if=/dev/urandom of=/dev/mapper/k-thin-4 bs=65536 count=30 oflag=direct 2>/dev/null
dmsetup remove k-thin-4; msg "delete 4"
msg "set_transaction_id 0 42"
msg "reserve_metadata_snap"
dd if=/dev/urandom of=/dev/mapper/k-thin-3 bs=65536 seek=300 count=5 oflag=direct 2>/dev/null
dd if=/dev/urandom of=/dev/mapper/k-thin-3 bs=512 seek=10 count=1 oflag=direct 2>/dev/null

echo "--- manifests"
: > kernel-devices
for id in 1 2 3; do
  echo "$id $(sha256sum < /dev/mapper/k-thin-$id | cut -d' ' -f1) $(dmsetup status k-thin-$id | cut -d' ' -f4-5)" >> kernel-devices
done
for id in 1 2; do
  e2fsck -fn /dev/mapper/k-thin-$id > "e2fsck-$id.log" 2>&1 || { cat "e2fsck-$id.log"; vm_fail "e2fsck of device $id"; }
  mount -t ext4 -o ro,noload /dev/mapper/k-thin-$id /mnt/k
  fs_manifest /mnt/k > "kernel-$id.files"
  umount /mnt/k
done
cat kernel-devices
for id in 1 2 3; do dmsetup remove "k-thin-$id"; done
dmsetup status k-pool | cut -d' ' -f4-7 > kernel.status
cat kernel.status
dmsetup remove k-pool
losetup -d "$loop_meta" "$loop_data"
thin_check "$meta"
thin_dump "$meta" > kernel-dump.xml
thin_dump -m "$meta" > kernel-dump-snap.xml
sync
echo "kernel-to-userspace: guest done"
