# Shared by the host and guest sides of the tests (bash).
#
# fs_manifest DIR: one line per entry under DIR (lost+found left out), sorted, in the same format on
# the host (GNU tools) and in the guest (busybox find and stat, coreutils sha256sum):
#   D <path> <mode>   F <path> <mode> <size> <sha256>   L <path> -> <target>   O <path> <mode>
fs_manifest() {
  (cd "$1" && find . -mindepth 1 ! -path ./lost+found ! -path './lost+found/*' | LC_ALL=C sort |
    while IFS= read -r p; do
      if [ -L "$p" ]; then echo "L $p -> $(readlink "$p")"
      elif [ -d "$p" ]; then echo "D $p $(stat -c %a "$p")"
      elif [ -f "$p" ]; then echo "F $p $(stat -c '%a %s' "$p") $(sha256sum < "$p" | cut -d' ' -f1)"
      else echo "O $p $(stat -c %a "$p")"; fi
    done)
}

# kernel_status_view: the first four fields of `thinfs pool status` (transaction id, used/total
# metadata blocks, used/total data blocks, held root), which must equal the kernel's. Both count
# the kernel's metadata reserve of min(4096, total/10) blocks as used (dm-thin-metadata.c:
# __set_metadata_reserve, dm_pool_get_free_metadata_block_count; ThinFS: PoolStatus).
kernel_status_view() {
  awk '{ print $1, $2, $3, $4 }'
}
