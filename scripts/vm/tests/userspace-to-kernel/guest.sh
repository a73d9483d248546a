# userspace -> kernel, guest side: the kernel's dm-thin activates the pools the userspace engine
# made (loop devices over the virtio disks carrying the host's files), and every thin device must
# read back the host's bytes; the kernel mounts and e2fscks the ext4s. Then the kernel writes: it
# releases the held metadata snapshot, writes through ext4, snapshots, creates, deletes and sets
# the transaction id, and leaves manifests for host-verify to check with the userspace engine.
. /share/.vm/lib.sh
. ./common.sh
set -u
failures=0
check() { # WHAT EXPECTED ACTUAL
  if [ "$2" = "$3" ]; then echo "ok: $1"; else echo "MISMATCH: $1: expected '$2', kernel says '$3'"; failures=$((failures + 1)); fi
}

activate_pool() { # POOL
  local p=$1 meta data loop_meta loop_data
  meta=$(vm_disk "$p-meta") && data=$(vm_disk "$p-data") || vm_fail "pool $p's disks are missing"
  # The issue's procedure: loop devices, then a thin-pool table over them.
  loop_meta=$(losetup -f --show "$meta") && loop_data=$(losetup -f --show "$data") || vm_fail "losetup"
  read -r data_sectors block_sectors features < "$p.table"
  echo "dmsetup create $p-pool: 0 $data_sectors thin-pool $loop_meta $loop_data $block_sectors 0 $features"
  vm_run dmsetup create "$p-pool" --table "0 $data_sectors thin-pool $loop_meta $loop_data $block_sectors 0 $features"
  # The kernel's status fields against `thinfs pool status`: transaction id, used/total metadata
  # blocks (with the kernel's metadata reserve counted as used), used/total data blocks, held root.
  local k; k=$(dmsetup status "$p-pool" | cut -d' ' -f4-7)
  check "pool $p status (transaction, metadata, data, held root)" "$(kernel_status_view < "$p.status")" "$k"
}

activate_thin() { # POOL ID SECTORS
  vm_run dmsetup create "$1-thin-$2" --table "0 $3 thin /dev/mapper/$1-pool $2"
}

for p in a b c; do activate_pool "$p"; done
dmsetup table

while read -r p id sectors kind sha mapped highest; do
  activate_thin "$p" "$id" "$sectors"
  node=/dev/mapper/$p-thin-$id
  if [ "$kind" = tail ]; then  # the last 32 MiB only
    check "pool $p device $id bytes (last 32 MiB)" "$sha" "$(dd if="$node" bs=1M skip=$((sectors / 2048 - 32)) count=32 2>/dev/null | sha256sum | cut -d' ' -f1)"
  else
    check "pool $p device $id bytes" "$sha" "$(sha256sum < "$node" | cut -d' ' -f1)"
  fi
  check "pool $p device $id status (mapped, highest)" "$mapped $highest" "$(dmsetup status "$p-thin-$id" | cut -d' ' -f4-5)"
  if [ "$kind" = ext4 ]; then
    e2fsck -fn "$node" > "e2fsck-$p-$id.log" 2>&1
    check "pool $p device $id e2fsck -fn" 0 "$?"
    mkdir -p "/mnt/$p-$id"
    vm_run mount -t ext4 -o ro,noload "$node" "/mnt/$p-$id"
    fs_manifest "/mnt/$p-$id" > "kernel-$p-$id.files"
    check "pool $p device $id files (kernel ext4 vs FUSE on the host)" "$(cat "$p-$id.files")" "$(cat "kernel-$p-$id.files")"
    if [ -d "/mnt/$p-$id/var/big" ]; then
      # The directory thinfs-mount grew and indexed: the manifest above looked up every name in it.
      debugfs -R "htree /var/big" "$node" > "htree-$p-$id.log" 2>&1
      check "pool $p device $id /var/big has an htree index" 0 "$(grep -c 'Root node dump' "htree-$p-$id.log" > /dev/null; echo $?)"
      check "pool $p device $id /var/big entries" "$(grep -c '^F ./var/big/' "$p-$id.files")" "$(ls "/mnt/$p-$id/var/big" | wc -l)"
    fi
    vm_run umount "/mnt/$p-$id"
  fi
