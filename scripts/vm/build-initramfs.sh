#!/usr/bin/env bash
# Builds the guest's initramfs: busybox-static as /init's shell, the host's own lvm2, dmsetup,
# dmeventd (with its thin plugin), thin-provisioning-tools, e2fsprogs, fusermount3, losetup, blkid
# (util-linux's: setup-lvm trusts it to find filesystems; busybox's misses some), and
# ThinFS's thinfs and thinfs-mount, each with its ldd closure (the guest runs the host's Debian
# userspace, so the host's .so files work), plus the kernel modules the tests need.
#
#   build-initramfs.sh --bin DIR [--kernel ENTRY] [--out FILE]
#     --bin DIR      where thinfs and thinfs-mount were built (e.g. .build-vm/release)
#     --kernel ENTRY a fetch-kernel.sh cache entry (default: run fetch-kernel.sh)
#     --out FILE     the cpio archive (default: ENTRY/initramfs.cpio); prints its path
#
# THINFS_VM_EXTRA_MODULES and THINFS_VM_EXTRA_BINARIES (space-separated) add modules and host
# binaries for new tests. The archive is uncompressed: decompressing under TCG costs more than
# reading a bigger image.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

bin="" entry="" out=""
while (($#)); do
  case $1 in
    --bin) bin=$2; shift 2 ;;
    --kernel) entry=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "build-initramfs: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -n $bin ]] || { echo "build-initramfs: --bin DIR (where thinfs and thinfs-mount are) is required" >&2; exit 2; }
for b in thinfs thinfs-mount; do
  [[ -x $bin/$b ]] || { echo "build-initramfs: no executable $bin/$b" >&2; exit 1; }
done
[[ -n $entry ]] || entry=$("$here/fetch-kernel.sh")
version=$(cat "$entry/version")
out=${out:-$entry/initramfs.cpio}
modroot="$entry/root/lib/modules/$version"

