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

# kernel_status_view: reads the first four fields of `thinfs pool status` (transaction id,
# used/total metadata blocks, used/total data blocks, held root) and prints them as the kernel's
# thin-pool status line shows them. The kernel keeps a metadata reserve of min(4096, total/10)
# blocks out of the free count it reports (dm-thin-metadata.c: __set_metadata_reserve,
# dm_pool_get_free_metadata_block_count), so its "used" is total - max(0, free - reserve).
kernel_status_view() {
  awk '{ split($2, m, "/"); total = m[2]; free = total - m[1]
         r = int(total / 10); if (r > 4096) r = 4096
         free = (free < r) ? 0 : free - r
         print $1, (total - free) "/" total, $3, $4 }'
}
