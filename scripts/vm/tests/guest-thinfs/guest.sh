# guest-thinfs: ThinFS's own binaries run in the guest (the harness's promise to the device-mapper
# backend's tests): thinfs makes a pool and an ext4, thinfs-mount serves it through the guest
# kernel's FUSE, and then the kernel's dm-thin activates the same files and mounts that ext4.
. /share/.vm/lib.sh
set -eux
disk=$(vm_disk guest-thinfs)
mkfs.ext4 -q -E nodiscard "$disk"
mkdir -p /mnt/disk /mnt/f
mount "$disk" /mnt/disk
R=/mnt/disk/root
thinfs pool create --root "$R" --data-size 256M --metadata-size 4M
thinfs pool message --root "$R" "create_thin 1"
thinfs dev format --root "$R" 1 --size 64M
thinfs-mount --root "$R" --device 1 /mnt/f
grep -q ' /mnt/f fuse.thinfs ' /proc/mounts
echo hello > /mnt/f/hello
head -c 1000000 /dev/urandom > /mnt/f/big
want=$(sha256sum < /mnt/f/big)
umount /mnt/f
# The daemon commits and exits after the unmount; the pool's writer lock shows when it has.
for i in $(seq 50); do thinfs pool message --root "$R" "create_snap 2 1" 2>/dev/null && break; sleep 0.2; done
thinfs pool check --root "$R"
thin_check "$R/pool/metadata"
lm=$(losetup -f --show "$R/pool/metadata"); ld=$(losetup -f --show "$R/pool/data")
dmsetup create gt-pool --table "0 $((256 << 11)) thin-pool $lm $ld 128 0"
dmsetup create gt-thin-2 --table "0 $((64 << 11)) thin /dev/mapper/gt-pool 2"
mount -t ext4 -o ro,noload /dev/mapper/gt-thin-2 /mnt/f
[ "$(cat /mnt/f/hello)" = hello ]
[ "$(sha256sum < /mnt/f/big)" = "$want" ]
umount /mnt/f
e2fsck -fn /dev/mapper/gt-thin-2
dmsetup remove gt-thin-2 gt-pool
losetup -d "$lm" "$ld"
umount /mnt/disk
echo "guest-thinfs: passed"
