# `thinfs setup-lvm` on a virtio disk, as the seeds do direct-lvm: the pool exists, `lvs` shows it
# monitored, the profile is attached; a disk holding a filesystem or a VG is refused unless --force;
# dmeventd extends the pool when data passes the threshold; a full pool queues then recovers after
# lvextend. The pool is then driven by KernelThinPool (`thinfs kernel-pool`) under its dm name.
set -euo pipefail
. /share/.vm/lib.sh
disk=$(vm_disk setuplvm)
step() { echo "--- $*"; }

step "refusals"
# setup-lvm probes with util-linux's blkid (busybox's takes no -p/-o/-s and would see nothing).
blkid --version 2>&1 | grep -q util-linux \
  || vm_fail "util-linux blkid is not in the initramfs: add /usr/sbin/blkid to build-initramfs.sh's binaries (or THINFS_VM_EXTRA_BINARIES=/usr/sbin/blkid)"
mke2fs -q -F -t ext4 "$disk"
if out=$(thinfs setup-lvm --device "$disk" 2>&1); then vm_fail "a disk with ext4 was taken"; fi
echo "$out"; echo "$out" | grep -q 'TYPE=ext4' || vm_fail "the error does not name ext4"
if out=$(thinfs setup-lvm --device "$disk" --data-percent 95 --meta-percent 10 2>&1); then vm_fail "105% accepted"; fi
echo "$out"; echo "$out" | grep -q 'sum to 100 or less' || vm_fail "percent error"
wipefs -a "$disk" >/dev/null 2>&1 || dd if=/dev/zero of="$disk" bs=1M count=4 status=none
pvcreate -q "$disk" && vgcreate -q other "$disk"
if out=$(thinfs setup-lvm --device "$disk" 2>&1); then vm_fail "a disk in VG 'other' was taken"; fi
echo "$out"; echo "$out" | grep -q "volume group 'other'" || vm_fail "the error does not name the VG"
vgremove -q -f other && pvremove -q "$disk"

step "setup-lvm (data 60%VG, so the VG has room to autoextend into)"
out=$(thinfs setup-lvm --device "$disk" --data-percent 60 --meta-percent 1 --autoextend-threshold 80 --autoextend-percent 20)
echo "$out"
[ "$out" = "dm.thinpooldev=/dev/mapper/docker-thinpool" ] || vm_fail "printed: $out"
lvs -o+seg_monitor docker
lvs --noheadings -o seg_monitor docker/thinpool | grep -qw monitored || vm_fail "not monitored"
lvs --noheadings -o lv_profile docker/thinpool | grep -q docker-thinpool || vm_fail "profile not attached"
cat /etc/lvm/profile/docker-thinpool.profile
[ -b /dev/mapper/docker-thinpool ] || vm_fail "no /dev/mapper/docker-thinpool"

step "KernelThinPool reads the LVM pool"
thinfs kernel-pool status --pool /dev/mapper/docker-thinpool --fields
[ "$(thinfs kernel-pool status --pool docker-thinpool)" = "$(dmsetup status docker-thinpool | cut -d' ' -f4- | sed 's/ *$//')" ] || vm_fail "status differs from dmsetup"

step "fill past the threshold; dmeventd extends the pool"
size0=$(lvs --noheadings --units b --nosuffix -o lv_size docker/thinpool | tr -d ' ')
lvcreate -q -V 900M -T docker/thinpool -n fill
data_bytes=$size0
fill=$(( data_bytes * 85 / 100 / 1048576 ))
dd if=/dev/urandom of=/dev/docker/fill bs=1M count=$fill oflag=direct status=none
lvs -o lv_name,lv_size,data_percent docker
grown=0
for i in $(seq 1 60); do
  size=$(lvs --noheadings --units b --nosuffix -o lv_size docker/thinpool | tr -d ' ')
  if [ "$size" -gt "$size0" ]; then grown=1; break; fi
  sleep 2
done
lvs -o lv_name,lv_size,data_percent docker
[ $grown = 1 ] || vm_fail "dmeventd did not extend the pool ($size0 bytes after $((i * 2)) s)"
echo "pool grew from $size0 to $size bytes"

step "pool full: writes queue, then lvextend lets them finish"
lvcreate -q -V 2G -T docker/thinpool -n big
# No autoextend now: we want it full. (After lvcreate, which activates the pool monitored again.)
lvchange -q --monitor n docker/thinpool
lvs --noheadings -o seg_monitor docker/thinpool | grep -q 'not monitored' || vm_fail "still monitored"
# lvm2 now runs the pool as docker-thinpool-tpool under a linear docker-thinpool; KernelThinPool follows.
dmsetup table docker-thinpool
# More than the pool has left (the kernel's count, through KernelThinPool), less than it has after lvextend.
fields=$(thinfs kernel-pool status --pool docker-thinpool --fields); echo "$fields"
data=$(echo "$fields" | awk '$1 == "data:" {print $2}'); bs=$(echo "$fields" | awk '$1 == "data_block_size:" {print $2}')
need=$(( (${data#*/} - ${data%/*}) * bs / 1048576 + 32 ))
echo "writing $need MiB into a pool with $(( (${data#*/} - ${data%/*}) * bs / 1048576 )) MiB free"
dd if=/dev/urandom of=/dev/docker/big bs=1M count=$need oflag=direct status=none &
ddpid=$!
full=0
for i in $(seq 1 50); do
  if thinfs kernel-pool status --pool docker-thinpool | grep -q ' out_of_data_space '; then full=1; break; fi
  sleep 1
done
thinfs kernel-pool status --pool /dev/mapper/docker-thinpool
[ $full = 1 ] || vm_fail "the pool never filled"
sleep 2
kill -0 $ddpid 2>/dev/null || vm_fail "dd finished although the pool is full (writes should queue)"
vgs docker
lvextend -q -l +100%FREE docker/thinpool
wait $ddpid || vm_fail "queued writes failed after lvextend"
st=$(thinfs kernel-pool status --pool docker-thinpool); echo "$st"
echo "$st" | grep -q ' rw ' || vm_fail "pool not rw after lvextend"
echo "setup-lvm-autoextend: ok"
lvremove -q -f docker/fill docker/big
vgchange -q -an docker
