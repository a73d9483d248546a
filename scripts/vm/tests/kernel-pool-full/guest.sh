# A small kernel pool runs out of data space: with error_if_no_space writes fail at once with
# ENOSPC and the status says out_of_data_space; growing the data (file, loop capacity, table
# reload: `thinfs kernel-pool resize`) brings it back to rw and writes succeed.
set -euo pipefail
. /share/.vm/lib.sh
kp() { thinfs kernel-pool "$@"; }
dir=/tmp/kpf; mkdir -p $dir
vm_run kp create-loop --name fpool --data $dir/data --metadata $dir/meta --data-size 4M --metadata-size 4M --error-if-no-space
kp status --pool fpool
vm_run kp message --pool fpool create_thin 1
vm_run kp activate --pool fpool 1 --size 64M
if dd if=/dev/urandom of=/dev/mapper/fpool-1 bs=1M count=8 oflag=direct status=none 2>$dir/dd.err; then
  vm_fail "8 MiB fitted in a 4 MiB pool"
fi
cat $dir/dd.err
grep -qi 'no space\|input/output' $dir/dd.err || vm_fail "unexpected write error"
st=$(kp status --pool fpool); echo "$st"
echo "$st" | grep -q ' out_of_data_space ' || vm_fail "status not out_of_data_space"
echo "$st" | grep -q ' 64/64 ' || vm_fail "data not full: $st"

echo "--- grow to 16 MiB"
vm_run kp resize --pool fpool --data-file $dir/data --data-size 16M
st=$(kp status --pool fpool); echo "$st"
echo "$st" | grep -q '/256 - rw ' || vm_fail "not rw with 256 blocks after resize: $st"
vm_run dd if=/dev/urandom of=/dev/mapper/fpool-1 bs=1M count=8 oflag=direct status=none
kp dev-status --pool fpool 1
vm_run kp deactivate --pool fpool 1
vm_run kp remove --name fpool
sleep 1
# thin_check opens with O_DIRECT, which tmpfs refuses: check the file through a loop device.
loop=$(losetup -f --show $dir/meta)
thin_check "$loop" || { losetup -d "$loop"; vm_fail "thin_check"; }
losetup -d "$loop"
echo "kernel-pool-full: ok"