done < devices

echo "--- the kernel writes to pool a"
vm_run dmsetup message a-pool 0 release_metadata_snap
mkdir -p /mnt/k
vm_run mount -t ext4 /dev/mapper/a-thin-1 /mnt/k
head -c 777777 /dev/urandom > /mnt/k/etc/app/kernel.bin
echo "the kernel was here" >> /mnt/k/etc/app/hello.txt
rm /mnt/k/usr/lib/hardlink.bin
vm_run umount /mnt/k
# create_snap of an active origin: suspend it so its in-flight I/O is flushed (containerd#4374).
vm_run dmsetup suspend a-thin-1
vm_run dmsetup message a-pool 0 "create_snap 20 1"
vm_run dmsetup resume a-thin-1
vm_run mount -t ext4 /dev/mapper/a-thin-1 /mnt/k
dd if=/dev/urandom of=/mnt/k/usr/lib/one-mib.bin bs=4096 seek=3 count=20 conv=notrunc 2>/dev/null
mkdir /mnt/k/after-kernel-snapshot
vm_run umount /mnt/k
vm_run dmsetup message a-pool 0 "create_thin 21"
activate_thin a 21 65536
dd if=/dev/urandom of=/dev/mapper/a-thin-21 bs=512 seek=3 count=300 oflag=direct 2>/dev/null || vm_fail "dd to thin 21"
dd if=/dev/urandom of=/dev/mapper/a-thin-21 bs=65536 seek=200 count=4 oflag=direct 2>/dev/null || vm_fail "dd to thin 21"
vm_run dmsetup remove a-thin-4
vm_run dmsetup message a-pool 0 "delete 4"
vm_run dmsetup message a-pool 0 "set_transaction_id 5 6"
activate_thin a 20 65536
: > kernel-devices
for id in 1 2 3 6 20 21; do
  echo "$id $(sha256sum < /dev/mapper/a-thin-$id | cut -d' ' -f1) $(dmsetup status a-thin-$id | cut -d' ' -f4-5)" >> kernel-devices
done
for id in 1 20; do
  e2fsck -fn /dev/mapper/a-thin-$id > "e2fsck-kernel-$id.log" 2>&1
  check "kernel-written device $id e2fsck -fn" 0 "$?"
  vm_run mount -t ext4 -o ro,noload /dev/mapper/a-thin-$id /mnt/k
  fs_manifest /mnt/k > "kernel-written-$id.files"
  vm_run umount /mnt/k
done
cat kernel-devices

echo "--- deactivate"
for n in $(dmsetup ls | awk '/^[ab]-thin-/ {print $1}'); do vm_run dmsetup remove "$n"; done
dmsetup status a-pool | cut -d' ' -f4-7 > kernel-a.status
cat kernel-a.status
vm_run dmsetup remove a-pool
echo "--- the kernel allocates in pool c (past the first bitmap)"
vm_run dmsetup message c-pool 0 "create_thin 12"
activate_thin c 12 65536
dd if=/dev/urandom of=/dev/mapper/c-thin-12 bs=65536 seek=17 count=40 oflag=direct 2>/dev/null || vm_fail "dd to c thin 12"
echo "12 $(sha256sum < /dev/mapper/c-thin-12 | cut -d' ' -f1) $(dmsetup status c-thin-12 | cut -d' ' -f4-5)" > kernel-c-devices
for n in $(dmsetup ls | awk '/^c-thin-/ {print $1}'); do vm_run dmsetup remove "$n"; done
dmsetup status c-pool | cut -d' ' -f4-7 > kernel-c.status
cat kernel-c.status kernel-c-devices
vm_run dmsetup remove b-pool
vm_run dmsetup remove c-pool
losetup -D
for p in a b c; do
  thin_check "$(vm_disk "$p-meta")" > "thin_check-$p.log" 2>&1
  check "thin_check of pool $p after the kernel" 0 "$?"
done
sync
echo "$failures mismatches"
[ "$failures" = 0 ]
