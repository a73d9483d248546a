# docker-import: a Docker devicemapper directory laid out exactly as Docker 17-24 left it with
# loop-lvm, made here with the kernel's dm-thin and Docker's own steps (no Docker binary), then
# read by `thinfs import-docker` with no device-mapper at all, and served through FUSE.
#
#   1. /var/lib/docker/devicemapper/devicemapper/{data,metadata}: sparse files on loop devices, the
#      pool `docker-MAJ:MIN-INO-pool` with Docker's table (64K blocks, low water 32768,
#      skip_block_zeroing); each change in Docker's transaction protocol (transaction-metadata,
#      message, metadata/<hash>, set_transaction_id)
#   2. the base device: create_thin 1, mkfs.ext4 with Docker's options, tune2fs -c -1 -i 0, its UUID
#      in deviceset-metadata; an image layer, its container's -init layer and the container
#      (create_snap, kernel ext4 mount, files written, unmount, deactivate); a deferred-deleted device
#   3. everything removed (dmsetup remove, losetup -d), as Docker's shutdown leaves it
#   4. thinfs import-docker, layer ls, FUSE mounts of the container and the image layer (the kernel's
#      files, byte for byte), diff, refused rm
#   5. Docker's files byte-identical (sha256 and mtime/ctime of every file), thin_check clean
#   6. the kernel activates the pool again (at Docker's transaction id): import-docker --thinpool
#      through it (direct-lvm's path), the container through FUSE again, the pool's transaction id
#      unchanged, no thin device left active, and a Docker device still active refused; the
#      kernel's ext4 reads the container's files
set -euo pipefail
. /share/.vm/lib.sh

step() { echo "--- $* (t=$(cut -d' ' -f1 /proc/uptime)s)"; }
hex64() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