stage=$(mktemp -d "${TMPDIR:-/tmp}/thinfs-initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# Merged /usr, as on the host, so that ldd's /lib/... paths land in usr/lib.
mkdir -p "$stage"/{usr/bin,usr/sbin,usr/lib,usr/lib64,usr/local/bin,etc/lvm,proc,sys,dev,run,tmp,share,mnt,root,var}
ln -s usr/bin "$stage/bin"; ln -s usr/sbin "$stage/sbin"; ln -s usr/lib "$stage/lib"; ln -s usr/lib64 "$stage/lib64"
ln -s ../run "$stage/var/run"; ln -s ../tmp "$stage/var/tmp"; mkdir -p "$stage/var/lock"

# Copies a host file to the same path in the stage, following symlinks, and recreates the symlink
# chain's own names too (so both libfoo.so.1 and libfoo.so.1.2.3 exist).
copy_path() {
  local src=$1
  local dst="$stage$src"
  [[ -e $dst ]] && return 0
  mkdir -p "$(dirname "$dst")"
  if [[ -L $src ]]; then
    local target; target=$(readlink -f "$src")
    copy_path "$target"
    ln -s "$target" "$dst"
  else
    cp -p "$src" "$dst"
  fi
}

# A binary or library with its ldd closure.
declare -A seen=()
copy_elf() {
  local f=$1
  [[ -n ${seen[$f]:-} ]] && return 0
  seen[$f]=1
  copy_path "$f"
  local lib
  while read -r lib; do
    [[ -n $lib ]] && copy_path "$lib"
  done < <(ldd "$f" 2>/dev/null | awk '/=> \// {print $3} /^\t\// {print $1}')
}

# busybox-static: the shell and the small tools. Real tools in /usr/{s,}bin win on PATH.
copy_path /bin/busybox
mv "$stage/usr/bin/busybox" "$stage/usr/local/bin/busybox"
for applet in $("$stage/usr/local/bin/busybox" --list); do
  [[ $applet == busybox ]] || ln -sf busybox "$stage/usr/local/bin/$applet"
done
ln -sf ../local/bin/busybox "$stage/usr/bin/sh"
# The kernel runs /sbin/modprobe for request_module().
ln -sf ../local/bin/busybox "$stage/usr/sbin/modprobe"

binaries=(
  /usr/sbin/lvm /usr/sbin/dmsetup /usr/sbin/dmeventd
  /usr/sbin/pdata_tools
  /usr/sbin/mke2fs /usr/sbin/e2fsck /usr/sbin/debugfs /usr/sbin/dumpe2fs /usr/sbin/tune2fs /usr/sbin/resize2fs
  /usr/bin/fusermount3 /usr/sbin/losetup /usr/sbin/blockdev /usr/sbin/blkdiscard /usr/sbin/blkid /usr/bin/sha256sum
  /usr/bin/cmp /usr/bin/bash
  ${THINFS_VM_EXTRA_BINARIES:-}
)
for b in "${binaries[@]}"; do
  [[ -e $b ]] || { echo "build-initramfs: $b is missing on the host (run scripts/setup.sh)" >&2; exit 1; }
  copy_elf "$b"
done
# containerd, ctr, its runc shim and runc (with libseccomp), for containerd-thinpooldev: containerd
# with thinfs serve and with its own devmapper snapshotter on the guest's kernel pools. Debian's
# Go binaries come stripped: about 92 MB together.
for b in /usr/bin/containerd /usr/bin/ctr /usr/bin/containerd-shim-runc-v2 /usr/sbin/runc; do
  [[ -e $b ]] || { echo "build-initramfs: $b is missing on the host (run scripts/setup.sh)" >&2; exit 1; }
  copy_elf "$b"
done
# dmeventd dlopens its thin plugin through this symlink; take the target and its closure.
copy_path /usr/lib/x86_64-linux-gnu/libdevmapper-event-lvm2thin.so
copy_elf "$(readlink -f /usr/lib/x86_64-linux-gnu/libdevmapper-event-lvm2thin.so)"
# The lvm command names and the thin-provisioning-tools names, as the packages install them.
for l in /usr/sbin/*; do
  if [[ -L $l ]]; then
    case $(readlink "$l") in
      lvm|pdata_tools|mke2fs|e2fsck) ln -sf "$(readlink "$l")" "$stage$l" ;;
    esac
  fi
done
ln -sf mke2fs "$stage/usr/sbin/mkfs.ext4"
cp /etc/mke2fs.conf "$stage/etc/mke2fs.conf"

# ThinFS: stripped copies in /usr/bin (a debug build is 24 MB a binary, and every MB of initramfs
# costs boot time under TCG), with the unstripped binary's ldd closure.
for b in thinfs thinfs-mount; do
  src=$(readlink -f "$bin/$b")
  seen[$src]=1
  while read -r lib; do
    [[ -n $lib ]] && copy_path "$lib"
  done < <(ldd "$src" 2>/dev/null | awk '/=> \// {print $3} /^\t\// {print $1}')
  strip -o "$stage/usr/bin/$b" "$src" 2>/dev/null || cp -p "$src" "$stage/usr/bin/$b"
done

# LVM without udev: libdevmapper makes the nodes itself (DM_DISABLE_UDEV=1 is set by /init).
cat > "$stage/etc/lvm/lvm.conf" <<'CONF'
devices {
    obtain_device_list_from_udev = 0
    external_device_info_source = "none"
    use_devicesfile = 0
    scan = [ "/dev" ]
}
activation {
    udev_sync = 0
    udev_rules = 0
    monitoring = 1
}
global {
    use_lvmetad = 0
    event_activation = 0
}
dmeventd {
    executable = "/usr/sbin/dmeventd"
}
CONF
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$stage/etc/passwd"
printf 'root:x:0:\ndisk:x:6:\n' > "$stage/etc/group"
: > "$stage/etc/fstab"
ln -s /proc/self/mounts "$stage/etc/mtab"

# Kernel modules: the named ones and everything they depend on (modules.dep), plus a filtered
# modules.dep so busybox modprobe resolves them in the guest.
# crc32c comes first: libcrc32c asks the crypto API for it when it loads.
modules=(crc32c_generic crc32c_intel libcrc32c virtio_pci virtio_blk loop dm_mod dm_bufio dm_bio_prison
         dm_persistent_data dm_thin_pool dm_snapshot ext4 fuse overlay 9p 9pnet_virtio ${THINFS_VM_EXTRA_MODULES:-})
declare -A modpath=()
while IFS= read -r line; do
  m=${line%%:*}; n=${m##*/}; n=${n%.ko}; n=${n//-/_}
  modpath[$n]=$m
done < "$modroot/modules.dep"
declare -A need=()
add_module() {
  local name=${1//-/_}
  local path=${modpath[$name]:-}
  if [[ -z $path ]]; then
    grep -q "/${1}.ko\$\|/${1//_/-}.ko\$" "$modroot/modules.builtin" 2>/dev/null && return 0
    echo "build-initramfs: kernel $version has no module $1" >&2; exit 1
  fi
  [[ -n ${need[$path]:-} ]] && return 0
  need[$path]=1
  local dep
  for dep in $(grep "^$path:" "$modroot/modules.dep" | cut -d: -f2-); do
    dep=${dep##*/}; add_module "${dep%.ko}"
  done
}
for m in "${modules[@]}"; do add_module "$m"; done
gmod="$stage/lib/modules/$version"
mkdir -p "$gmod"
for p in "${!need[@]}"; do
  mkdir -p "$gmod/$(dirname "$p")"
  cp "$modroot/$p" "$gmod/$p"
  grep "^$p:" "$modroot/modules.dep" >> "$gmod/modules.dep"
done
cp "$modroot/modules.builtin" "$modroot/modules.order" "$gmod/" 2>/dev/null || true
printf '%s\n' "${modules[@]}" > "$stage/etc/thinfs-vm-modules"

cp "$here/init" "$stage/init"
chmod 755 "$stage/init"

mkdir -p "$(dirname "$out")"
(cd "$stage" && find . | LC_ALL=C sort | busybox cpio -o -H newc 2>/dev/null) > "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