DISK=/mnt/di
DOCKER=$DISK/var/lib/docker
D=$DOCKER/devicemapper            # DOCKERDM
R=$DISK/thinfs                    # the new store
MNT=$DISK/mnt
on_exit() {
  local m
  for m in $(awk -v w="$MNT/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r); do
    thinfs umount "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true
  done
  vm_dm_cleanup
  grep -q " $DISK " /proc/mounts && umount $DISK 2>/dev/null || true
}
trap on_exit EXIT

step "a disk for /var/lib/docker"
disk=$(vm_disk docker-import)
mkfs.ext4 -q -E nodiscard "$disk"
mkdir -p $DISK
mount "$disk" $DISK
mkdir -p -m 0700 $DOCKER $D $D/devicemapper $D/metadata
mkdir -p $MNT/k $MNT/c $MNT/i

# Docker's names: docker-MAJ:MIN-INO after DOCKERDM's device and inode (deviceset.go initDevmapper).
dev=$(stat -c %d $D); ino=$(stat -c %i $D)
PREFIX="docker-$(( (dev >> 8) & 0xfff )):$(( (dev & 0xff) | ((dev >> 12) & 0xfff00) ))-$ino"
POOL=$PREFIX-pool
BASESIZE=$((64 << 20))            # dm.basesize=64M (default 10G: too slow to mkfs under TCG)
echo "pool $POOL"

step "loop-lvm: sparse files on loop devices, Docker's thin-pool table"
truncate -s 128M $D/devicemapper/data          # dm.loopdatasize=128M
truncate -s 32M $D/devicemapper/metadata       # dm.loopmetadatasize=32M
ld=$(losetup -f --show $D/devicemapper/data)
lm=$(losetup -f --show $D/devicemapper/metadata)
dmsetup create $POOL --table "0 $(blockdev --getsz $ld) thin-pool $lm $ld 128 32768 1 skip_block_zeroing"

TX=0
# Docker's transaction protocol: transaction-metadata, the pool message, metadata/<hash>, set_transaction_id.
# devfile NAME ID TX INITIALIZED DELETED: json.Marshal(devInfo), no newline.
devfile() {
  printf '{"device_id":%d,"size":%d,"transaction_id":%d,"initialized":%s,"deleted":%s}' "$2" $BASESIZE "$3" "$4" "$5" > $D/metadata/$1
}
create() {   # create NAME ID MESSAGE
  local open=$((TX + 1)) hash=$1
  [ "$hash" = base ] && hash=""
  printf '{"open_transaction_id":%d,"device_hash":"%s","device_id":%d}' $open "$hash" "$2" > $D/metadata/transaction-metadata
  dmsetup message $POOL 0 "$3"
  devfile "$1" "$2" $open false false
  dmsetup message $POOL 0 "set_transaction_id $TX $open"
  TX=$open
}
activate() { dmsetup create "$PREFIX-$1" --table "0 $((BASESIZE / 512)) thin /dev/mapper/$POOL $2"; }
deactivate() { dmsetup remove "$PREFIX-$1"; }

step "the base device: create_thin, mkfs.ext4 with Docker's options"
create base 1 "create_thin 1"
activate base 1
mkfs.ext4 -q -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/$PREFIX-base
tune2fs -c -1 -i 0 /dev/mapper/$PREFIX-base >/dev/null
UUID=$(tune2fs -l /dev/mapper/$PREFIX-base | sed -n 's/^Filesystem UUID: *//p')
deactivate base
devfile base 1 1 true false
printf '{"next_device_id":1,"BaseDeviceUUID":"%s","BaseDeviceFilesystem":"ext4"}' "$UUID" > $D/metadata/deviceset-metadata

IMG=$(hex64); C=$(hex64); CID=$(hex64); CHAIN=$(hex64); DEAD=$(hex64)
step "an image layer ($IMG), written through the kernel's ext4"
create $IMG 2 "create_snap 2 1"
activate $IMG 2
mount -t ext4 /dev/mapper/$PREFIX-$IMG $MNT/k
mkdir -p $MNT/k/etc $MNT/k/bin $MNT/k/usr/share
echo 'PRETTY_NAME="docker-import test image"' > $MNT/k/etc/os-release
head -c 3000000 /dev/urandom > $MNT/k/bin/blob
ln -s ../bin/blob $MNT/k/usr/share/blob-link
ln $MNT/k/bin/blob $MNT/k/bin/blob-hardlink
umount $MNT/k
deactivate $IMG

step "the container's init layer and the container ($CID)"
create $C-init 3 "create_snap 3 2"
activate $C-init 3
mount -t ext4 /dev/mapper/$PREFIX-$C-init $MNT/k
echo container-host > $MNT/k/etc/hostname
umount $MNT/k
deactivate $C-init
create $C 4 "create_snap 4 3"
activate $C 4
mount -t ext4 /dev/mapper/$PREFIX-$C $MNT/k
mkdir $MNT/k/data
head -c 500000 /dev/urandom > $MNT/k/data/log
rm $MNT/k/etc/os-release
(cd $MNT/k && find . -type f | grep -v '^./lost+found/' | sort | xargs sha256sum) > $DISK/container.sha
umount $MNT/k
deactivate $C
step "a deferred-deleted device ($DEAD)"
create $DEAD 5 "create_snap 5 2"
devfile $DEAD 5 $TX false true
printf '{"next_device_id":5,"BaseDeviceUUID":"%s","BaseDeviceFilesystem":"ext4"}' "$UUID" > $D/metadata/deviceset-metadata

# Docker's layer database: the image layer by chain id; the container by id, with its init layer.
LDB=$DOCKER/image/devicemapper/layerdb
mkdir -p $LDB/sha256/$CHAIN $LDB/mounts/$CID
printf %s $IMG > $LDB/sha256/$CHAIN/cache-id
printf %s $C > $LDB/mounts/$CID/mount-id
printf %s $C-init > $LDB/mounts/$CID/init-id
printf sha256:%s $CHAIN > $LDB/mounts/$CID/parent

step "Docker's shutdown: the pool removed, the loop devices detached"
dmsetup status $POOL
dmsetup remove $POOL
losetup -d $ld $lm
[ -z "$(dmsetup ls | grep docker- || true)" ] || vm_fail "dm devices left: $(dmsetup ls)"
thin_check $D/devicemapper/metadata
# Everything under /var/lib/docker, by content and by times: no write can leave both unchanged.
fingerprint() { (cd $DOCKER && find . -type f | sort | while read -r f; do echo "$(sha256sum < "$f" | cut -c1-64) $(stat -c '%s %Y %Z' "$f") $f"; done); }
sleep 1   # a write in the same second as the last change would keep mtime; not within a second
fingerprint > $DISK/before
wc -l < $DISK/before

step "thinfs import-docker: no device-mapper, no loop device"
[ "$(dmsetup ls)" = "No devices found" ] || vm_fail "dm devices before the import: $(dmsetup ls)"
thinfs import-docker --root $R $D | tee $DISK/import.out
grep -q "imported 3 layers" $DISK/import.out || vm_fail "expected 3 layers"
grep -q "skipped 1 device" $DISK/import.out || vm_fail "the deleted device was not reported as skipped"
grep -q "$DEAD (thin device 5" $DISK/import.out || vm_fail "the skipped device is not named"
[ "$(dmsetup ls)" = "No devices found" ] || vm_fail "the import activated dm devices: $(dmsetup ls)"
[ -z "$(losetup -a)" ] || vm_fail "the import attached loop devices: $(losetup -a)"

step "layer ls"
thinfs layer ls --root $R | tee $DISK/ls.out
for id in sha256:$CHAIN $CID-init $CID; do grep -q -- "$id" $DISK/ls.out || vm_fail "layer $id not listed"; done

step "FUSE: the container's files are the kernel's, byte for byte"
thinfs mount --root $R $CID $MNT/c
grep -q " $MNT/c fuse.thinfs ro," /proc/mounts || vm_fail "not mounted read-only: $(grep $MNT/c /proc/mounts)"
(cd $MNT/c && find . -type f | grep -v '^./lost+found/' | sort | xargs sha256sum) > $DISK/fuse.sha
diff $DISK/container.sha $DISK/fuse.sha || vm_fail "the container's files differ through FUSE"
[ "$(cat $MNT/c/etc/hostname)" = container-host ] || vm_fail "etc/hostname"
[ ! -e $MNT/c/etc/os-release ] || vm_fail "etc/os-release, removed in the container, is there"
[ "$(readlink $MNT/c/usr/share/blob-link)" = ../bin/blob ] || vm_fail "symlink"
[ "$(stat -c %i $MNT/c/bin/blob)" = "$(stat -c %i $MNT/c/bin/blob-hardlink)" ] || vm_fail "hard link"
if touch $MNT/c/newfile 2>/dev/null; then vm_fail "a write through the read-only mount succeeded"; fi
thinfs mount --root $R sha256:$CHAIN $MNT/i
grep -q 'docker-import test image' $MNT/i/etc/os-release || vm_fail "the image layer lost etc/os-release"
[ ! -e $MNT/i/etc/hostname ] || vm_fail "the image layer shows the init layer's file"
cmp $MNT/i/bin/blob $MNT/c/bin/blob || vm_fail "bin/blob differs between image and container"
thinfs umount $MNT/i
thinfs umount $MNT/c

step "diff and refusals"
thinfs layer diff --root $R $CID -o $DISK/c.tar
tar -tf $DISK/c.tar | sort | tee $DISK/c.list
for e in data/log etc/.wh.os-release; do grep -qx "$e" $DISK/c.list || vm_fail "$e not in the container's diff"; done
grep -q 'etc/hostname' $DISK/c.list && vm_fail "the init layer's file is in the container's diff"
out=$(thinfs layer rm --root $R $CID 2>&1) && vm_fail "layer rm succeeded: $out"
echo "$out"; echo "$out" | grep -q "$CID" || vm_fail "the refusal does not name the layer"
out=$(thinfs layer create --root $R x --parent sha256:$CHAIN 2>&1) && vm_fail "layer create succeeded: $out"
echo "$out"

step "Docker's files unchanged, thin_check clean, the kernel reads the pool again"
fingerprint > $DISK/after
diff $DISK/before $DISK/after || vm_fail "files under /var/lib/docker changed"
thin_check $D/devicemapper/metadata
ld=$(losetup -f --show $D/devicemapper/data); lm=$(losetup -f --show $D/devicemapper/metadata)
dmsetup create $POOL --table "0 $(blockdev --getsz $ld) thin-pool $lm $ld 128 32768 1 skip_block_zeroing"
[ "$(dmsetup status $POOL | awk '{print $4}')" = $TX ] || vm_fail "pool transaction id is not $TX: $(dmsetup status $POOL)"

step "direct-lvm: the same devices through the live kernel pool (--thinpool)"
R2=$DISK/thinfs-kernel
thinfs import-docker --root $R2 --thinpool $POOL $D | tee $DISK/import2.out
grep -q "imported 3 layers" $DISK/import2.out || vm_fail "expected 3 layers through the kernel pool"
grep -q "the kernel thin pool $POOL" $DISK/import2.out || vm_fail "the kernel pool is not named"
thinfs mount --root $R2 $CID $MNT/c
(cd $MNT/c && find . -type f | grep -v '^./lost+found/' | sort | xargs sha256sum) > $DISK/fuse2.sha
thinfs umount $MNT/c
diff $DISK/container.sha $DISK/fuse2.sha || vm_fail "the container's files differ through the kernel pool"
[ "$(dmsetup status $POOL | awk '{print $4}')" = $TX ] || vm_fail "the import changed the kernel pool: $(dmsetup status $POOL)"
# Thin devices are active only while opened: none may be left once the mount's daemon has gone.
for i in $(seq 50); do [ "$(dmsetup ls | awk '{print $1}' | grep -vcx "$POOL")" = 0 ] && break; sleep 0.2; done
[ "$(dmsetup ls | awk '{print $1}' | grep -vcx "$POOL")" = 0 ] || vm_fail "thin devices left active: $(dmsetup ls)"
# Docker's own activation of a device (Docker still running) is refused.
activate $C 4
out=$(thinfs import-docker --root $DISK/thinfs-refused --thinpool $POOL $D 2>&1) && vm_fail "import with Docker's device active succeeded: $out"
echo "$out"; echo "$out" | grep -q "$PREFIX-$C" || vm_fail "the refusal does not name Docker's active device"
deactivate $C

activate $C 4
mount -t ext4 -o ro,noload /dev/mapper/$PREFIX-$C $MNT/k
(cd $MNT/k && sha256sum -c $DISK/container.sha >/dev/null) || vm_fail "the kernel reads different files"
umount $MNT/k
deactivate $C
dmsetup remove $POOL
losetup -d $ld $lm
echo "docker-import: passed"
